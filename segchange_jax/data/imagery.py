"""Band selection and bit-depth rules shared by data conversion and scene inference.

The model sees 3-band RGB uint8 (then ImageNet-normalised). Source rasters vary:
- 1 band: refused (change detection on RGB models needs 3 bands; stack bands first).
- 3 bands: used as R, G, B.
- 4 bands: RGBA or RGB+NIR; the 4th band is dropped (use `bands=` to pick others).
- more bands: `bands=` (1-based, rasterio style) must say which three are R, G, B.
- uint8: used as is.
- uint16 / other integer or float types: each band is linearly stretched from its 2nd to its
  98th percentile (over valid pixels of the WHOLE image, nodata excluded) onto 0..255 and
  clipped. For scenes, the percentiles come from a decimated read of the full raster so every
  window uses the same mapping (no seams); A and B each use their own statistics, which also
  removes global radiometric differences between the two dates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

STRETCH_PERCENTILES = (2.0, 98.0)


# The ImageNet statistics every backbone was pretrained with; the model always sees
# (RGB / 255 - mean) / std, in training (input_pipeline), inference (pipeline) and export.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB (any leading dims, channels last) -> float32 ImageNet-normalised."""
  return (image.astype(np.float32) * (1.0 / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


class ImageryError(ValueError):
  """An image cannot be turned into 3-band RGB; the message names the file and the fix."""


def select_bands(count: int, bands: Sequence[int] | None, source: str) -> list[int]:
  """1-based band indexes (rasterio convention) to read as R, G, B."""
  if bands:
    bands = [int(b) for b in bands]
    if len(bands) != 3 or any(b < 1 or b > count for b in bands):
      raise ImageryError(f'{source}: bands={bands} must be three indexes in 1..{count}')
    return bands
  if count in (3, 4):
    return [1, 2, 3]
  if count < 3:
    raise ImageryError(f'{source} has {count} band(s); the model needs 3 (RGB). Stack three '
                       'single-band files into one (e.g. gdalbuildvrt -separate) first.')
  raise ImageryError(f'{source} has {count} bands; say which three are R, G, B with '
                     'bands=(r, g, b)')


def stretch_stats(array: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """Per-band (lo, hi) percentiles of an [H, W, C] array over valid pixels -> [C, 2]."""
  c = array.shape[-1]
  flat = array.reshape(-1, c).astype(np.float64)
  if valid is not None:
    flat = flat[valid.reshape(-1)]
  if flat.size == 0:
    return np.tile(np.array([[0.0, 1.0]]), (c, 1))
  stats = np.percentile(flat, STRETCH_PERCENTILES, axis=0).T
  stats[:, 1] = np.maximum(stats[:, 1], stats[:, 0] + 1e-6)
  return stats


def to_uint8(array: np.ndarray, stats: np.ndarray | None = None,
             valid: np.ndarray | None = None) -> np.ndarray:
  """[H, W, C] image of any numeric dtype -> uint8 by the rule in the module docstring."""
  if array.dtype == np.uint8:
    return array
  if stats is None:
    stats = stretch_stats(array, valid)
  lo, hi = stats[:, 0], stats[:, 1]
  scaled = (array.astype(np.float32) - lo) / (hi - lo) * 255.0
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
