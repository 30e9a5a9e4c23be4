"""Small shared building blocks: torch-compatible norms, 1x1 convs, bilinear upsampling.

Everything is NHWC. 1x1 convolutions are `nn.Dense` over the channel axis (same maths, no
conv machinery); their torch weights map with the `conv1x1_to_dense` rule kind.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segchange_jax.models.backbones import norms

EPS = norms.EPS  # torch default for LayerNorm, GroupNorm and BatchNorm


def batch_norm(train: bool, dtype: Any, name: str) -> Callable[[jax.Array], jax.Array]:
  """torch BatchNorm2d (momentum 0.1, eps 1e-5, unbiased running var): `norms.BatchNorm`.

  Returns the bound module's call with `train` fixed, so call sites read `bn(x)`. Variable names
  (params scale/bias, batch_stats mean/var) are those of `flax.linen.BatchNorm`, so checkpoints
  and converter rules are unchanged.
  """
  return functools.partial(norms.BatchNorm(dtype=dtype, name=name), train=train)


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


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] interpolation matrix (two non-zeros a row) of the taps above."""
  lo, hi, frac = _align_corners_taps(size_in, size_out)
  m = np.zeros((size_out, size_in), np.float32)
  rows = np.arange(size_out)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """torch `nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=True)`, NHWC.

  Separable: one small matrix product per axis. Unlike a gather + lerp, its backward pass is
  a matrix product too (a gather's is a scatter-add, several times slower on CPU and GPU), and
  the matrices are tiny ([H*factor, H]).
  """
  if factor == 1:
    return x
  _, h, w, _ = x.shape
  mh = jnp.asarray(_align_corners_matrix(h, h * factor), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(w, w * factor), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=jax.lax.Precision.HIGHEST)


def conv1x1_rules(torch_prefix: str, path, bias: bool = True) -> list:
  """torch 1x1 Conv2d -> our Dense over channels."""
  from segchange_jax.models import torch_convert as tc  # pylint: disable=g-import-not-at-top
  rules = [tc.Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv1x1_to_dense')]
  if bias:
    rules.append(tc.Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules
