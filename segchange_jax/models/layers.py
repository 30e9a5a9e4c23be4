"""Small shared building blocks: torch-compatible norms, 1x1 convs, bilinear upsampling.

Everything is NHWC. 1x1 convolutions are `nn.Dense` over the channel axis (same maths, no
conv machinery); their torch weights map with the `conv1x1_to_dense` rule kind.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-5  # torch default for LayerNorm, GroupNorm and BatchNorm


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """torch BatchNorm2d semantics: momentum 0.1 (flax 0.9), eps 1e-5, biased batch var."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, dtype=dtype,
                      name=name)


def group_norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=EPS, dtype=dtype, name=name)


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=EPS, dtype=dtype, name=name)


def dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, groups: int = 1,
         use_bias: bool = True, kernel_init=None) -> nn.Conv:
  """torch Conv2d(k, stride 1, padding k//2) in NHWC."""
  kwargs = {} if kernel_init is None else {'kernel_init': kernel_init}
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, feature_group_count=groups,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


@functools.lru_cache(maxsize=None)
def _align_corners_taps(size_in: int, size_out: int):
  """Indices and weights of torch bilinear align_corners=True along one axis."""
  if size_out == 1 or size_in == 1:
    src = np.zeros(size_out, np.float32)
  else:
    # float32 like torch's CPU/GPU kernels, so the fractional weights round the same way.
    scale = np.float32((size_in - 1) / (size_out - 1))
    src = np.arange(size_out, dtype=np.float32) * scale
  lo = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = (src - lo).astype(np.float32)
  return lo, hi, frac


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """torch `nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=True)`, NHWC.

  Separable gather + lerp (memory bound, no dense interpolation matrices).
  """
  if factor == 1:
    return x
  _, h, w, _ = x.shape
  for axis, size in ((1, h), (2, w)):
    lo, hi, frac = _align_corners_taps(size, size * factor)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    t = jnp.asarray(frac, x.dtype).reshape(shape)
    a = jnp.take(x, jnp.asarray(lo), axis=axis)
    b = jnp.take(x, jnp.asarray(hi), axis=axis)
    x = a + (b - a) * t
  return x


def conv1x1_rules(torch_prefix: str, path, bias: bool = True) -> list:
  """torch 1x1 Conv2d -> our Dense over channels."""
  from segchange_jax.models import torch_convert as tc  # pylint: disable=g-import-not-at-top
  rules = [tc.Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv1x1_to_dense')]
  if bias:
    rules.append(tc.Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules
