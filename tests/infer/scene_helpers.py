"""Shared helpers for scene inference tests: toy predictors and GeoTIFF writers."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage

CRS = 'EPSG:32618'
TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


def box_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Toy translation-equivariant local predictor: 3x3 box mean of |A-B| through a sigmoid."""
  d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
  d = ndimage.uniform_filter(d, size=(1, 3, 3), mode='nearest')
  return (1.0 / (1.0 + np.exp(-(d - 30.0) / 8.0))).astype(np.float32)


def write_tif(path, array_chw, crs=CRS, transform=TRANSFORM, nodata=None, **kw) -> str:
  c, h, w = array_chw.shape
  with rasterio.open(path, 'w', driver='GTiff', height=h, width=w, count=c, dtype=array_chw.dtype,
                     crs=crs, transform=transform, nodata=nodata, **kw) as ds:
    ds.write(array_chw)
  return str(path)


def pair_arrays(h: int, w: int, seed: int = 0, dtype=np.uint8, bands: int = 3):
  """Random smooth-ish A and B (CHW) with a bright square change in B."""
  rng = np.random.default_rng(seed)
  hi = 255 if dtype == np.uint8 else 12000
  a = rng.integers(0, hi // 2, (bands, h, w)).astype(dtype)
  b = a.copy()
  b[:, h // 4:h // 4 + h // 5, w // 3:w // 3 + w // 5] = hi
  return a, b


def run_infer_cli(capsys, *args: str) -> str:
  """infer's main through cli.guard, as `python -m segchange_jax.infer` runs it, expecting the
  one-line error exit (2); returns its stderr."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top

  from segchange_jax import cli  # pylint: disable=g-import-not-at-top
  from segchange_jax import infer  # pylint: disable=g-import-not-at-top
  with flagsaver.flagsaver():
    flags.FLAGS(['infer', '--checkpoint', 'unused-ckpt', '--noprogress', *args])
    with pytest.raises(SystemExit) as e:
      cli.guard(infer.main)(['infer'])
  assert e.value.code == 2
  return capsys.readouterr().err
