"""Feature difference per scale (upstream models/neck/feature_diff.py).

concat[f1, f2, |f1 - f2|, f1 * f2] -> 1x1 conv -> BatchNorm -> ReLU -> CBAM or SE.

`SignedDifference` (opt-in, config.model.signed_difference) is not upstream's: linear maps of
B - A, added to the neck's output map ('map', from the finest scale) or to every scale's
difference ('scales', the neck's input). The block above keeps WHAT changed but,
trained as upstream trains it, not WHICH date holds the object: a linear probe reads "new" vs
"demolished" from the two dates' features entering the block and at chance from its output
(bench/README.md, "Prompts that choose the change"). B - A carries the direction in its sign.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import fields
from segchange_jax.models import layers
from segchange_jax.models import remat as remat_lib
from segchange_jax.models import torch_rules as tc

REDUCTION = 16
SIGNED_DIFFERENCES = ('none', 'map', 'scales')   # config.model.signed_difference


def signed_difference_of(model_cfg) -> str:
  """config.model.signed_difference, 'none' for configs saved before the field existed."""
  return fields.model_field(model_cfg, 'signed_difference', 'none', SIGNED_DIFFERENCES)


class CBAM(nn.Module):
  """Upstream's CBAM: average-pool-only channel gate, then a grouped-conv spatial gate."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    r = c // REDUCTION
    g = jnp.mean(x, axis=(1, 2), keepdims=True)
    g = nn.relu(layers.dense(r, self.dtype, 'channel_fc1', use_bias=False)(g))
    g = layers.dense(c, self.dtype, 'channel_fc2', use_bias=False)(g)
    x = x * nn.sigmoid(g)
    s = layers.GroupedConv(r, 7, self.dtype, name='spatial_conv')(x)  # = grouped nn.Conv
    s = nn.relu(layers.batch_norm(train, self.dtype, 'spatial_bn')(s))
    s = layers.dense(1, self.dtype, 'spatial_fc')(s)
    # = x * sigmoid(s) ([B, H, W, 1] broadcast over channels). As an einsum, the gate's gradient
    # (x times the cotangent, summed over channels) is a dot, which XLA:CPU runs much faster
    # than its fused multiply + reduce over the minor axis.
    return jnp.einsum('bhwc,bhw->bhwc', x, nn.sigmoid(s)[..., 0])


class SE(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    c = x.shape[-1]
    g = jnp.mean(x, axis=(1, 2), keepdims=True)
    g = nn.relu(layers.dense(c // REDUCTION, self.dtype, 'fc1')(g))
    g = layers.dense(c, self.dtype, 'fc2')(g)
    return x * nn.sigmoid(g)


class DiffBlock(nn.Module):
  """One scale: fused difference features with channel/spatial re-weighting."""
  attention: str = 'CBAM'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f1: jax.Array, f2: jax.Array, train: bool = False) -> jax.Array:
    c = f1.shape[-1]
    x = jnp.concatenate([f1, f2, jnp.abs(f1 - f2), f1 * f2], axis=-1)
    x = layers.dense(c, self.dtype, 'diff_conv')(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, 'diff_bn')(x))
    att = CBAM if self.attention == 'CBAM' else SE
    return att(self.dtype, name='attention')(x, train)


class SignedDifference(nn.Module):
  """Per scale (f1, f2) [B, h, w, C_i] -> (f2 - f1) @ W_i [B, h, w, features[i]]. Every W_i
  starts at zero, so a model with it starts as one without (an upstream checkpoint keeps its
  logits)."""
  features: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats1: Sequence[jax.Array], feats2: Sequence[jax.Array]) -> list[jax.Array]:
    return [nn.Dense(n, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.zeros_init(),
                     name=f'proj_{i}')(b - a)
            for i, (n, a, b) in enumerate(zip(self.features, feats1, feats2))]


class FeatureDiff(nn.Module):
  attention: str = 'CBAM'
  dtype: Any = jnp.float32
  remat: str = 'none'  # config.model.remat, per scale

  @nn.compact
  def __call__(self, feats1: Sequence[jax.Array], feats2: Sequence[jax.Array],
               train: bool = False) -> list[jax.Array]:
    block = remat_lib.wrap(DiffBlock, self.remat, (3,))
    return [block(self.attention, self.dtype, name=f'scale_{i}')(a, b, train)
            for i, (a, b) in enumerate(zip(feats1, feats2))]


def torch_rules(prefix: str, path: tuple[str, ...], model_cfg) -> list[tc.Rule]:
  """Rules for upstream `feature_diff` (prefix 'feature_diff')."""
  rules = []
  for i in range(len(model_cfg.out_dims)):
    p = (*path, f'scale_{i}')
    rules += layers.conv1x1_rules(f'{prefix}.diff_conv.{i}.0', (*p, 'diff_conv'))
    rules += tc.batchnorm(f'{prefix}.diff_conv.{i}.1', (*p, 'diff_bn'))
    a, pa = f'{prefix}.attention.{i}', (*p, 'attention')
    if model_cfg.diff_attention == 'CBAM':
      rules += layers.conv1x1_rules(f'{a}.channel_attention.1', (*pa, 'channel_fc1'), bias=False)
      rules += layers.conv1x1_rules(f'{a}.channel_attention.3', (*pa, 'channel_fc2'), bias=False)
      rules += tc.conv(f'{a}.spatial_attention.0', (*pa, 'spatial_conv'))
      rules += tc.batchnorm(f'{a}.spatial_attention.1', (*pa, 'spatial_bn'))
      rules += layers.conv1x1_rules(f'{a}.spatial_attention.3', (*pa, 'spatial_fc'))
    else:
      rules += layers.conv1x1_rules(f'{a}.fc.0', (*pa, 'fc1'))
      rules += layers.conv1x1_rules(f'{a}.fc.2', (*pa, 'fc2'))
  return rules
