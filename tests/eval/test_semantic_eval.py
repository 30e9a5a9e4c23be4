"""SeK in `evaluate` for SECOND-style data: both dates' class maps rebuilt from the directional
prompt slots (train/evaluation.SemanticPlan) and scored by train/metrics.sek."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.data import convert
from segchange_jax.data import layouts
from segchange_jax.train import evaluation
from segchange_jax.train import metrics
from tests.data import conftest as data_helpers
from tests.data import test_second_layout as second
from tests.eval import tiny

C = len(layouts.SECOND_CLASSES)
WATER, GROUND, LOW_VEG, TREE, BUILDING, PLAYGROUND = 1, 2, 3, 4, 5, 6
NAME = {i: n for i, n, _ in layouts.SECOND_CLASSES}


def _hist(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
  return np.bincount((true * C + pred).reshape(-1), minlength=C * C).reshape(C, C)


def _maps():
  """Hand-made land-cover maps of both dates, true and predicted (0 = no change)."""
  t1, t2 = np.zeros((2, 16, 16), np.int32)
  t1[2:6, 2:8], t2[2:6, 2:8] = LOW_VEG, BUILDING      # found, right classes
  t1[8:12, 1:5], t2[8:12, 1:5] = WATER, GROUND        # found, wrong 'to' class
  t1[12:15, 10:15], t2[12:15, 10:15] = TREE, BUILDING  # missed
  p1, p2 = np.zeros((2, 16, 16), np.int32)
  p1[2:6, 2:8], p2[2:6, 2:8] = LOW_VEG, BUILDING
  p1[8:12, 1:5], p2[8:12, 1:5] = WATER, PLAYGROUND
  p1[0:2, 10:16], p2[0:2, 10:16] = GROUND, TREE       # false alarm
  return t1, t2, p1, p2


def _slots(prompts, t1, t2, p1, p2):
  """Labels [1, H, W, P] of the true maps (layouts.semantic_targets) and logits [1, H, W, P]
  that make exactly the predicted maps (the other slots random: they must not matter)."""
  _, targets = layouts.semantic_targets(t1.astype(np.uint8), t2.astype(np.uint8))
  targets = dict(targets)
  labels = np.stack([targets.get(p, np.zeros(t1.shape, np.uint8)) for p in prompts], -1)
  logits = np.random.default_rng(0).normal(0, 3, labels.shape).astype(np.float32)
  changed = p1 != 0
  for k, p in enumerate(prompts):
    if p == layouts.ANY_CHANGE:
      logits[..., k] = np.where(changed, 6.0, -6.0)
    elif ' -> ' in p:
      src, dst = p.split(' -> ')
      hit = (np.vectorize(NAME.get)(p1) == src) & (np.vectorize(NAME.get)(p2) == dst)
      logits[..., k] = np.where(hit, 8.0, np.where(changed, 4.0, -6.0))
  return labels[None], logits[None]


@pytest.mark.parametrize('with_any_change', [True, False])
def test_evaluator_sek_equals_metrics_sek_of_hand_made_maps(with_any_change):
  t1, t2, p1, p2 = _maps()
  prompts = sorted(p for p in layouts.second_vocabulary()
                   if with_any_change or p != layouts.ANY_CHANGE)
  plan = evaluation.SemanticPlan.of(prompts)
  assert (plan.any_slot is not None) == with_any_change and len(plan.pair_slots) == 36
  labels, logits = _slots(prompts, t1, t2, p1, p2)
  maps = plan.class_maps(jnp.asarray(logits), jnp.asarray(labels), 0.5)
  for got, want in zip(maps, (t1, t2, p1, p2)):
    np.testing.assert_array_equal(np.asarray(got)[0], want)
  cm = np.asarray(plan.confusion(jnp.asarray(logits), jnp.asarray(labels),
                                 jnp.ones((1,), jnp.float32), 0.5))
  want = _hist(t1, p1) + _hist(t2, p2)
  np.testing.assert_array_equal(cm, want)
  got, ref = metrics.sek(cm), metrics.sek(want)
  assert got == ref and 0 < got['sek'] < 1
  # A padding example (mask 0) counts nothing; a perfect prediction scores SeK 1.
  both = jnp.asarray(np.concatenate([labels, labels])), jnp.asarray(np.concatenate([logits] * 2))
  cm2 = plan.confusion(both[1], both[0], jnp.asarray([1.0, 0.0]), 0.5)
  np.testing.assert_array_equal(np.asarray(cm2), want)
  perfect = _slots(prompts, t1, t2, t1, t2)
  cm3 = np.asarray(plan.confusion(jnp.asarray(perfect[1]), jnp.asarray(perfect[0]),
                                  jnp.ones((1,), jnp.float32), 0.5))
  assert metrics.sek(cm3)['sek'] == pytest.approx(1.0)


def test_no_plan_without_directional_prompts():
  assert evaluation.SemanticPlan.of(['new buildings', 'any change', 'new roads']) is None


def test_evaluate_writes_sek_on_a_second_fixture(tmp_path):
  """convert --layout second -> initialised tiny model -> evaluate: metrics carry SeK, whose
  truth half is the fixture's own land-cover maps."""
  root, shards = str(tmp_path / 'second'), str(tmp_path / 'shards')
  maps = second.write_fixture(data_helpers.write_png, root, 'val',
                              ['00001.png', '00002.png', '00003.png'])
  info = convert.convert('second', root, shards, ['val'])
  config = tiny.tiny_config(shards)
  names = set(info.get('prompts') or []) | set(info['target_prompts']) | {config.data.prompt}
  npz = tiny.write_embeddings(tmp_path / 'p.npz', sorted(names))
  config = tiny.tiny_config(shards, npz)
  config.data.targets = 'prompts'
  variables = tiny.random_variables(config)
  out = tmp_path / 'eval'
  result = evaluation.evaluate(config, variables, 'val', str(out), num_images=0)
  with open(out / 'metrics_val.json') as f:
    written = json.load(f)
  cm = np.asarray(written['semantic_confusion'])
  assert written['semantic_classes'] == [n for _, n, _ in layouts.SECOND_CLASSES]
  assert cm.shape == (C, C) and cm.sum() == 2 * 3 * second.SIZE ** 2
  truth = sum(np.bincount(m.reshape(-1), minlength=C) for one, two in maps.values()
              for m in (one, two))
  np.testing.assert_array_equal(cm.sum(1), truth)  # rows: the true classes of both dates
  want = metrics.sek(cm)
  for k, v in want.items():
    key = k if k == 'sek' else f'sek_{k}'
    assert written[key] == pytest.approx(v) and result[key] == written[key], key
  assert 'f1/any change' in written and np.isfinite(written['sek'])
  assert not os.path.exists(out / 'images')
