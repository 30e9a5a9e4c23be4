"""Batch normalisation with PyTorch semantics, for NHWC maps.

`BatchNorm` is the model's only batch-statistics normalisation (the ResNet backbone, and
through `layers.batch_norm` the feature-difference, CBAM and EGA BNs). It differs from
`flax.linen.BatchNorm` in two ways that matter for parity with torch training: the running
variance is updated with the UNBIASED batch variance (n / (n - 1)), as torch.nn.BatchNorm2d
does, while normalisation uses the biased one; and the variance is two-pass (mean of squared
deviations), not flax's E[x^2] - E[x]^2, which loses float32 precision for channels whose mean
is large against their spread. Statistics reduce over every axis but the last with plain
`jnp.mean`, so under `jit` with a batch sharded over devices XLA computes global (cross-device)
statistics, like torch SyncBatchNorm, and n is the global count; no `axis_name` needed. Code
that runs the model per device (`jax.shard_map`, the train step's `grad_reduction='flat'`)
names its batch axes with `batch_axis(...)` around the call, and the statistics are then
averaged over those axes, so they stay global. A module applied twice in one step (the
siamese backbone) updates its statistics twice, as torch does.

`FrozenBatchNorm` is torchvision/DETR's FrozenBatchNorm2d: a fixed affine map built from four
tensors kept in the 'frozen' collection, which training never updates.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

TORCH_MOMENTUM = 0.1  # torch's weight of the NEW batch statistic in the running average
EPS = 1e-5


_BATCH_AXIS: contextvars.ContextVar = contextvars.ContextVar('batch_axis', default=None)


@contextlib.contextmanager
def batch_axis(axis_name: str | tuple[str, ...]) -> Iterator[None]:
  """BatchNorms traced inside average their batch statistics over the mapped `axis_name`.

  For a model applied per device under `jax.shard_map` with the batch split over `axis_name`:
  the statistics (and the count behind the unbiased running variance) are then those of the
  global batch, as under `jit` with automatic partitioning.
  """
  token = _BATCH_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_AXIS.reset(token)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the channel (last) axis.

  Variables: params {scale, bias}; batch_stats {mean, var} (torch running_mean/running_var).
  Running stats are not updated while initialising, only in `train=True` applies with
  `mutable=['batch_stats']`.
  """
  momentum: float = TORCH_MOMENTUM
  epsilon: float = EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mapped = _BATCH_AXIS.get()
      batch_mean = (lambda t: jnp.mean(t, axes)) if mapped is None else (
          lambda t: jax.lax.pmean(jnp.mean(t, axes), mapped))   # equal shards: mean of means
      xf = x.astype(jnp.float32)
      mean = batch_mean(xf)
      # Two-pass variance: stable for activations with a large mean.
      var = batch_mean(jnp.square(xf - mean))
      if not self.is_initializing():
        n = xf.size // c * (1 if mapped is None else jax.lax.axis_size(mapped))
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    # Fold into one multiply-add, computed in float32 and applied in the compute dtype.
    mul = scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    add = bias - mean * mul
    return x.astype(self.dtype) * mul.astype(self.dtype) + add.astype(self.dtype)


class FrozenBatchNorm(nn.Module):
  """y = x * w / sqrt(rv + eps) + (b - rm * w / sqrt(rv + eps)), all four in 'frozen'."""
  epsilon: float = EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    w = self.variable('frozen', 'scale', lambda: jnp.ones((c,), jnp.float32)).value
    b = self.variable('frozen', 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
    rm = self.variable('frozen', 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
    rv = self.variable('frozen', 'var', lambda: jnp.ones((c,), jnp.float32)).value
    mul = w * jnp.reciprocal(jnp.sqrt(rv + self.epsilon))
    add = b - rm * mul
    return x.astype(self.dtype) * mul.astype(self.dtype) + add.astype(self.dtype)
