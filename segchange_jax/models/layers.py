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
  from segchange_jax.interop import torch_rules as tc  # pylint: disable=g-import-not-at-top
  rules = [tc.Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv1x1_to_dense')]
  if bias:
    rules.append(tc.Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules


class GroupedConv(nn.Module):
  """torch Conv2d(C, groups, k, padding=k//2, groups=groups): ONE output channel per group.

  Same parameters (names, shapes, init) and maths as `nn.Conv(..., feature_group_count=groups)`,
  computed as k*k shifted per-channel multiply-adds followed by a sum within each group. XLA's
  CPU backend lowers grouped convolutions, and above all their weight and input gradients, to a
  slow generic loop (the CBAM spatial gate's backward was the largest single op of the Swin-B
  train step); this form fuses into a few memory-bound elementwise loops both ways.
  """
  groups: int
  kernel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g, k = c // self.groups, self.kernel
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, g, self.groups))
    bias = self.param('bias', nn.initializers.zeros, (self.groups,))
    # Per input channel weight: channel j*g+i belongs to group (= output) j, slot i.
    wc = kernel.transpose(0, 1, 3, 2).reshape(k, k, c).astype(self.dtype)
    p = k // 2
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
    acc = None
    for dy in range(k):
      for dx in range(k):
        term = xp[:, dy:dy + h, dx:dx + w] * wc[dy, dx]
        acc = term if acc is None else acc + term
    return acc.reshape(b, h, w, self.groups, g).sum(-1) + bias.astype(self.dtype)


class ShiftedConv(nn.Module):
  """torch Conv2d(k, stride 1, padding k//2) as a sum of k*k shifted matrix products.

  Same parameters (names, shapes, init) and maths as `conv(...)` (nn.Conv). XLA:CPU runs a
  full-resolution 3x3 convolution's backward pass ~10x slower than its forward (profile of the
  Swin-B step: the mask head's 3x3 conv); here forward and backward are plain matmuls.
  """
  features: int
  kernel: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    k = self.kernel
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    kernel = kernel.astype(self.dtype)
    p = k // 2
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
    out = None
    for dy in range(k):
      for dx in range(k):
        term = xp[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
        out = term if out is None else out + term
    return out + bias.astype(self.dtype)
