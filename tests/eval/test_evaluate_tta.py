"""segchange_jax.evaluate with test-time augmentation (--tta) on a tiny random checkpoint."""

from __future__ import annotations

import csv
import json
import os
import pathlib

import cv2
import numpy as np
import pytest

from segchange_jax.train import evaluation
from tests.eval import tiny
from tests.eval.test_evaluate import model_logits


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval_tta')
  shards, npz, _ = tiny.make_dataset(root)
  config = tiny.tiny_config(shards, npz)
  variables = tiny.random_variables(config)
  return root, config, variables


def _counts(out: pathlib.Path) -> np.ndarray:
  with open(out / 'per_example_test.csv') as f:
    return np.array([[int(r[k]) for k in ('tp', 'fp', 'fn')] for r in csv.DictReader(f)])


@pytest.mark.slow  # ~50 s: a d4 evaluation and the per-example reference
def test_tta_metrics_come_from_the_averaged_logits(setup):
  root, config, variables = setup
  # The default is 'none' (the model is not wrapped: the evaluation without TTA); the setting
  # is recorded either way.
  none = evaluation.evaluate(config, variables, 'test', str(root / 'none'))
  d4 = evaluation.evaluate(config, variables, 'test', str(root / 'd4'), tta='d4')
  for name, result in (('none', none), ('d4', d4)):
    with open(root / name / 'metrics_test.json') as f:
      assert json.load(f)['tta'] == name == result['tta']
  assert d4['loss'] != none['loss']
  # The per-example counts equal numpy's on ChangeDetector.predict_logits(tta='d4') (another
  # batch and sharding: pixels whose logit is within 0.05 of the threshold may differ, this
  # random model's float noise between batch sizes).
  examples, logits = model_logits(config, variables, tta='d4')
  pred = logits > 0  # sigmoid > 0.5
  true = np.stack([e['label'] for e in examples]) > 0
  mine = np.stack([(pred & true).sum((1, 2)), (pred & ~true).sum((1, 2)),
                   (~pred & true).sum((1, 2))], 1)
  ambiguous = (np.abs(logits) < 0.05).reshape(len(examples), -1).sum(1)
  got, without = _counts(root / 'd4'), _counts(root / 'none')
  assert (np.abs(mine - got).sum(1) <= ambiguous).all(), (mine, got, ambiguous)
  # ... which the counts without TTA are not: the comparison tells the two apart.
  assert np.abs(mine - without).sum() > ambiguous.sum(), (mine, without, ambiguous)


def make_wide_checkpoint(root: pathlib.Path):
  """A dataset of 64 x 96 px records (H != W) and a checkpoint `root/ckpt` whose config reads
  it; (config, variables)."""
  from segchange_jax.data import convert  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.generate(str(root / 'raw'), 10, 96, seed=0)
  for path in (root / 'raw').rglob('*.png'):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), img[:64])
  info = convert.convert('segchange-default', str(root / 'raw'), str(root / 'shards'))
  assert info['splits']['test']['image_size'] == [64, 96]
  npz = tiny.write_embeddings(root / 'p.npz',
                              sorted(set(info['prompts']) | {tiny.tiny_config().data.prompt}))
  config = tiny.tiny_config(str(root / 'shards'), npz)
  return config, tiny.save_checkpoint(root / 'ckpt', config)


@pytest.fixture(scope='module')
def wide_records(tmp_path_factory):
  root = tmp_path_factory.mktemp('wide')
  return (root, *make_wide_checkpoint(root))


def test_rotations_need_square_records(wide_records):
  root, config, variables = wide_records
  with pytest.raises(evaluation.EvaluationError,
                     match=r"--tta d4: .*needs square 'test' records; got 64x96"):
    evaluation.evaluate(config, variables, 'test', str(root / 'd4'), tta='d4')
  assert not os.path.exists(root / 'd4')
  flips = evaluation.evaluate(config, variables, 'test', str(root / 'flips'), tta='flips')
  assert flips['tta'] == 'flips' and flips['num_examples'] > 0
