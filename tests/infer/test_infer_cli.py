"""End-to-end scene inference (segchange_jax.infer) on small synthetic GeoTIFFs and PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from affine import Affine
import numpy as np
from PIL import Image
import pyogrio
import pyogrio.raw
import pytest
import rasterio
from rasterio.enums import ColorInterp
import rasterio.warp
import shapely
import shapely.geometry

from segchange_jax.data import imagery
from segchange_jax.inference import pipeline
from segchange_jax.inference import postprocess
from tests.infer import scene_helpers as h

KW = dict(window=64, overlap=16, batch=4, progress=False)


@pytest.fixture
def pair(tmp_path):
  a, b = h.pair_arrays(150, 173)
  return h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b), a, b


def _read(path):
  with rasterio.open(path) as ds:
    return ds.read(), ds.profile


def test_georeferencing_tiling_and_mask(pair, tmp_path):
  a_path, b_path, a, b = pair
  out = str(tmp_path / 'out' / 'change.tif')
  pipeline.run_inference(a_path, b_path, out, h.box_change, **KW)
  arr, prof = _read(out)
  with rasterio.open(a_path) as src:
    assert prof['crs'] == src.crs and prof['transform'] == src.transform
  assert (prof['dtype'], prof['count'], prof['nodata']) == ('uint8', 1, 255)
  assert prof['tiled'] and prof['blockxsize'] == 256 and prof['compress'] == 'deflate'
  expected = h.box_change(a.transpose(1, 2, 0)[None], b.transpose(1, 2, 0)[None])[0] > 0.5
  # Changed square found; the windowed mask equals the whole-image mask away from seams.
  assert (arr[0] == expected).mean() > 0.999
  assert arr[0][40:60, 60:85].all() and set(np.unique(arr)) <= {0, 1}
  assert not os.path.exists(out + '.partial')


def test_probabilities_and_nodata(tmp_path):
  a, b = h.pair_arrays(100, 90)
  a[:, :10, :] = 0   # nodata strip in A
  b[:, :, -7:] = 0   # nodata strip in B
  a_path = h.write_tif(tmp_path / 'a.tif', a, nodata=0)
  b_path = h.write_tif(tmp_path / 'b.tif', b, nodata=0)
  out = str(tmp_path / 'p.tif')
  pipeline.run_inference(a_path, b_path, out, h.box_change, probabilities=True, **KW)
  arr, prof = _read(out)
  assert prof['dtype'] == 'float32' and np.isnan(prof['nodata'])
  nod = np.isnan(arr[0])
  assert nod[:10].all() and nod[:, -7:].all() and not nod[10:, :-7].any()
  assert np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1
  out_m = str(tmp_path / 'm.tif')
  pipeline.run_inference(a_path, b_path, out_m, h.box_change, **KW)
  m, _ = _read(out_m)
  assert (m[0][:10] == 255).all() and (m[0][:, -7:] == 255).all() and (m[0][10:, :-7] < 2).all()


def _probs(a_path, b_path, out, **kw):
  pipeline.run_inference(a_path, b_path, out, h.box_change, probabilities=True, **{**KW, **kw})
  return _read(out)[0]


def test_four_bands_drop_the_fourth_or_select(pair, tmp_path):
  _, _, a, b = pair
  rng = np.random.default_rng(5)
  nir_a, nir_b = rng.integers(0, 255, (2, 1) + a.shape[1:], dtype=np.uint8)
  a4 = h.write_tif(tmp_path / 'a4.tif', np.concatenate([a, nir_a]))
  b4 = h.write_tif(tmp_path / 'b4.tif', np.concatenate([b, nir_b]))
  # GDAL calls a 4th uint8 band alpha by default: honoured as a mask (tested below);
  # declare it NIR here like a real RGBN product.
  for path in (a4, b4):
    with rasterio.open(path, 'r+') as ds:
      ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
  ref = _probs(pair[0], pair[1], str(tmp_path / 'r.tif'))
  np.testing.assert_array_equal(_probs(a4, b4, str(tmp_path / 'x.tif')), ref)
  sel = _probs(a4, b4, str(tmp_path / 'y.tif'), bands=[4, 2, 3])
  assert not np.array_equal(sel, ref)
  with pytest.raises(imagery.ImageryError, match='bands'):
    _probs(a4, b4, str(tmp_path / 'z.tif'), bands=[1, 2, 5])


def test_alpha_band_is_a_nodata_mask(pair, tmp_path):
  _, _, a, b = pair
  alpha = np.full((1,) + a.shape[1:], 255, np.uint8)
  alpha[0, 100:, :] = 0
  a4 = h.write_tif(tmp_path / 'a4.tif', np.concatenate([a, alpha]))
  out = _probs(a4, pair[1], str(tmp_path / 'o.tif'))
  assert np.isnan(out[0, 100:]).all() and not np.isnan(out[0, :100]).any()


def test_uint16_uses_whole_raster_stretch(tmp_path):
  a, b = h.pair_arrays(120, 110, dtype=np.uint16)
  a_path = h.write_tif(tmp_path / 'a.tif', a)
  b_path = h.write_tif(tmp_path / 'b.tif', b)
  got = _probs(a_path, b_path, str(tmp_path / 'o.tif'))
  # Small raster: the decimated statistics read is the full raster.
  a8 = imagery.to_uint8(a.transpose(1, 2, 0))
  b8 = imagery.to_uint8(b.transpose(1, 2, 0))
  ref = _probs(h.write_tif(tmp_path / 'a8.tif', a8.transpose(2, 0, 1)),
               h.write_tif(tmp_path / 'b8.tif', b8.transpose(2, 0, 1)), str(tmp_path / 'r.tif'))
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_mismatched_grid_refused_then_aligned(tmp_path):
  a, b = h.pair_arrays(96, 96)
  a_path = h.write_tif(tmp_path / 'a.tif', a)
  shifted = h.TRANSFORM * Affine.translation(3, 2)  # 3 px east, 2 px south
  b_path = h.write_tif(tmp_path / 'b.tif', b, transform=shifted)
  out = str(tmp_path / 'o.tif')
  with pytest.raises(pipeline.raster_io.GridMismatchError, match='--align'):
    pipeline.run_inference(a_path, b_path, out, h.box_change, **KW)
  assert not os.path.exists(out) and not os.path.exists(out + '.partial')
  pipeline.run_inference(a_path, b_path, out, h.box_change, align=True, probabilities=True, **KW)
  arr, prof = _read(out)
  assert prof['transform'] == h.TRANSFORM
  nod = np.isnan(arr[0])
  # B covers A's grid from row 2 / column 3 on; the rest of A is outside B -> nodata.
  assert nod[:2].all() and nod[:, :3].all() and not nod[3:, 4:].any()


def test_cli_help_and_grid_error(tmp_path, repo_root):
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-m', 'segchange_jax.infer', '--help'], cwd=repo_root,
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and 'Change detection on a pair' in r.stdout
  assert '--overlap' in r.stdout and '--align' in r.stdout
  a, b = h.pair_arrays(64, 64)
  a_path = h.write_tif(tmp_path / 'a.tif', a)
  b_path = h.write_tif(tmp_path / 'b.tif', b, crs='EPSG:32619')
  out = tmp_path / 'o.tif'
  r = subprocess.run([sys.executable, '-m', 'segchange_jax.infer', '--checkpoint', 'none',
                      '--a', a_path, '--b', b_path, '--out', str(out), '--window', '64',
                      '--overlap', '16'],
                     cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and 'different pixel grids' in r.stderr and '--align' in r.stderr
  assert not out.exists() and not (tmp_path / 'o.tif.partial').exists()


def test_png_pairs(tmp_path):
  a, b = h.pair_arrays(70, 90)
  Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / 'a.png')
  Image.fromarray(b.transpose(1, 2, 0)).save(tmp_path / 'b.png')
  out = str(tmp_path / 'o.png')
  pipeline.run_inference(str(tmp_path / 'a.png'), str(tmp_path / 'b.png'), out, h.box_change,
                      preview_path=str(tmp_path / 'preview.png'),
                      polygons_path=str(tmp_path / 'v.gpkg'), **KW)
  preview = np.asarray(Image.open(tmp_path / 'preview.png'))
  assert preview.shape == (70, 3 * 90 + 8, 3)
  np.testing.assert_array_equal(preview[:, :90], a.transpose(1, 2, 0))  # panel A as is
  assert pyogrio.read_info(str(tmp_path / 'v.gpkg'))['crs'] is None  # pixel coordinates
  m = np.asarray(Image.open(out))
  expected = h.box_change(a.transpose(1, 2, 0)[None], b.transpose(1, 2, 0)[None])[0] > 0.5
  assert set(np.unique(m)) == {0, 255} and ((m == 255) == expected).mean() > 0.999
  overlay = preview[:, -90:]
  assert (overlay[m == 255] == (255, 0, 0)).all() and (overlay[m == 0, 0] < 255).all()
  with pytest.raises(ValueError, match='probabilities need a .tif'):
    pipeline.run_inference(str(tmp_path / 'a.png'), str(tmp_path / 'b.png'), out, h.box_change,
                        probabilities=True, **KW)


def test_failure_leaves_no_output(pair, tmp_path):
  calls = []
  def flaky(x, y):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('accelerator fell over')
    return h.box_change(x, y)
  out = str(tmp_path / 'o.tif')
  with pytest.raises(RuntimeError, match='fell over'):
    pipeline.run_inference(pair[0], pair[1], out, flaky,
                           polygons_path=str(tmp_path / 'p.geojson'), **KW)
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif']


def test_postprocess_and_polygons_in_map_units(tmp_path):
  hh, ww = 200, 220
  a = np.full((3, hh, ww), 60, np.uint8)
  b = a.copy()
  b[:, 20:80, 30:90] = 250       # 60x60 square: kept (area 3600 px = 360000 m^2 at 10 m)
  b[:, 150:155, 20:25] = 250     # 5x5 blob: too small
  b[:, 120:180, 120:135] = 250   # L shape: convexity ~0.6 < 0.8
  b[:, 165:180, 135:180] = 250
  a_path = h.write_tif(tmp_path / 'a.tif', a)
  b_path = h.write_tif(tmp_path / 'b.tif', b)
  pointwise = lambda x, y: (np.abs(x.astype(np.float32) - y).mean(-1) > 50).astype(np.float32)
  out, gj, gpkg = (str(tmp_path / n) for n in ('o.tif', 'o.geojson', 'o.gpkg'))
  pipeline.run_inference(a_path, b_path, out, pointwise, do_postprocess=True, min_area=100,
                      polygons_path=[gj, gpkg], **KW)
  m, _ = _read(out)
  assert m[0].sum() == 3600 and m[0][20:80, 30:90].all()
  # GeoPackage: the raster's CRS, area in map units.
  info = pyogrio.read_info(gpkg)
  assert info['crs'] == 'EPSG:32618' and info['features'] == 1 and info['driver'] == 'GPKG'
  _, _, geoms, fields = pyogrio.raw.read(gpkg)
  assert fields[1][0] == pytest.approx(360000.0) and fields[2][0] == 3600
  xs = shapely.from_wkb(geoms[0]).exterior.coords.xy[0]
  assert min(xs) == pytest.approx(500000.0 + 30 * 10)
  assert max(xs) == pytest.approx(500000.0 + 90 * 10)
  # GeoJSON: RFC 7946 (WGS 84 lon/lat, no crs member, counter-clockwise exterior).
  fc = json.load(open(gj))
  assert 'crs' not in fc
  (feat,) = fc['features']
  assert feat['properties'] == {'value': 1, 'area': pytest.approx(360000.0), 'area_px': 3600}
  ring = shapely.geometry.shape(feat['geometry'])
  assert ring.exterior.is_ccw
  west, south, east, north = rasterio.warp.transform_bounds(
      'EPSG:32618', 'EPSG:4326', 500300.0, 4000000.0 - 800, 500900.0, 4000000.0 - 200)
  np.testing.assert_allclose(ring.bounds, (west, south, east, north), atol=2e-5)
  # Without the filter, all three regions become polygons (existing outputs need overwrite).
  with pytest.raises(pipeline.atomic.OutputError, match='--overwrite'):
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'n.tif'), pointwise, polygons_path=gj,
                        **KW)
  assert not os.path.exists(tmp_path / 'n.tif')
  pipeline.run_inference(a_path, b_path, str(tmp_path / 'n.tif'), pointwise, polygons_path=gj,
                      overwrite=True, **KW)
  assert len(json.load(open(gj))['features']) == 3


def test_shape_rules_vectorised():
  mask = np.zeros((80, 80), np.uint8)
  mask[5:25, 5:25] = 1          # square: perimeter 80, area 400, convexity 1
  mask[40, 5:75] = 1            # line: perimeter 142, area 70 -> ratio ~2.03
  labels, area, perim, _ = postprocess.component_shapes(mask > 0)
  k = labels[10, 10]
  assert area[k] == 400 and perim[k] == 80
  assert postprocess.convex_area(labels, int(k), np.array([5, 5, 20, 20])) == pytest.approx(400)
  out = postprocess.filter_components(mask, 50, 1.0, 0.8)
  assert out[40].sum() == 0 and out[5:25, 5:25].all()


def test_detector_adapter_normalises_and_activates():
  seen = {}

  class Fake:
    def predict_logits(self, ia, ib, emb):
      seen.update(a=ia, emb=emb)
      return np.stack([ia[..., 0] - ib[..., 0], ib[..., 0] - ia[..., 0]], -1)

  emb = np.ones((1, 8, 4), np.float32)
  pred = pipeline.detector_predictor(Fake(), emb)
  x = np.full((2, 4, 4, 3), [124, 116, 104], np.uint8)
  y = x.copy()
  y[..., 0] = 255
  p = pred(x, y)
  assert seen['a'].dtype == np.float32 and np.abs(seen['a']).max() < 0.01  # ImageNet mean -> ~0
  assert seen['emb'].shape == (2, 8, 4)
  z = (255 - 124) / (0.229 * 255)
  np.testing.assert_allclose(p[..., 1], 1 / (1 + np.exp(-2 * z)), rtol=1e-5)
  np.testing.assert_allclose(pipeline.logits_to_probs(np.zeros((1, 2, 2, 1))), 0.5)
