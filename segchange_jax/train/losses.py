"""SegChange-R1 training losses (BCE/CE + Dice + Focal + BCL), pure and jit-friendly.

Binary (K=1) follows upstream models/losses/loss.py exactly when every example is valid:
  BCE: mean of BCEWithLogits over all pixels of the batch.
  Dice: p = sigmoid(z); 1 - (2 sum(p y) + 1) / (sum p + sum y + 1), sums over the WHOLE batch.
  Focal: pt = p if y else 1 - p; mean of -alpha (1 - pt)^gamma log(pt + 1e-6) (alpha on every
    pixel).
  BCL: d = |z - y| on logits; sum_{y=1} d / n_pos + sum_{y=0} max(0, m - d) / n_neg (0 if count 0).
Multi-class (K>1):
  CE: mean cross-entropy; Dice: softmax, per (example, class) dice with smooth 1, averaged over
  classes and examples; Focal: -alpha (1 - pt)^gamma log pt from log-softmax.
  BCL: one-vs-rest. Upstream's multi-class BCL loops over class pairs (i, j), gathers the logit
  vectors of pixels of class i and j and takes `torch.cdist` between them: memory O(N_i N_j)
  (~10^10 entries for one 512x512 batch) and data-dependent shapes, so it cannot be jitted; as
  written it also indexes [B,K,H,W] logits with a [B,H,W] mask, which raises. We instead apply the
  binary BCL to every class channel c against the indicator y == c and average over classes
  present in the batch: d_c = |z_c - [y == c]|, pulled to 0 on class-c pixels and pushed beyond
  the margin elsewhere, each side normalised by its own pixel count. For K=1 it is exactly the
  binary BCL. Fixed shapes, O(N K) memory.
Every loss takes a per-example `mask` [B] (1 = real, 0 = padding): padded examples add nothing
to any sum or count, so a padded batch gives the loss of its real examples.
Prompt slots (config.data.targets='prompts'): logits [B,H,W,K] with labels [B,H,W,K] (same rank)
hold K binary (prompt, mask) slots per example; each term is the binary loss of every slot (its
[B,H,W] logits against its masks, the sums of Dice and BCL over the batch) averaged over the K
slots, so a batch with K slots scores the mean of its K one-slot batches and K = 1 is exactly
the binary loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def _pixel_weights(labels: Array, mask: Array | None) -> Array:
  """[B,H,W] float weights: 1 on pixels of valid examples, 0 on padded ones."""
  if mask is None:
    return jnp.ones(labels.shape, jnp.float32)
  return jnp.broadcast_to(mask.astype(jnp.float32).reshape((-1,) + (1,) * (labels.ndim - 1)),
                          labels.shape)


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (a term whose count is 0 contributes nothing)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def binary_losses(logits: Array, labels: Array, mask: Array | None = None, *,
                  alpha: float = 0.6, gamma: float = 2.0, margin: float = 2.0,
                  smooth: float = 1.0) -> dict[str, Array]:
  """The four binary loss terms. logits [B,H,W] or [B,H,W,1]; labels [B,H,W] (non-zero = change)."""
  if logits.ndim == labels.ndim + 1:
    logits = logits[..., 0]
  z = logits.astype(jnp.float32)
  y = (labels > 0).astype(jnp.float32)
  w = _pixel_weights(labels, mask)
  n = jnp.sum(w)

  # log(sigmoid(z)) and log(1 - sigmoid(z)), stable for large |z|.
  bce = jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
  ce = _safe_div(jnp.sum(w * bce), n)

  p = jax.nn.sigmoid(z)
  inter = jnp.sum(w * p * y)
  union = jnp.sum(w * p) + jnp.sum(w * y)
  dice = 1.0 - (2.0 * inter + smooth) / (union + smooth)

  pt = p * y + (1.0 - p) * (1.0 - y)
  focal_px = -alpha * (1.0 - pt) ** gamma * jnp.log(pt + 1e-6)
  focal = _safe_div(jnp.sum(w * focal_px), n)

  bcl = _bcl(z, y, w, margin)
  return {'ce': ce, 'dice': dice, 'focal': focal, 'bcl': bcl}


def _bcl(z: Array, y: Array, w: Array, margin: float) -> Array:
  """Batch-balanced contrastive loss on logits z against 0/1 targets y, pixel weights w."""
  d = jnp.abs(z - y)
  pos = w * y
  neg = w * (1.0 - y)
  loss_pos = _safe_div(jnp.sum(pos * d), jnp.sum(pos))
  loss_neg = _safe_div(jnp.sum(neg * jnp.maximum(margin - d, 0.0)), jnp.sum(neg))
  return loss_pos + loss_neg


def multiclass_losses(logits: Array, labels: Array, mask: Array | None = None, *,
                      alpha: float = 0.6, gamma: float = 2.0, margin: float = 2.0,
                      smooth: float = 1.0) -> dict[str, Array]:
  """The four loss terms for K>1 classes. logits [B,H,W,K]; labels int [B,H,W] in [0, K)."""
  num_classes = logits.shape[-1]
  z = logits.astype(jnp.float32)
  w = _pixel_weights(labels, mask)
  n = jnp.sum(w)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [B,H,W,K]

  logp = jax.nn.log_softmax(z, axis=-1)
  logpt = jnp.sum(logp * onehot, axis=-1)
  ce = _safe_div(-jnp.sum(w * logpt), n)

  prob = jnp.exp(logp)
  inter = jnp.sum(prob * onehot, axis=(1, 2))           # [B,K]
  union = jnp.sum(prob, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  dice_bk = (2.0 * inter + smooth) / (union + smooth)
  ex = _pixel_weights(labels[:, 0, 0], mask)             # [B] example weights
  dice = 1.0 - _safe_div(jnp.sum(ex[:, None] * dice_bk), jnp.sum(ex) * num_classes)

  pt = jnp.exp(logpt)
  focal = _safe_div(jnp.sum(w * -alpha * (1.0 - pt) ** gamma * logpt), n)

  # One-vs-rest BCL per class channel, averaged over the classes present among valid pixels.
  wk = w[..., None]
  d = jnp.abs(z - onehot)
  pos = wk * onehot
  neg = wk * (1.0 - onehot)
  n_pos = jnp.sum(pos, axis=(0, 1, 2))
  n_neg = jnp.sum(neg, axis=(0, 1, 2))
  per_class = (_safe_div(jnp.sum(pos * d, axis=(0, 1, 2)), n_pos)
               + _safe_div(jnp.sum(neg * jnp.maximum(margin - d, 0.0), axis=(0, 1, 2)), n_neg))
  present = (n_pos > 0).astype(jnp.float32)
  bcl = _safe_div(jnp.sum(present * per_class), jnp.sum(present))
  return {'ce': ce, 'dice': dice, 'focal': focal, 'bcl': bcl}


def slot_losses(logits: Array, labels: Array, mask: Array | None = None,
                **kw: float) -> dict[str, Array]:
  """Binary loss terms of K prompt slots, averaged over the slots.

  logits [B,H,W,K]; labels [B,H,W,K] (non-zero = in the slot's prompt target); `kw` as for
  `binary_losses`.
  """
  if labels.shape != logits.shape:
    raise ValueError(f'prompt-slot labels {labels.shape} must match the logits {logits.shape}')
  per_slot = jax.vmap(lambda z, y: binary_losses(z, y, mask, **kw), in_axes=(-1, -1))(
      logits, labels)
  return {k: jnp.mean(v) for k, v in per_slot.items()}


def total_loss(logits: Array, labels: Array, mask: Array | None,
               loss_config: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """Weighted total from `config.loss` and the dict of its parts (unweighted).

  Args:
    logits: [B,H,W,K] model output (K=1 binary, sigmoid; K>1 softmax), or K prompt slots.
    labels: int [B,H,W]; [B,H,W,K] for K binary prompt slots (`slot_losses`).
    mask: float [B], 1 for real examples, 0 for padding (None = all real).
    loss_config: `config.loss` (weight_ce, weight_dice, weight_focal, weight_bcl, alpha, gamma,
      bcl_margin).
  """
  kw = dict(alpha=loss_config['alpha'], gamma=loss_config['gamma'],
            margin=loss_config['bcl_margin'])
  if labels.ndim == logits.ndim == 4:
    parts = slot_losses(logits, labels, mask, **kw)
  elif logits.shape[-1] == 1:
    parts = binary_losses(logits, labels, mask, **kw)
  else:
    parts = multiclass_losses(logits, labels, mask, **kw)
  total = (loss_config['weight_ce'] * parts['ce'] + loss_config['weight_dice'] * parts['dice']
           + loss_config['weight_focal'] * parts['focal']
           + loss_config['weight_bcl'] * parts['bcl'])
  return total, parts
