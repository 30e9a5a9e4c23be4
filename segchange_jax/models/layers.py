"""Small shared building blocks: torch-compatible norms, dense layers, convolutions.

Everything is NHWC. 1x1 convolutions are `nn.Dense` over the channel axis (same maths, no
conv machinery); their torch weights map with the `conv1x1_to_dense` rule kind. The convolution
modules keep `nn.Conv`'s parameters and compute with the kernels of `kernels.py`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import kernels
from segchange_jax.models import norms
from segchange_jax.models import torch_rules as tc

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


class Linear(nn.Module):
  """`nn.Dense` (same parameters) whose kernel and bias can also be read by the caller.

  `Linear(n)(x)` applies it; `Linear(n)(in_features=d)` returns (kernel, bias) cast to `dtype`,
  for callers that fold the weights into their own (see `DeferredDense`).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array | None = None, in_features: int | None = None):
    d = x.shape[-1] if x is not None else in_features
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (d, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    if x is None:
      return kernel, bias
    return x.astype(self.dtype) @ kernel + bias


class DeferredDense(NamedTuple):
  """A per-pixel affine map not applied yet: the value is `x @ kernel + bias`.

  A producer whose last op is a 1x1 conv returns this instead of the product when every
  consumer is linear in the value (pixel sums, pixel-attention scores, a following 1x1 conv):
  they fold `kernel` into their own small weights and never form the full-resolution product
  (a full-resolution matmul in the forward pass and two in the backward).
  `kernel` None means the identity (the value is `x`).
  """
  x: jax.Array
  kernel: jax.Array | None = None
  bias: jax.Array | None = None

  @property
  def channels(self) -> int:
    """Channels of the value (of `x` when there is no kernel)."""
    return self.x.shape[-1] if self.kernel is None else self.kernel.shape[-1]

  def fold(self, w: jax.Array) -> jax.Array:
    """Weights [..., C] dotted with the value's channels -> the weights [..., Cx] that give the
    same dot with `x`'s, less `offset(w)`."""
    if self.kernel is None:
      return w
    return jnp.einsum('zc,...c->...z', self.kernel.astype(w.dtype), w)

  def offset(self, w: jax.Array) -> jax.Array | float:
    """What the bias adds to the dot of weights [..., C] with the value: [...] (0 if none)."""
    return 0.0 if self.bias is None else w @ self.bias.astype(w.dtype)

  def combine(self, pooled: jax.Array, weight_sum: jax.Array | float = 1.0) -> jax.Array:
    """A weighted sum of `x`'s pixels [..., Cx] (weights summing to `weight_sum` [...]) ->
    the same weighted sum of the value's pixels [..., C]."""
    if self.kernel is None:
      return pooled
    ws = weight_sum if isinstance(weight_sum, float) else weight_sum[..., None].astype(pooled.dtype)
    return pooled @ self.kernel.astype(pooled.dtype) + ws * self.bias.astype(pooled.dtype)

  def materialize(self) -> jax.Array:
    """The value itself (for callers that are not linear in it; costs the full product)."""
    return self.combine(self.x)


def conv(features: int, kernel: int, dtype: Any, name: str, groups: int = 1,
         use_bias: bool = True, kernel_init=None) -> nn.Conv:
  """torch Conv2d(k, stride 1, padding k//2) in NHWC."""
  kwargs = {} if kernel_init is None else {'kernel_init': kernel_init}
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, feature_group_count=groups,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


def conv1x1_rules(torch_prefix: str, path, bias: bool = True) -> list:
  """torch 1x1 Conv2d -> our Dense over channels."""
  rules = [tc.Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv1x1_to_dense')]
  if bias:
    rules.append(tc.Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules


class DepthwiseConv(nn.Module):
  """torch Conv2d(C, C, k, padding=k//2, groups=C, bias=False): `kernels.depthwise_conv`.

  Parameter `kernel` [k, k, 1, C] as flax `nn.Conv(feature_group_count=C)`; `kernel_init`
  defaults to flax's.
  """
  kernel: int = 3
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, k = x.shape[-1], self.kernel
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, c))
    return kernels.depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype))


class ConvNoBias(nn.Module):
  """torch Conv2d(k, stride, padding, groups 1 or C, bias=False) with `nn.Conv`'s parameter.

  Parameter `kernel` [k, k, C / groups, features] (HWIO, path `<name>/kernel`) as
  `nn.Conv(use_bias=False)`, so converters and checkpoints do not change. Stride-1 'same'
  convolutions are computed without XLA's convolution, whose gradients XLA:CPU runs as slow
  generic loops: 1x1 as a matmul, depthwise as `kernels.depthwise_conv`, dense kxk as
  `kernels.shifted_conv`. Other strides / paddings use `lax.conv_general_dilated`, as nn.Conv
  does.
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int | None = None  # None: (k - 1) // 2 on every side
  groups: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel, x.shape[-1]
    p = (k - 1) // 2 if self.padding is None else self.padding
    kernel = self.param('kernel', self.kernel_init, (k, k, c // self.groups, self.features))
    kernel, x = kernel.astype(self.dtype), x.astype(self.dtype)
    if self.stride == 1 and 2 * p == k - 1:
      if k == 1 and self.groups == 1:
        return x @ kernel[0, 0]
      if self.groups == 1:
        return kernels.shifted_conv(x, kernel)
      if self.groups == c == self.features:
        return kernels.depthwise_conv(x, kernel[:, :, 0])
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(p, p), (p, p)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)


class GroupedConv(nn.Module):
  """torch Conv2d(C, groups, k, padding=k//2, groups=groups): ONE output channel per group.

  Same parameters (names, shapes, init) and maths as `nn.Conv(..., feature_group_count=groups)`,
  computed as a per-channel `kernels.depthwise_conv` followed by a sum within each group.
  XLA's CPU backend lowers grouped convolutions, and above all their weight and input
  gradients, to a slow generic loop (the CBAM spatial gate's backward was the largest single op
  of the Swin-B train step); this form is a few memory-bound loops both ways.
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
    acc = kernels.depthwise_conv(x.astype(self.dtype), wc)
    return acc.reshape(b, h, w, self.groups, g).sum(-1) + bias.astype(self.dtype)


class ShiftedConv(nn.Module):
  """torch Conv2d(k, stride 1, padding k//2): `kernels.shifted_conv` plus bias.

  Same parameters (names, shapes, init) and maths as `conv(...)` (nn.Conv).
  """
  features: int
  kernel: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, k = x.shape[-1], self.kernel
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    out = kernels.shifted_conv(x.astype(self.dtype), kernel.astype(self.dtype))
    return out + bias.astype(self.dtype)
