"""Confusion matrix on device vs numpy over all pixels; metric definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.train import metrics


def _numpy_scores(true, pred, num_classes):
  """Per-class precision/recall/f1/iou from flat pixel arrays (sklearn conventions)."""
  out = {k: [] for k in ('precision', 'recall', 'f1', 'iou')}
  present = []
  for c in range(num_classes):
    tp = np.sum((pred == c) & (true == c))
    fp = np.sum((pred == c) & (true != c))
    fn = np.sum((pred != c) & (true == c))
    out['precision'].append(tp / (tp + fp) if tp + fp else 0.0)
    out['recall'].append(tp / (tp + fn) if tp + fn else 0.0)
    out['f1'].append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    out['iou'].append(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
    present.append(np.any(true == c) or np.any(pred == c))
  return out, np.array(present), float(np.mean(true == pred))


def test_binary_confusion_and_metrics_over_batches():
  rng = np.random.default_rng(0)
  total = None
  all_true, all_pred = [], []
  for _ in range(3):
    z = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, 2, (4, 16, 16)).astype(np.int32)
    mask = np.array([1, 1, 0, 1], np.float32)
    total = metrics.accumulate(total, metrics.confusion_matrix(
        jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask), threshold=0.3))
    keep = mask == 1
    p = 1 / (1 + np.exp(-z[keep, ..., 0].astype(np.float64)))
    all_pred.append((p > 0.3).astype(int).ravel())
    all_true.append(y[keep].ravel())
  true, pred = np.concatenate(all_true), np.concatenate(all_pred)
  assert total.dtype == np.int64 and total.sum() == true.size
  ref_cm = np.array([[np.sum((true == a) & (pred == b)) for b in range(2)] for a in range(2)])
  np.testing.assert_array_equal(total, ref_cm)
  got = metrics.compute_metrics(total)
  ref, _, oa = _numpy_scores(true, pred, 2)
  for k in ('precision', 'recall', 'f1', 'iou'):
    assert got[k] == pytest.approx(ref[k][1], abs=1e-12), k
  assert got['oa'] == pytest.approx(oa, abs=1e-12)


def test_multiclass_macro_over_present_classes():
  rng = np.random.default_rng(1)
  k = 5
  z = rng.normal(size=(3, 8, 8, k)).astype(np.float32)
  z[..., 4] = -100.0  # class 4 never predicted
  y = rng.integers(0, 4, (3, 8, 8)).astype(np.int32)  # ... nor present: excluded from macro
  cm = metrics.accumulate(None, metrics.confusion_matrix(jnp.asarray(z), jnp.asarray(y)))
  pred = np.argmax(z, -1).ravel()
  ref, present, oa = _numpy_scores(y.ravel(), pred, k)
  got = metrics.compute_metrics(cm)
  assert not present[4]
  for name in ('precision', 'recall', 'f1', 'iou'):
    assert got[name] == pytest.approx(np.mean(np.array(ref[name])[present]), abs=1e-12)
    np.testing.assert_allclose(got[f'{name}_per_class'], ref[name], atol=1e-12)
  assert got['oa'] == pytest.approx(oa, abs=1e-12)


def test_empty_change_class_gives_zero_not_nan():
  cm = np.array([[100, 0], [0, 0]])
  got = metrics.compute_metrics(cm)
  assert got == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'iou': 0.0, 'oa': 1.0,
                 'f1_all_change': 0.0}


def test_all_change_baseline_is_the_f1_of_predicting_change_everywhere():
  labels = np.zeros(1000, np.int64)
  labels[:100] = 1  # 10% changed pixels
  cm = np.zeros((2, 2), np.int64)
  np.add.at(cm, (labels, np.ones_like(labels)), 1)  # predict change everywhere
  got = metrics.compute_metrics(cm)
  assert got['f1_all_change'] == pytest.approx(got['f1']) == pytest.approx(2 * 0.1 / 1.1)
  cm_real = np.array([[850, 50], [30, 70]])  # any predictor on the same labels: same baseline
  assert metrics.compute_metrics(cm_real)['f1_all_change'] == pytest.approx(2 * 0.1 / 1.1)
