"""Scene inference on the real GeoTIFFs in ../shared/data/geotiff (skips where absent)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from segchange_jax.inference import pipeline
from segchange_jax.inference import raster_io
from tests.infer import scene_helpers as h

L8 = 'geotiff/landsat8/LC08_L1TP_224078_20200518_20200518_01_RT.TIF'
L8_77 = 'geotiff/landsat8/LC08_L1TP_224077_20200518_20200518_01_RT_B{}.TIF'
KW = dict(window=128, overlap=32, batch=4, progress=False)


def _copy_with_change(src_path, dst, box, window=None, bands=slice(None)):
  """Writes src (or a window of it) to dst with a strong change in `box` (r0, r1, c0, c1).

  uint8: top bit flipped (|A-B| = 128 everywhere in the box); uint16: +8000 (Landsat DN).
  """
  with rasterio.open(src_path) as src:
    arr = src.read(window=window)
    prof = src.profile
    colorinterp = src.colorinterp
    if window is not None:
      prof.update(height=window.height, width=window.width, transform=src.window_transform(window))
  prof.pop('blockxsize', None), prof.pop('blockysize', None), prof.pop('tiled', None)
  out = arr.copy()
  r0, r1, c0, c1 = box
  if arr.dtype == np.uint8:
    out[bands, r0:r1, c0:c1] ^= 0x80
  else:
    out[bands, r0:r1, c0:c1] += 8000
  with rasterio.open(dst, 'w', **prof) as ds:
    ds.write(out)
  with rasterio.open(dst, 'r+') as ds:
    ds.colorinterp = colorinterp  # else GDAL calls a 4th uint8 band alpha
  return str(dst)


def _read(path):
  with rasterio.open(path) as ds:
    return ds.read(1), ds.profile


def test_rgb_byte_georef_and_nodata(shared_data, tmp_path):
  a_path = str(shared_data / 'geotiff/RGB.byte.tif')
  b_path = _copy_with_change(a_path, tmp_path / 'b.tif', (300, 360, 350, 410))
  out = str(tmp_path / 'change.tif')
  pipeline.run_inference(a_path, b_path, out, h.box_change, **KW)
  mask, prof = _read(out)
  with rasterio.open(a_path) as src:
    assert prof['crs'] == src.crs and prof['transform'] == src.transform
    assert (prof['width'], prof['height']) == (src.width, src.height)
    valid = src.dataset_mask() > 0
  np.testing.assert_array_equal(mask == 255, ~valid)
  assert mask[302:358, 352:408].all()
  assert mask[valid].sum() < 1.2 * 60 * 60  # nothing else changed


def test_landsat_uint16_crop(shared_data, tmp_path):
  win = Window(300, 500, 256, 256)
  a_path = _copy_with_change(str(shared_data / L8), tmp_path / 'a.tif', (0, 0, 0, 0), window=win)
  # Under 2 % of the pixels, so B's stretch statistics stay close to A's.
  b_path = _copy_with_change(str(shared_data / L8), tmp_path / 'b.tif', (40, 60, 60, 90),
                             window=win)
  out = str(tmp_path / 'change.tif')
  # 224078 holds B2, B3, B4 (blue, green, red): RGB is bands 3, 2, 1; Landsat fill is 0.
  pipeline.run_inference(a_path, b_path, out, h.box_change, bands=[3, 2, 1], nodata=0, **KW)
  mask, prof = _read(out)
  assert prof['crs'].to_epsg() == 32621
  # Pixels already above A's 98th percentile clip to 255 in both dates: not all of the box.
  assert mask[42:58, 62:88].mean() > 0.95 and mask.sum() < 1.3 * 20 * 30 and (mask != 255).all()


def test_landsat_single_band_stack_needs_align(shared_data, tmp_path):
  win = Window(300, 500, 256, 256)
  a_path = _copy_with_change(str(shared_data / L8), tmp_path / 'a.tif', (0, 0, 0, 0), window=win)
  # Adjacent WRS row as three single-band files, R,G,B = B4,B3,B2.
  b_stack = ','.join(str(shared_data / L8_77.format(k)) for k in (4, 3, 2))
  out = str(tmp_path / 'change.tif')
  with pytest.raises(raster_io.GridMismatchError, match='--align'):
    pipeline.run_inference(a_path, b_stack, out, h.box_change, bands=[3, 2, 1], nodata=0, **KW)
  # --bands picks A's R,G,B (224078 holds B2,B3,B4); the stack is already R,G,B.
  pipeline.run_inference(a_path, b_stack, out, h.box_change, bands=[3, 2, 1], nodata=0, align=True,
                      probabilities=True, **KW)
  probs, prof = _read(out)
  assert prof['transform'] == rasterio.open(a_path).transform
  # The crop lies inside both footprints: everything valid, and the same ground on the same
  # day gives little change.
  assert not np.isnan(probs).any()
  assert np.mean(probs > 0.5) < 0.05


def test_rgbn_drops_nir_or_selects(shared_data, tmp_path):
  a_path = str(shared_data / 'geotiff/rgbn_4band.tif')
  b_path = _copy_with_change(a_path, tmp_path / 'b.tif', (100, 160, 200, 260))
  b_nir = _copy_with_change(a_path, tmp_path / 'bn.tif', (100, 160, 200, 260), bands=[3])
  run = lambda name, **kw: (pipeline.run_inference(a_path, b_path, str(tmp_path / name),
                                                   h.box_change, probabilities=True, **KW, **kw),
                            _read(str(tmp_path / name))[0])[1]
  default = run('d.tif')
  np.testing.assert_array_equal(default, run('s.tif', bands=[1, 2, 3]))
  assert (default[102:158, 202:258] > 0.5).all() and not np.isnan(default).any()
  # A change in NIR only: invisible by default, seen with --bands 4,3,2.
  b_path = b_nir
  assert (run('n0.tif') < 0.5).all()
  assert (run('n1.tif', bands=[4, 3, 2])[102:158, 202:258] > 0.2).all()
