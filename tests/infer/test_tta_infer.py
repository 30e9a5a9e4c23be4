"""Test-time augmentation in inference: ChangeDetector.predict_logits / predict / predict_scene
and `python -m segchange_jax.infer --tta` on a tiny random checkpoint."""

from __future__ import annotations

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import rasterio

from segchange_jax import infer
from segchange_jax.data import imagery
from segchange_jax.inference import predictor
from tests.eval import tiny
from tests.infer import scene_helpers as h
from tests.models.test_tta import NUMPY
from tests.models.test_tta import NUMPY_INVERSE

PROMPT = 'Buildings appearing or vanishing.'

if 'checkpoint' not in flags.FLAGS:  # the command defines its flags only when run as one
  infer.define_flags()


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
  root = tmp_path_factory.mktemp('tta')
  npz = tiny.write_embeddings(root / 'p.npz', [PROMPT])
  config = tiny.tiny_config(embeddings=npz)
  config.infer.batch_size = 2  # d4: 16 windows per model call, compiled in seconds
  tiny.save_checkpoint(root / 'ckpt', config)
  return root, predictor.ChangeDetector.from_checkpoint(str(root / 'ckpt'))


class _CountingModel:
  """Records the batch shape of every traced model call."""

  def __init__(self, model):
    self.model, self.shapes = model, []

  def apply(self, variables, a, b, t, **kw):
    self.shapes.append(tuple(a.shape))
    return self.model.apply(variables, a, b, t, **kw)


def _inputs(det, n=2, size=tiny.SIZE):
  a, b = h.pair_arrays(n * size, size, seed=3)
  a = imagery.normalize(a.transpose(1, 2, 0).reshape(n, size, size, 3))
  b = imagery.normalize(b.transpose(1, 2, 0).reshape(n, size, size, 3))
  return a, b, np.repeat(det.embed(PROMPT), n, axis=0)


def test_predict_logits_averages_the_views_in_one_model_call(detector):
  _, det = detector
  a, b, t = _inputs(det, n=1)
  plain = det.predict_logits(a, b, t)
  np.testing.assert_array_equal(det.predict_logits(a, b, t, tta='none'), plain)
  counting = _CountingModel(det.model)
  det.model = counting  # the jitted forward reads self.model when it traces
  try:
    got = det.predict_logits(a, b, t, tta='d4')
  finally:
    det.model = counting.model
  assert counting.shapes == [(8, tiny.SIZE, tiny.SIZE, 3)]  # 8 views x 1 window, one call
  # The same as one plain call on the numpy-rotated views, each mapped back with numpy. (Same
  # batch of 8: this random model's logits move by up to ~1e-2 between batch sizes, the float
  # noise of an ill-conditioned untrained net, which is not what is tested here.)
  stacked = det.predict_logits(np.concatenate([NUMPY[v](a) for v in NUMPY]),
                               np.concatenate([NUMPY[v](b) for v in NUMPY]),
                               np.concatenate([t] * len(NUMPY)))
  want = np.mean([NUMPY_INVERSE[v](stacked[i:i + 1]) for i, v in enumerate(NUMPY)], 0)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
  assert np.abs(got - plain).max() > 1e-3 * scale  # this model is not rotation invariant


@pytest.mark.slow  # ~35 s; the default run keeps the one-call test above
def test_predict_and_predict_scene_with_tta(detector, tmp_path):
  root, det = detector
  a, b = h.pair_arrays(tiny.SIZE, tiny.SIZE, seed=4)
  a_hwc, b_hwc = a.transpose(1, 2, 0), b.transpose(1, 2, 0)
  plain = det.predict(a_hwc, b_hwc, prompt=PROMPT)
  np.testing.assert_array_equal(det.predict(a_hwc, b_hwc, prompt=PROMPT, tta='none').probabilities,
                                plain.probabilities)
  # One window: predict's probabilities are the sigmoid of the averaged logits (predict pads
  # its batch to infer.batch_size = 2: the same batch here, so no batch-size float noise).
  r = det.predict(a_hwc, b_hwc, prompt=PROMPT, tta='flips')
  pair = [imagery.normalize(np.stack([x, np.zeros_like(x)])) for x in (a_hwc, b_hwc)]
  z = det.predict_logits(*pair, np.repeat(det.embed(PROMPT), 2, axis=0), tta='flips')[0, ..., 0]
  np.testing.assert_allclose(r.probabilities, 1 / (1 + np.exp(-z)), atol=1e-6)
  assert np.abs(r.probabilities - plain.probabilities).max() > 1e-3
  # A non-square scene: its windows are square, so d4 runs; the GeoTIFF says which TTA.
  a, b = h.pair_arrays(100, 150, seed=5)
  a_tif, b_tif = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  d4 = det.predict(a.transpose(1, 2, 0), b.transpose(1, 2, 0), prompt=PROMPT, tta='d4')
  det.predict_scene(a_tif, b_tif, out=str(tmp_path / 'c.tif'), prompt=PROMPT, tta='d4',
                    probs_path=str(tmp_path / 'p.tif'))
  with rasterio.open(tmp_path / 'c.tif') as ds, rasterio.open(tmp_path / 'p.tif') as p:
    assert ds.tags()['TTA'] == 'd4'
    np.testing.assert_allclose(p.read(1), d4.probabilities, atol=1e-6)
  with pytest.raises(ValueError, match="'spin' is not one of"):
    det.predict(a_hwc, b_hwc, tta='spin')
  with pytest.raises(ValueError, match='needs square images; got 64x128'):
    det.predict_logits(np.zeros((1, 64, 128, 3)), np.zeros((1, 64, 128, 3)),
                       det.embed(PROMPT), tta='d4')


def _run_infer(*args: str) -> None:
  with flagsaver.flagsaver():
    flags.FLAGS(['infer', '--noprogress', *args])
    infer.main(['infer'])


@pytest.mark.slow  # two infer runs per case (~30 s each); the default run has the API tests
@pytest.mark.parametrize('height, width, window', [
    (50, 90, 32),   # smaller than the 64 px window: clamped to a square 32 px window
    (20, 90, 64),   # thinner than the model stride: one window padded to a 64 px square
])
def test_cli_tta_on_scenes_smaller_than_the_window(detector, tmp_path, height, width, window):
  root, _ = detector
  a, b = h.pair_arrays(height, width, seed=6)
  a_tif, b_tif = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  common = ['--checkpoint', str(root / 'ckpt'), '--a', a_tif, '--b', b_tif, '--probabilities']
  _run_infer(*common, '--out', str(tmp_path / 'none.tif'))
  _run_infer(*common, '--out', str(tmp_path / 'd4.tif'), '--tta', 'd4')
  with rasterio.open(tmp_path / 'none.tif') as x, rasterio.open(tmp_path / 'd4.tif') as y:
    assert x.tags()['TTA'] == 'none' and y.tags()['TTA'] == 'd4'
    assert int(y.tags()['WINDOW']) == window
    px, py = x.read(1), y.read(1)
  assert py.shape == (height, width) and np.isfinite(py).all()
  assert not np.allclose(px, py, atol=1e-4)
