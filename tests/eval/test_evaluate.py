"""segchange_jax.evaluate on a tiny random checkpoint and a synthetic 64 px split."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from segchange_jax.data import imagery
from segchange_jax.data import input_pipeline
from segchange_jax.data import records
from segchange_jax.inference import predictor
from segchange_jax.interop import checkpoints
from segchange_jax.train import evaluation
from tests.eval import tiny


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  shards, npz, info = tiny.make_dataset(root)
  config = tiny.tiny_config(shards, npz)
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  out = root / 'out'
  result = evaluation.evaluate(config, variables, 'test', str(out), num_images=2,
                             checkpoint=str(root / 'ckpt'))
  return root, config, variables, out, result


def _test_examples(config):
  info = input_pipeline.load_dataset_info(config.data.shards_dir)
  source = evaluation._split_records(config, 'test')  # pylint: disable=protected-access
  return [records.decode(source[i]) for i in range(info['splits']['test']['num_examples'])]


def model_logits(config, variables, tta: str = 'none'):
  """(test examples, [N, H, W] logits of ChangeDetector.predict_logits on them)."""
  examples = _test_examples(config)
  with np.load(config.text.embeddings) as z:
    table = dict(zip(z['prompts'].tolist(), z['embeddings']))
  det = predictor.ChangeDetector(config, variables)
  a = np.stack([imagery.normalize(e['image_a']) for e in examples])
  b = np.stack([imagery.normalize(e['image_b']) for e in examples])
  t = np.stack([table[e['prompt'] or config.data.prompt] for e in examples])
  return examples, det.predict_logits(a, b, t, tta=tta)[..., 0]


def _numpy_metrics(cm):
  tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
  p, r = tp / (tp + fp), tp / (tp + fn)
  return {'precision': p, 'recall': r, 'f1': 2 * p * r / (p + r), 'iou': tp / (tp + fp + fn),
          'oa': (tp + cm[0, 0]) / cm.sum()}


def test_metrics_equal_numpy_recomputation(setup):
  root, config, variables, out, result = setup
  with open(out / 'metrics_test.json') as f:
    saved = json.load(f)
  assert saved['num_examples'] == 4 and saved['split'] == 'test'
  examples, logits = model_logits(config, variables)
  pred = (1 / (1 + np.exp(-logits.astype(np.float64)))) > config.eval.threshold
  true = np.stack([e['label'] for e in examples]) > 0
  cms = np.stack([np.bincount(2 * y.ravel() + p.ravel(), minlength=4).reshape(2, 2)
                  for y, p in zip(true.astype(int), pred.astype(int))])
  with open(out / 'per_example_test.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['file_name'] for r in rows] == [e['file_name'] for e in examples]
  counts = np.array([[int(r[k]) for k in ('tp', 'fp', 'fn')] for r in rows])
  # The split metrics (summed confusion matrix) equal numpy formulas on the per-example counts
  # (a separate jitted reduction) exactly.
  tp, fp, fn = counts.sum(0)
  total = len(examples) * tiny.SIZE ** 2
  want = _numpy_metrics(np.array([[total - tp - fp - fn, fp], [fn, tp]]))
  assert 0 < want['f1'] < 1  # a non-trivial prediction, so the comparison means something
  for k, v in want.items():
    assert saved[k] == pytest.approx(v, rel=1e-12), k
  # The counts equal numpy's on the ChangeDetector's logits (another batch size and sharding:
  # only pixels within 1e-3 (float error) of the threshold logit may differ).
  ambiguous = (np.abs(logits) < 1e-3).reshape(len(examples), -1).sum(1)
  mine = np.stack([cms[:, 1, 1], cms[:, 0, 1], cms[:, 1, 0]], 1)
  assert (np.abs(mine - counts).sum(1) <= ambiguous).all(), (mine, counts, ambiguous)
  print('pixels within 1e-3 of the threshold:', ambiguous, 'count differences:',
        np.abs(mine - counts).sum(1))


def test_comparison_images_layout_and_colours(setup):
  root, config, variables, out, result = setup
  files = sorted(os.listdir(out / 'images'))
  assert len(files) == 4 and sum(f.startswith('worst_') for f in files) == 2
  with open(out / 'per_example_test.csv') as f:
    rows = {r['file_name']: r for r in csv.DictReader(f)}
  ious = sorted(float(r['iou']) for r in rows.values())
  worst0 = next(f for f in files if f.startswith('worst_00_'))
  best0 = next(f for f in files if f.startswith('best_00_'))
  stem = lambda f: f.split('_', 2)[2].rsplit('_iou', 1)[0] + '.png'
  assert float(rows[stem(worst0)]['iou']) == pytest.approx(ious[0], abs=1e-6)
  assert float(rows[stem(best0)]['iou']) == pytest.approx(ious[-1], abs=1e-6)
  examples = {e['file_name']: e for e in _test_examples(config)}
  img = cv2.imread(str(out / 'images' / worst0))[..., ::-1]
  s, g = tiny.SIZE, evaluation.GAP
  assert img.shape == (s, 4 * s + 3 * g, 3)
  ex = examples[stem(worst0)]
  panel = lambda i: img[:, i * (s + g):i * (s + g) + s]
  np.testing.assert_array_equal(panel(0), ex['image_a'])
  np.testing.assert_array_equal(panel(1), ex['image_b'])
  np.testing.assert_array_equal(panel(2)[..., 0] > 0, ex['label'] > 0)
  overlay = panel(3).reshape(-1, 3)
  true = ex['label'].ravel() > 0
  colours = {tuple(c) for c in overlay[true]}  # change pixels: found (white) or missed (blue)
  assert colours <= {evaluation.TP_RGB, evaluation.FN_RGB}
  r = rows[stem(worst0)]
  assert (overlay == evaluation.TP_RGB).all(-1).sum() == int(r['tp'])
  assert (overlay == evaluation.FN_RGB).all(-1).sum() == int(r['fn'])
  assert ((overlay == evaluation.FP_RGB).all(-1) & ~true).sum() == int(r['fp'])


def test_per_example_counts_multiclass_and_empty():
  cm = np.array([[[5, 0, 0], [0, 0, 0], [0, 0, 0]],      # nothing changed, nothing predicted
                 [[1, 2, 0], [1, 3, 1], [0, 0, 4]]])
  c = evaluation.per_example_counts(cm)
  assert c['iou'][0] == 1.0 and c['f1'][0] == 1.0
  # tp 7; fp: 2 (0->1) + 1 (1->2 wrong class); fn: 1 (1->0) + 1 (wrong class)
  assert (c['tp'][1], c['fp'][1], c['fn'][1]) == (7, 3, 2)
  assert c['iou'][1] == pytest.approx(7 / 12)


def test_wrong_split_is_a_clear_error(setup):
  root, config, variables, _, _ = setup
  with pytest.raises(evaluation.EvaluationError, match="'nope' is not in"):
    evaluation.evaluate(config, variables, 'nope', str(root / 'x'))


def test_checkpoint_mismatching_config_is_a_clear_error(setup, tmp_path):
  root, config, _, _, _ = setup
  other = tiny.tiny_config(config.data.shards_dir, config.text.embeddings)
  with other.unlocked():
    other.model.fpn_dim = 64
  with pytest.raises(checkpoints.CheckpointError, match='does not fit the config'):
    checkpoints.load_checkpoint(str(root / 'ckpt'), other)


def test_relative_checkpoint_path_loads(setup, monkeypatch):
  root, config, variables, _, _ = setup
  monkeypatch.chdir(root)  # Orbax itself refuses relative paths
  _, loaded = checkpoints.load_checkpoint('ckpt', config)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(loaded)[0]),
                                np.asarray(jax.tree.leaves(variables)[0]))


def test_cli_bad_checkpoint_path(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'segchange_jax.evaluate', '--config',
                         'configs/demo.py', '--checkpoint', str(tmp_path / 'missing')],
                        cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'missing' in proc.stderr and 'does not exist' in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_training_checkpoint_scores_as_the_trainer_reported(setup):
  """Train 2 steps, then evaluate the checkpoints dir: the same numbers as eval_<split>.json."""
  from segchange_jax.train import loop  # pylint: disable=g-import-not-at-top
  root, config, _, _, _ = setup
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train.max_steps = 2
    config.train.progress_bar = False
  workdir = root / 'run'
  loop.train_and_evaluate(config, str(workdir))
  with open(workdir / 'eval_test.json') as f:
    reported = json.load(f)
  loaded_config, variables = checkpoints.load_checkpoint(str(workdir / 'checkpoints'))
  got = evaluation.evaluate(loaded_config, variables, 'test', str(root / 'ev_run'))
  for k in ('precision', 'recall', 'f1', 'iou', 'oa', 'loss', 'num_examples'):
    assert got[k] == pytest.approx(reported[k], rel=1e-6), k
