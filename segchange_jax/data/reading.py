"""Reading one pair from disk into checked uint8 arrays (RGB images, single-band label).

Images: GeoTIFFs through rasterio, other formats through OpenCV (16-bit kept). Bands and bit
depth follow `segchange_jax.data.imagery` (RGBA/RGB+NIR drop the 4th band; non-uint8 data is
stretched 2-98 percentile per band). Labels must be one band; a label stored with 3 or 4
identical bands (a grey PNG saved as RGB) is accepted because collapsing it loses nothing.
Every failure raises `PairError` with a message that names the file.
"""

from __future__ import annotations

import os
import warnings

import cv2
import numpy as np

from segchange_jax.data import imagery

cv2.setNumThreads(1)  # one conversion process per core; no nested thread pools


class PairError(ValueError):
  """A pair cannot be converted; str() names the file and the problem."""


def _read_raw(path: str, what: str) -> np.ndarray:
  """File -> [H, W, C] array in file band order (RGB for colour images)."""
  if not os.path.isfile(path):
    raise PairError(f'missing {what}: {path}')
  if path.lower().endswith(('.tif', '.tiff')):
    import rasterio  # pylint: disable=g-import-not-at-top
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
          return np.moveaxis(src.read(), 0, -1)
    except rasterio.errors.RasterioError as e:
      raise PairError(f'unreadable {what}: {path} ({e})') from e
  array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if array is None:
    raise PairError(f'unreadable or corrupt {what}: {path}')
  if array.ndim == 2:
    return array[..., None]
  if array.shape[-1] == 3:
    return array[..., ::-1]
  if array.shape[-1] == 4:
    return cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
  return array


def read_rgb(path: str, what: str) -> np.ndarray:
  """Image file -> [H, W, 3] uint8 RGB."""
  raw = _read_raw(path, what)
  try:
    bands = imagery.select_bands(raw.shape[-1], None, path)
  except imagery.ImageryError as e:
    raise PairError(f'bad {what}: {e}') from e
  rgb = raw[..., [b - 1 for b in bands]]
  return np.ascontiguousarray(imagery.to_uint8(rgb))


def read_label(path: str) -> np.ndarray:
  """Label file -> [H, W] uint8 of raw values."""
  raw = _read_raw(path, 'label')
  if raw.shape[-1] > 1:
    same = all(np.array_equal(raw[..., 0], raw[..., i]) for i in range(1, min(3, raw.shape[-1])))
    if raw.shape[-1] > 4 or not same:
      raise PairError(f'multi-band label ({raw.shape[-1]} bands with different values): {path}; '
                      'labels must be single-band class maps (save it as a greyscale PNG)')
  label = raw[..., 0]
  if label.dtype != np.uint8:
    if label.dtype.kind not in 'iu' or label.min() < 0 or label.max() > 255:
      raise PairError(f'label {path} has dtype {label.dtype} with values outside 0..255')
    label = label.astype(np.uint8)
  return np.ascontiguousarray(label)
