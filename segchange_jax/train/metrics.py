"""Confusion matrices on device, exact metrics on the host.

Upstream gathers every predicted and true pixel of the split and calls sklearn; the confusion
matrix holds the same information in K x K integers. A batch increment is int32 (exact for up to
2^31 pixels per batch); the host accumulates in int64 so a whole split never overflows.
Metrics follow sklearn's conventions as upstream calls them: binary scores for the change class
(pos_label=1) with 0 where a denominator is 0; for K>1 macro averages over the classes that occur
in the labels or the predictions (sklearn's `unique_labels`), OA over all pixels.
Cohen's kappa (`kappa`) is one value over the whole C x C matrix, binary and multi-class alike:
(p_o - p_e) / (1 - p_e), p_o = OA, p_e = sum_c rows_c cols_c / N^2 (chance agreement from the
label and prediction marginals), as sklearn's `cohen_kappa_score` without weights. Where
p_e = 1 (labels and predictions all one and the same class) or the matrix is empty, kappa is
0 like the other scores with a zero denominator (sklearn gives NaN): agreement is then exactly
what chance gives, and a NaN would poison the means over runs and epochs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def predictions(logits: Array, threshold: float) -> Array:
  """int32 [B,H,W] class map: sigmoid(z) > threshold for K=1, argmax for K>1."""
  if logits.shape[-1] == 1:
    return (jax.nn.sigmoid(logits[..., 0].astype(jnp.float32)) > threshold).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confusion_matrix(logits: Array, labels: Array, mask: Array | None = None, *,
                     threshold: float = 0.5) -> Array:
  """int32 [C,C] counts of (true, predicted) over the valid examples' pixels.

  C = 2 for binary logits [B,H,W,1] (labels: non-zero = change), else K. Logits [B,H,W,K] with
  labels [B,H,W,K] (same rank) are K binary prompt slots: 2 x 2 counts pooled over the slots.
  """
  if labels.ndim == logits.ndim == 4:
    return jnp.sum(slot_confusion_matrices(logits, labels, mask, threshold=threshold), axis=0)
  num_classes = max(2, logits.shape[-1])
  pred = predictions(logits, threshold)
  true = (labels > 0).astype(jnp.int32) if logits.shape[-1] == 1 else labels.astype(jnp.int32)
  if mask is None:
    weight = jnp.ones(true.shape, jnp.int32)
  else:
    weight = jnp.broadcast_to((mask > 0).astype(jnp.int32)[:, None, None], true.shape)
  index = (true * num_classes + pred).reshape(-1)
  counts = jax.ops.segment_sum(weight.reshape(-1), index, num_segments=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def slot_confusion_matrices(logits: Array, labels: Array, mask: Array | None = None, *,
                            threshold: float = 0.5) -> Array:
  """int32 [K,2,2] (true, predicted) counts of each of K binary prompt slots.

  logits [B,H,W,K] (sigmoid(z) > threshold = in the prompt's target), labels [B,H,W,K]
  (non-zero = in it), mask [B] (0 = padding, not counted).
  """
  if labels.shape != logits.shape:
    raise ValueError(f'prompt-slot labels {labels.shape} must match the logits {logits.shape}')
  k = logits.shape[-1]
  pred = (jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold).astype(jnp.int32)
  true = (labels > 0).astype(jnp.int32)
  if mask is None:
    weight = jnp.ones(true.shape, jnp.int32)
  else:
    weight = jnp.broadcast_to((mask > 0).astype(jnp.int32).reshape((-1, 1, 1, 1)), true.shape)
  index = jnp.arange(k, dtype=jnp.int32) * 4 + true * 2 + pred
  counts = jax.ops.segment_sum(weight.reshape(-1), index.reshape(-1), num_segments=4 * k)
  return counts.reshape(k, 2, 2)


def zero_counts(shape: tuple[int, ...]) -> dict[str, Array]:
  """An exact on-device running count: two uint32 words per entry (see add_counts)."""
  return {'hi': jnp.zeros(shape, jnp.uint32), 'lo': jnp.zeros(shape, jnp.uint32)}


def add_counts(total: dict[str, Array], increment: Array) -> dict[str, Array]:
  """Adds a non-negative int32 increment to a zero_counts() total, on device, exactly.

  JAX has no int64 without x64 mode and an epoch of 512 px pixels overflows int32 after ~8k
  examples, so the count is kept as a 64-bit value in two uint32 words: the low word wraps
  at most once per increment (< 2^31), and the wrap is carried into the high word.
  """
  lo = total['lo'] + increment.astype(jnp.uint32)
  hi = total['hi'] + (lo < total['lo']).astype(jnp.uint32)
  return {'hi': hi, 'lo': lo}


def counts_to_host(total: dict[str, Array]) -> np.ndarray:
  """The int64 value of an add_counts() total (one device fetch)."""
  total = jax.device_get(total)
  return (np.asarray(total['hi'], np.int64) << 32) + np.asarray(total['lo'], np.int64)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def cohen_kappa(cm: np.ndarray) -> float:
  """Cohen's kappa of an int [C,C] (true, predicted) confusion matrix (0 where undefined)."""
  cm = np.asarray(cm, np.int64)
  # kappa = (N trace - S) / (N^2 - S), S = sum_c rows_c cols_c, in Python integers: exact (N^2
  # overflows int64 beyond ~3e9 pixels), and the denominator is 0 exactly when one class holds
  # every label and every prediction, where floats could round p_e to 1 or just below it.
  n = int(cm.sum())
  trace = int(np.trace(cm))
  chance = sum(int(r) * int(c) for r, c in zip(cm.sum(axis=1), cm.sum(axis=0)))
  den = n * n - chance
  return (n * trace - chance) / den if den else 0.0


def compute_metrics(cm: np.ndarray) -> dict[str, float | list[float]]:
  """precision, recall, f1, iou, oa, kappa from an int [C,C] (true, predicted) confusion matrix.

  C == 2: scores of class 1 (change), plus `f1_all_change`, the F1 of predicting change
  everywhere (2p / (1 + p) for a changed-pixel fraction p). C > 2: macro averages plus
  per-class lists (`precision_per_class`, ...), averaged over classes present in labels or
  predictions.
  """
  cm = np.asarray(cm, np.int64)
  tp = np.diag(cm)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  precision = _div(tp, tp + fp)
  recall = _div(tp, tp + fn)
  f1 = _div(2 * tp, 2 * tp + fp + fn)
  iou = _div(tp, tp + fp + fn)
  oa = float(_div(tp.sum(), cm.sum()))
  kappa = cohen_kappa(cm)
  if cm.shape[0] == 2:
    # F1 of the trivial predictor that marks every pixel as changed: the bar a model must clear.
    positives = cm[1].sum()
    baseline = float(_div(2 * positives, positives + cm.sum()))
    return {'precision': float(precision[1]), 'recall': float(recall[1]), 'f1': float(f1[1]),
            'iou': float(iou[1]), 'oa': oa, 'kappa': kappa, 'f1_all_change': baseline}
  present = (tp + fp + fn) > 0
  macro = lambda v: float(v[present].mean()) if present.any() else 0.0
  return {'precision': macro(precision), 'recall': macro(recall), 'f1': macro(f1),
          'iou': macro(iou), 'oa': oa, 'kappa': kappa,
          'precision_per_class': precision.tolist(), 'recall_per_class': recall.tolist(),
          'f1_per_class': f1.tolist(), 'iou_per_class': iou.tolist()}


def sek(cm: np.ndarray) -> dict[str, float]:
  """Separated Kappa (SeK) of semantic change detection from an int [C,C] (true, predicted)
  confusion matrix whose class 0 is 'no change' (SECOND: both dates' maps accumulated).

  As the SECOND paper (Yang et al., "Asymmetric Siamese Networks for Semantic Change Detection
  in Aerial Images") and its reference code (ggsDing/Bi-SRNet utils/utils.py, `SCDD_eval_all`,
  also used by ChangeMamba) define it: the binary change matrix merges classes 1..C-1;
  `iou_change` / `iou_no_change` are its IoUs and `miou` their mean; `kappa_n0` is Cohen's
  kappa of the semantic matrix with the (no change, no change) cell zeroed, so the dominant
  unchanged pixels do not inflate it; sek = kappa_n0 * e^(iou_change - 1); `score` =
  0.3 miou + 0.7 sek, the SECOND benchmark's overall score. Undefined ratios are 0, as in
  `compute_metrics`. The result does not depend on the order of the change classes, nor on
  whether rows or columns hold the truth.
  """
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
    raise ValueError(f'sek needs a square [C,C] confusion matrix with C >= 2, got {cm.shape}')
  tn = cm[0, 0]
  fp = cm[0].sum() - tn     # unchanged in the truth, predicted as a change
  fn = cm[:, 0].sum() - tn  # changed in the truth, predicted unchanged
  tp = cm[1:, 1:].sum()     # change found, whatever its class
  iou = _div(np.array([tn, tp]), np.array([tn + fn + fp, tp + fn + fp]))
  n0 = cm.copy()
  n0[0, 0] = 0
  kappa_n0 = cohen_kappa(n0)
  value = kappa_n0 * float(np.exp(iou[1] - 1.0))
  miou = float(iou.mean())
  return {'sek': value, 'kappa_n0': kappa_n0, 'iou_change': float(iou[1]),
          'iou_no_change': float(iou[0]), 'miou': miou, 'score': 0.3 * miou + 0.7 * value}


def prompt_metrics(cms: np.ndarray, prompts: list[str]) -> dict[str, float]:
  """Per-prompt scores from int [P,2,2] confusion matrices (one per prompt, in `prompts` order).

  'f1/<prompt>', 'iou/<prompt>', 'precision/<prompt>', 'recall/<prompt>' as `compute_metrics`
  scores a binary matrix, and 'macro_f1' / 'macro_iou' / 'macro_precision' / 'macro_recall':
  their means over the prompts that occur in the labels or the predictions (as the multi-class
  macro averages; a prompt nobody marks and nothing carries has no score to average).
  """
  cms = np.asarray(cms, np.int64)
  if cms.ndim != 3 or cms.shape[1:] != (2, 2) or len(cms) != len(prompts):
    raise ValueError(f'prompt_metrics needs [{len(prompts)},2,2] matrices, got {cms.shape}')
  out, present = {}, []
  names = ('f1', 'iou', 'precision', 'recall')
  for cm, prompt in zip(cms, prompts):
    m = compute_metrics(cm)
    out.update({f'{n}/{prompt}': m[n] for n in names})
    present.append(cm[1].sum() + cm[0, 1] > 0)
  for n in names:
    values = [out[f'{n}/{p}'] for p, keep in zip(prompts, present) if keep]
    out[f'macro_{n}'] = float(np.mean(values)) if values else 0.0
  return out
