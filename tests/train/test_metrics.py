"""Confusion matrix on device vs numpy over all pixels; metric definitions."""

from fractions import Fraction

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
  total = metrics.zero_counts((2, 2))
  all_true, all_pred = [], []
  for _ in range(3):
    z = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, 2, (4, 16, 16)).astype(np.int32)
    mask = np.array([1, 1, 0, 1], np.float32)
    total = metrics.add_counts(total, metrics.confusion_matrix(
        jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask), threshold=0.3))
    keep = mask == 1
    p = 1 / (1 + np.exp(-z[keep, ..., 0].astype(np.float64)))
    all_pred.append((p > 0.3).astype(int).ravel())
    all_true.append(y[keep].ravel())
  total = metrics.counts_to_host(total)
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
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(z), jnp.asarray(y)), np.int64)
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
                 'kappa': 0.0, 'f1_all_change': 0.0}


def test_all_change_baseline_is_the_f1_of_predicting_change_everywhere():
  labels = np.zeros(1000, np.int64)
  labels[:100] = 1  # 10% changed pixels
  cm = np.zeros((2, 2), np.int64)
  np.add.at(cm, (labels, np.ones_like(labels)), 1)  # predict change everywhere
  got = metrics.compute_metrics(cm)
  assert got['f1_all_change'] == pytest.approx(got['f1']) == pytest.approx(2 * 0.1 / 1.1)
  cm_real = np.array([[850, 50], [30, 70]])  # any predictor on the same labels: same baseline
  assert metrics.compute_metrics(cm_real)['f1_all_change'] == pytest.approx(2 * 0.1 / 1.1)


def _kappa_from_pixels(true, pred, num_classes):
  """Cohen's kappa by its definition over pixel lists, in exact fractions."""
  n = len(true)
  observed = Fraction(int(np.sum(true == pred)), n)
  chance = sum(Fraction(int(np.sum(true == c)), n) * Fraction(int(np.sum(pred == c)), n)
               for c in range(num_classes))
  return float((observed - chance) / (1 - chance))


def test_kappa_by_hand_binary_and_multiclass():
  # Binary: N = 100, p_o = 85/100, p_e = (60*55 + 40*45)/100^2 = 51/100 -> 34/49.
  got = metrics.compute_metrics(np.array([[50, 10], [5, 35]]))
  assert got['kappa'] == pytest.approx(34 / 49, abs=1e-15)
  assert got['oa'] == pytest.approx(0.85, abs=1e-15)
  # The 2x2 closed form 2 (tp tn - fn fp) / ((tp+fp)(fp+tn) + (tp+fn)(fn+tn)) agrees.
  tp, tn, fp, fn = 35, 50, 10, 5
  closed = 2 * (tp * tn - fn * fp) / ((tp + fp) * (fp + tn) + (tp + fn) * (fn + tn))
  assert got['kappa'] == pytest.approx(closed, abs=1e-15)
  # 3 classes: rows (true) 30/30/40, columns (pred) 28/36/36, trace 73, N = 100:
  # p_e = (30*28 + 30*36 + 40*36)/100^2 = 0.336 -> kappa = (0.73 - 0.336)/0.664 = 394/664.
  cm3 = np.array([[20, 5, 5], [2, 25, 3], [6, 6, 28]])
  got3 = metrics.compute_metrics(cm3)
  assert got3['kappa'] == pytest.approx(394 / 664, abs=1e-15)
  assert got3['oa'] == pytest.approx(0.73, abs=1e-15)
  # Worse than chance is negative: every pixel gets the other class.
  assert metrics.cohen_kappa(np.array([[0, 50], [50, 0]])) == pytest.approx(-1.0)
  assert metrics.cohen_kappa(np.array([[50, 0], [0, 50]])) == pytest.approx(1.0)


def test_kappa_from_device_confusion_matrix_matches_pixel_definition():
  rng = np.random.default_rng(2)
  for k in (1, 4):
    z = rng.normal(size=(3, 12, 12, k)).astype(np.float32)
    y = rng.integers(0, max(2, k), (3, 12, 12)).astype(np.int32)
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(z), jnp.asarray(y)), np.int64)
    if k == 1:
      pred = (1 / (1 + np.exp(-z[..., 0].astype(np.float64))) > 0.5).astype(int).ravel()
    else:
      pred = np.argmax(z, -1).ravel()
    ref = _kappa_from_pixels(y.ravel(), pred, max(2, k))
    assert metrics.compute_metrics(cm)['kappa'] == pytest.approx(ref, abs=1e-12), k


@pytest.mark.parametrize('cm', [
    np.array([[100, 0], [0, 0]]),      # no change anywhere, none predicted
    np.array([[0, 0], [0, 100]]),      # change everywhere, predicted everywhere
    np.array([[0, 0], [0, 0]]),        # empty split
    np.array([[0, 0, 0], [0, 7, 0], [0, 0, 0]]),  # multi-class, one class only
])
def test_kappa_degenerate_single_class_is_zero_not_nan(cm):
  got = metrics.compute_metrics(cm)
  assert got['kappa'] == 0.0 and np.isfinite(got['oa'])


@pytest.mark.parametrize('cm', [
    np.array([[100, 0], [0, 1]]),      # one changed pixel, found: perfect
    np.array([[100, 0], [1, 0]]),      # one changed pixel, missed: no better than chance
    np.array([[0, 100], [0, 0]]),      # only one class predicted, another in the labels
])
def test_kappa_near_degenerate_stays_defined(cm):
  n = int(cm.sum())
  true = np.repeat(np.arange(2), cm.sum(1))
  pred = np.concatenate([np.repeat(np.arange(2), row) for row in cm])
  assert len(true) == len(pred) == n
  got = metrics.cohen_kappa(cm)
  assert got == pytest.approx(_kappa_from_pixels(true, pred, 2), abs=1e-15)


def test_kappa_exact_for_splits_beyond_int64_squares():
  # 2^33 pixels per cell, so N^2 does not fit in int64; a symmetric matrix [[a, b], [b, a]]
  # has kappa (a - b) / (a + b) = 0.5 here.
  a, b = 3 * 2**33, 2**33
  assert metrics.cohen_kappa(np.array([[a, b], [b, a]], np.int64)) == pytest.approx(0.5, abs=1e-15)


def _reference_sek(hist):
  """SeK as the SECOND reference code computes it (ggsDing/Bi-SRNet utils/utils.py
  SCDD_eval_all, rows = prediction there), written out step by step for comparison."""
  hist = np.asarray(hist, np.float64)
  c2 = np.array([[hist[0, 0], hist.sum(1)[0] - hist[0, 0]],
                 [hist.sum(0)[0] - hist[0, 0], hist[1:, 1:].sum()]])
  n0 = hist.copy()
  n0[0, 0] = 0
  po = np.trace(n0) / n0.sum()
  pe = n0.sum(1) @ n0.sum(0) / n0.sum() ** 2
  kappa = (po - pe) / (1 - pe)
  iu = np.diag(c2) / (c2.sum(1) + c2.sum(0) - np.diag(c2))
  return kappa * np.exp(iu[1]) / np.e, (iu[0] + iu[1]) / 2


def test_sek_hand_computed_example():
  # (true, predicted); class 0 = no change. Binary: TN 10, FP 2, FN 2, TP 10 -> IoU of change
  # and of no change 10/14 = 5/7. Zeroing (0, 0): N 14, trace 9, row = column sums (2, 6, 6)
  # -> p_o 9/14, p_e 76/196, kappa_n0 = (126 - 76) / (196 - 76) = 5/12.
  cm = np.array([[10, 2, 0], [1, 4, 1], [1, 0, 5]])
  got = metrics.sek(cm)
  assert got['iou_change'] == pytest.approx(5 / 7) and got['miou'] == pytest.approx(5 / 7)
  assert got['kappa_n0'] == pytest.approx(5 / 12)
  assert got['sek'] == pytest.approx(5 / 12 * np.exp(5 / 7 - 1))
  assert got['score'] == pytest.approx(0.3 * 5 / 7 + 0.7 * 5 / 12 * np.exp(-2 / 7))
  # Same as the reference code, whichever axis holds the truth.
  rng = np.random.default_rng(0)
  for _ in range(5):
    cm = rng.integers(0, 50, (7, 7))
    ref_sek, ref_miou = _reference_sek(cm)
    for m in (cm, cm.T):
      assert metrics.sek(m)['sek'] == pytest.approx(ref_sek)
      assert metrics.sek(m)['miou'] == pytest.approx(ref_miou)


def test_sek_edge_cases():
  perfect = metrics.sek(np.diag([50, 3, 2]))
  assert perfect['sek'] == pytest.approx(1.0) and perfect['miou'] == 1.0
  # No change anywhere, predicted as such: nothing to score -> 0, not NaN.
  empty = metrics.sek(np.array([[9, 0], [0, 0]]))
  assert empty['sek'] == 0.0 and empty['iou_change'] == 0.0
  with pytest.raises(ValueError, match='square'):
    metrics.sek(np.zeros((2, 3)))


def test_device_counts_stay_exact_past_int32():
  """An epoch of 512 px pixels overflows int32 counts; the two-word device counter does not."""
  total = metrics.zero_counts((2, 2))
  inc = jnp.asarray([[2**31 - 1, 7], [0, 2**30]], jnp.int32)
  for _ in range(5):
    total = metrics.add_counts(total, inc)
  expect = 5 * np.asarray([[2**31 - 1, 7], [0, 2**30]], np.int64)
  np.testing.assert_array_equal(metrics.counts_to_host(total), expect)
  assert metrics.counts_to_host(total).dtype == np.int64
