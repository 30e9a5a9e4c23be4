"""segchange_jax.infer with a real (tiny, random) model checkpoint on synthetic GeoTIFFs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from segchange_jax import api
from segchange_jax import infer
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


def _infer(root, npz, *args):
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu',
         # The two CLI runs compile the same forward pass: share it through JAX's disk cache.
         'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  cmd = [sys.executable, '-m', 'segchange_jax.infer', '--checkpoint', str(root / 'ckpt'),
         '--embeddings', npz, '--prompt', PROMPT, '--window', '64', '--overlap', '16',
         '--batch', '2', '--noprogress', *args]
  proc = subprocess.run(cmd, cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_geotiff_keeps_georeferencing(model, tmp_path):
  root, _, _, npz = model
  a, b = h.pair_arrays(150, 173)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  out = tmp_path / 'change.tif'
  _infer(root, npz, '--a', a_path, '--b', b_path, '--out', str(out))
  with rasterio.open(out) as ds, rasterio.open(a_path) as src:
    assert (ds.crs, ds.transform) == (src.crs, src.transform)
    assert (ds.height, ds.width, ds.count, ds.dtypes[0]) == (150, 173, 1, 'uint8')
    mask = ds.read(1)
  assert set(np.unique(mask)) <= {0, 1}


def test_single_window_equals_model_and_polygons(model, tmp_path):
  """A 64 px scene is one window: the mask must be the model's own thresholded prediction."""
  root, config, variables, npz = model
  a, b = h.pair_arrays(64, 64, seed=3)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  out, gj = tmp_path / 'change.tif', tmp_path / 'change.geojson'
  _infer(root, npz, '--a', a_path, '--b', b_path, '--out', str(out), '--polygons', str(gj))
  with rasterio.open(out) as ds:
    mask = ds.read(1)
  emb = infer.prompt_embedding(config, PROMPT, npz)
  with np.load(npz) as z:
    np.testing.assert_array_equal(emb[0], z['embeddings'][1])
  det = api.ChangeDetector(config, variables)
  batch = lambda x: np.repeat(x.transpose(1, 2, 0)[None], 2, axis=0)  # the CLI's --batch 2
  probs = infer.detector_predictor(det, emb)(batch(a), batch(b))[0]
  want = probs > 0.5
  near = np.abs(probs - 0.5) < 1e-5  # float noise may flip only these
  assert 0 < want.sum() < want.size
  assert ((mask == 1) == want)[~near].all()
  with open(gj) as f:
    fc = json.load(f)
  assert fc['crs']['properties']['name'] == 'urn:ogc:def:crs:EPSG::32618'
  assert sum(f['properties']['area_px'] for f in fc['features']) == int((mask == 1).sum())


def test_prompt_embedding_errors(model):
  _, config, _, npz = model
  with pytest.raises(ValueError, match='no entry for --prompt'):
    infer.prompt_embedding(config, 'unknown', npz)
  bad = tiny.write_embeddings(os.path.join(os.path.dirname(npz), 'bad.npz'), [PROMPT], dim=16)
  with pytest.raises(ValueError, match=r'\[8, 32\]'):
    infer.prompt_embedding(config, PROMPT, bad)
