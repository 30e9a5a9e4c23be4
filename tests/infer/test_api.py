"""ChangeDetector.predict / predict_scene (the Python API) and the README snippet that shows
them."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image
import pytest
import rasterio

from segchange_jax.inference import predictor
from segchange_jax.interop import checkpoints
from tests.eval import tiny
from tests.infer import scene_helpers as h

PROMPT = 'Buildings appearing or vanishing.'


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
  root = tmp_path_factory.mktemp('api')
  # 'No changes.': the README snippet's second prompt.
  npz = tiny.write_embeddings(root / 'p.npz', ['other prompt', PROMPT, 'No changes.'])
  # The prompt table is the config's text.embeddings: no text encoder needed.
  config = tiny.tiny_config(embeddings=npz)
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  return root, predictor.ChangeDetector.from_checkpoint(str(root / 'ckpt')), variables


def test_predict_arrays_paths_and_the_windowed_engine_agree(detector, tmp_path):
  root, det, variables = detector
  a, b = h.pair_arrays(100, 150, seed=1)
  a_hwc, b_hwc = a.transpose(1, 2, 0), b.transpose(1, 2, 0)
  r = det.predict(a_hwc, b_hwc, prompt=PROMPT)
  assert r.probabilities.shape == (100, 150) and r.probabilities.dtype == np.float32
  assert r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1}
  np.testing.assert_array_equal(r.mask, (r.probabilities > 0.5).astype(np.uint8))
  assert 0 < r.mask.sum() < r.mask.size
  # The same pair as PNG paths, and as GeoTIFFs through predict_scene (the infer command).
  Image.fromarray(a_hwc).save(tmp_path / 'a.png')
  Image.fromarray(b_hwc).save(tmp_path / 'b.png')
  r_png = det.predict(str(tmp_path / 'a.png'), str(tmp_path / 'b.png'), prompt=PROMPT)
  np.testing.assert_array_equal(r_png.probabilities, r.probabilities)
  a_tif, b_tif = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  out = tmp_path / 'change.tif'
  stats = det.predict_scene(a_tif, b_tif, out=str(out), prompt=PROMPT,
                            probs_path=str(tmp_path / 'p.tif'))
  assert stats.windows == 6  # config.infer: 64 px windows, overlap 16 over 100 x 150
  with rasterio.open(out) as ds, rasterio.open(tmp_path / 'p.tif') as p:
    np.testing.assert_array_equal(ds.read(1), r.mask)
    np.testing.assert_allclose(p.read(1), r.probabilities, atol=1e-6)
    assert ds.tags()['PROMPT'] == PROMPT and ds.tags()['CHECKPOINT'] == str(root / 'ckpt')
  # The prompt matters and its embedding is computed once.
  other = det.predict(a_hwc, b_hwc, prompt='other prompt')
  assert not np.array_equal(other.probabilities, r.probabilities)
  assert set(det._prompts) == {PROMPT, 'other prompt'}  # pylint: disable=protected-access


def test_predict_rejects_bad_inputs(detector):
  _, det, _ = detector
  img = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match='uint8'):
    det.predict(img.astype(np.float32), img, prompt=PROMPT)
  with pytest.raises(ValueError, match='one size'):
    det.predict(img, img[:32], prompt=PROMPT)
  with pytest.raises(ValueError, match='threshold'):
    det.predict(img, img, prompt=PROMPT, threshold=1.5)


def test_readme_snippet_runs(detector, tmp_path, monkeypatch):
  """The README's Python API block, run as written on a tiny checkpoint in its demo paths."""
  root, _, _ = detector
  text = (tiny.REPO / 'README.md').read_text()
  block = re.search(r'<!-- ci:api-snippet -->\s*```python\n(.*?)```', text, re.S)
  assert block, 'README lacks the <!-- ci:api-snippet --> python block'
  code = block.group(1)
  monkeypatch.chdir(tmp_path)
  os.makedirs('runs/demo')
  os.symlink(root / 'ckpt', 'runs/demo/checkpoints')
  names = re.findall(r"'(data/demo/test/[AB]/[\w.]+\.png)'", code)
  assert len(names) == 2, code
  a, b = h.pair_arrays(128, 128, seed=2)
  for name, img in zip(names, (a, b)):
    os.makedirs(os.path.dirname(name), exist_ok=True)
    Image.fromarray(img.transpose(1, 2, 0)).save(name)
  namespace: dict = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  result = namespace['result']
  assert result.probabilities.shape == (128, 128)
  with rasterio.open('change.tif') as ds:
    assert ds.crs is not None and ds.tags(ns='IMAGE_STRUCTURE')['LAYOUT'] == 'COG'
    np.testing.assert_array_equal(ds.read(1), result.mask)
  assert os.path.isfile('change.gpkg')


def test_training_checkpoint_restores_variables_only(detector, tmp_path):
  """A training checkpoint (state with optimizer moments) yields just params + model state."""
  import jax  # pylint: disable=g-import-not-at-top

  from segchange_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  _, det, variables = detector
  params = variables['params']
  others = {k: v for k, v in variables.items() if k != 'params'}
  state = {'step': np.int32(7), 'params': params, 'model_state': others,
           'opt_state': {'mu': jax.tree.map(np.ones_like, params),
                         'nu': jax.tree.map(np.ones_like, params)}}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), det.config)
  ckpt.save(7, state)
  ckpt.close()
  config, loaded = checkpoints.load_variables(str(tmp_path / 'checkpoints'))
  assert set(loaded) == set(variables)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(x, y)
  assert config.text.dim == det.config.text.dim
  step_dir = tmp_path / 'checkpoints' / 'latest' / '7' / 'state'
  assert set(checkpoints.restore_tree(str(step_dir), keys=('params',))) == {'params'}
