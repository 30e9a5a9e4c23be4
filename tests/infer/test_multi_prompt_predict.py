"""ChangeDetector.predict(a, b, prompts=[...]): one Prediction per prompt from one model pass per
window batch, equal to one predict call per prompt; bad prompt lists are one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from segchange_jax import cli
from segchange_jax.inference import pipeline
from segchange_jax.inference import predictor
from tests.eval import tiny
from tests.infer import scene_helpers as h

PROMPTS = ['new buildings', 'demolished buildings', 'new roads']


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
  return tiny.prompt_detector(tmp_path_factory.mktemp('multi_prompt'), PROMPTS)[1]


def _counting(det, monkeypatch):
  """Counts the jitted model calls (one per window batch) and the prompt axis each one saw."""
  calls = []
  forward = det._forward  # pylint: disable=protected-access

  def counted(v, a, b, t, tta):
    calls.append(t.shape)
    return forward(v, a, b, t, tta)
  monkeypatch.setattr(det, '_forward', counted)
  return calls


def test_prompts_equal_one_predict_per_prompt_in_one_pass(detector, monkeypatch):
  det = detector
  calls = _counting(det, monkeypatch)
  a, b = (x.transpose(1, 2, 0) for x in h.pair_arrays(50, 75, seed=2))
  # 50 x 75 at 32 px windows, overlap 8: 6 windows blended in one batch of config.infer's 8.
  singles = {p: det.predict(a, b, prompt=p) for p in PROMPTS}
  n_single = len(calls) // len(PROMPTS)
  del calls[:]
  multi = det.predict(a, b, prompts=PROMPTS)
  assert len(calls) == n_single and all(s[1] == len(PROMPTS) for s in calls), calls
  assert list(multi) == PROMPTS
  for p in PROMPTS:
    got, want = multi[p], singles[p]
    assert isinstance(got, predictor.Prediction)
    assert got.probabilities.shape == (50, 75) and got.mask.shape == (50, 75)
    assert got.probabilities.dtype == np.float32 and got.mask.dtype == np.uint8
    # Float rounding only (the head's output convs see a batch of B * P maps), which the
    # ill-conditioned random model (tests/eval/tiny.py) amplifies to ~1e-5.
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4, rtol=0,
                               err_msg=p)
    clear = np.abs(want.probabilities - 0.5) > 1e-4  # masks agree away from the threshold
    np.testing.assert_array_equal(got.mask[clear], want.mask[clear], err_msg=p)
  # The prompts steer this random model: different maps.
  assert not np.array_equal(multi[PROMPTS[0]].mask, multi[PROMPTS[1]].mask)


@pytest.mark.parametrize('kwargs,match', [
    (dict(prompts=['new buildings', 'new roads', 'new buildings']),
     r"prompts\[2\]='new buildings' repeats prompts\[0\]='new buildings'"),
    (dict(prompts=['new roads', ' new  roads ']),
     r"prompts\[1\]=' new  roads ' repeats prompts\[0\]='new roads'"),
    (dict(prompts=['new roads', '']), r"prompts\[1\]='' is empty"),
    (dict(prompts=['new roads', '   ']), r"prompts\[1\]='   ' is empty"),
    (dict(prompts=[]), r'prompts=\[\] is empty'),
    (dict(prompts='new roads'), 'must be a list of strings'),
    (dict(prompts=['new roads', 3]), r'prompts\[1\]=3 is not a string'),
    (dict(prompt='new roads', prompts=['new buildings']),
     'give prompt= .* or prompts= .*, not both'),
])
def test_bad_prompt_lists_are_one_clear_error(detector, monkeypatch, kwargs, match):
  calls = _counting(detector, monkeypatch)
  img = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match=match):
    detector.predict(img, img, **kwargs)
  assert not calls  # refused before the model runs


def test_predictor_of_several_prompts_needs_a_prompt_batch_backend():
  class OnePromptBackend:  # e.g. an ONNX graph exported for [B, T, L] embeddings
    def predict_logits(self, a, b, text):
      raise AssertionError('not reached')

  with pytest.raises(cli.UsageError, match='OnePromptBackend takes one prompt per call, got 2'):
    pipeline.detector_predictor(OnePromptBackend(), np.zeros((1, 2, 8, 32), np.float32))


def test_prompt_logits_to_probs_layout():
  logits = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)  # [B, H, W, P], K = 1
  np.testing.assert_allclose(pipeline.prompt_logits_to_probs(logits), 1 / (1 + np.exp(-logits)),
                             rtol=1e-6)
  logits = np.random.RandomState(1).randn(2, 4, 4, 3, 5).astype(np.float32)  # K = 5
  probs = pipeline.prompt_logits_to_probs(logits)
  assert probs.shape == (2, 4, 4, 15)
  for p in range(3):  # prompt-major channels: p * K + k
    np.testing.assert_allclose(probs[..., p * 5:(p + 1) * 5],
                               pipeline.logits_to_probs(logits[..., p, :]), rtol=1e-6)
