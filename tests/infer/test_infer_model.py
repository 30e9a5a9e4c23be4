"""segchange_jax.infer with a real (tiny, random) model checkpoint on synthetic GeoTIFFs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pyogrio
import pyogrio.raw
import pytest
import rasterio

import segchange_jax
from segchange_jax.inference import pipeline
from segchange_jax.inference import predictor
from segchange_jax.text import prompts
from tests.eval import tiny
from tests.infer import scene_helpers as h

PROMPT = 'Buildings appearing or vanishing.'


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp('infer_model')
  config = tiny.tiny_config()
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  npz = tiny.write_embeddings(root / 'p.npz', ['other prompt', PROMPT])
  return root, config, variables, npz


def _infer(root, npz, *args, window=True):
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu',
         # The two CLI runs compile the same forward pass: share it through JAX's disk cache.
         'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  cmd = [sys.executable, '-m', 'segchange_jax.infer', '--checkpoint', str(root / 'ckpt'),
         '--embeddings', npz, '--noprogress', *args]
  if window:
    cmd += ['--window', '64', '--overlap', '16', '--batch', '2']
  proc = subprocess.run(cmd, cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_gis_outputs_with_settings_from_the_checkpoint(model, tmp_path):
  """No --window/--overlap/--batch/--threshold/--prompt: all come from the checkpoint config.

  Every output reads back, through GDAL/OGR, as the format it claims; the log is quiet.
  """
  root, config, _, npz = model
  a, b = h.pair_arrays(300, 330)  # > 256 px: the COG gets an overview level
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  out, probs = tmp_path / 'change.tif', tmp_path / 'probs.tif'
  gpkg, fgb, gj, prev = (tmp_path / n for n in ('v.gpkg', 'v.fgb', 'v.geojson', 'p.png'))
  proc = _infer(root, npz, '--a', a_path, '--b', b_path, '--out', str(out), '--probability_out',
                str(probs), '--polygons', str(gpkg), '--polygons', str(fgb), '--polygons',
                str(gj), '--preview', str(prev), window=False)
  for noise in ('INFO', '_CHECKPOINT_METADATA', 'PyTorch was not found', 'Traceback'):
    assert noise not in proc.stderr, proc.stderr[-2000:]
  with rasterio.open(out) as ds, rasterio.open(a_path) as src:
    assert ds.driver == 'GTiff' and ds.tags(ns='IMAGE_STRUCTURE')['LAYOUT'] == 'COG'
    assert (ds.crs, ds.transform) == (src.crs, src.transform)
    assert (ds.height, ds.width, ds.count, ds.dtypes[0], ds.nodata) == (300, 330, 1, 'uint8', 255)
    assert ds.block_shapes == [(256, 256)] and ds.overviews(1) == [2]
    assert ds.colormap(1)[1] == (255, 0, 0, 255)
    tags = ds.tags()
    mask = ds.read(1)
  assert tags['CHECKPOINT'] == str(root / 'ckpt') and tags['PROMPT'] == config.data.prompt
  assert (tags['THRESHOLD'], tags['WINDOW'], tags['OVERLAP']) == ('0.5', '64', '16')
  assert tags['SEGCHANGE_JAX_VERSION'] == segchange_jax.__version__
  assert set(np.unique(mask)) <= {0, 1} and 0 < mask.sum() < mask.size
  with rasterio.open(probs) as ds:
    assert ds.tags(ns='IMAGE_STRUCTURE')['LAYOUT'] == 'COG' and ds.dtypes[0] == 'float32'
    assert ds.overviews(1) == [2]
    p = ds.read(1)
  np.testing.assert_array_equal(p > 0.5, mask == 1)
  n_changed = int(mask.sum())
  for path, driver in ((gpkg, 'GPKG'), (fgb, 'FlatGeobuf')):
    info = pyogrio.read_info(path)
    assert info['driver'] == driver and info['crs'] == 'EPSG:32618', info
    _, _, _, fields = pyogrio.raw.read(path)
    assert fields[2].sum() == n_changed  # area_px
    np.testing.assert_allclose(fields[1], fields[2] * 100.0)  # 10 m pixels
  with open(gj) as f:
    fc = json.load(f)
  assert 'crs' not in fc and sum(f['properties']['area_px'] for f in fc['features']) == n_changed
  lon, lat = fc['features'][0]['geometry']['coordinates'][0][0]
  assert -76 < lon < -74 and 36 < lat < 37  # UTM 18N at 500 km E, 4000 km N
  preview = np.asarray(Image.open(prev))
  assert preview.shape == (300, 3 * 330 + 8, 3)


def test_single_window_equals_model(model, tmp_path):
  """A 64 px scene is one window: the mask must be the model's own thresholded prediction."""
  root, config, variables, npz = model
  a, b = h.pair_arrays(64, 64, seed=3)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  out = tmp_path / 'change.tif'
  _infer(root, npz, '--a', a_path, '--b', b_path, '--out', str(out), '--prompt', PROMPT)
  with rasterio.open(out) as ds:
    mask = ds.read(1)
  emb = prompts.embed_one(config, PROMPT, npz=npz)
  with np.load(npz) as z:
    np.testing.assert_array_equal(emb[0], z['embeddings'][1])
  det = predictor.ChangeDetector(config, variables)
  batch = lambda x: np.repeat(x.transpose(1, 2, 0)[None], 2, axis=0)  # the CLI's --batch 2
  probs = pipeline.detector_predictor(det, emb)(batch(a), batch(b))[0]
  want = probs > 0.5
  near = np.abs(probs - 0.5) < 1e-5  # float noise may flip only these
  assert 0 < want.sum() < want.size
  assert ((mask == 1) == want)[~near].all()


def test_prompt_embedding_errors(model):
  _, config, _, npz = model
  with pytest.raises(prompts.PromptError, match="no entry for 'unknown'"):
    prompts.embed_one(config, 'unknown', npz=npz)
  bad = tiny.write_embeddings(os.path.join(os.path.dirname(npz), 'bad.npz'), [PROMPT], dim=16)
  with pytest.raises(prompts.PromptError, match=r'\[8, 32\]'):
    prompts.embed_one(config, PROMPT, npz=bad)
  with pytest.raises(prompts.PromptError, match='does not exist'):
    prompts.embed_one(config, PROMPT, npz=str(bad) + '.missing')


def test_sigmoid_of_confident_logits_does_not_overflow():
  # A trained model's logits reach -100 and beyond; 1 / (1 + exp(-x)) overflows there.
  x = np.array([-1000.0, -100.0, 0.0, 3.0, 1000.0], np.float32)
  with np.errstate(over='raise'):
    p = pipeline.sigmoid(x)
  np.testing.assert_allclose(p, [0.0, 0.0, 0.5, 1 / (1 + np.exp(-3.0)), 1.0], atol=1e-7)
