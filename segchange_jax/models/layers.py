"""Small shared building blocks: torch-compatible norms, 1x1 convs, bilinear upsampling.

Everything is NHWC. 1x1 convolutions are `nn.Dense` over the channel axis (same maths, no
conv machinery); their torch weights map with the `conv1x1_to_dense` rule kind.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

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
  (at 512 px the neck's last 256 -> 256 conv costs ~100 GFLOP per step, forward and backward).
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


@functools.lru_cache(maxsize=None)
def _banded_matrices(sizes_in: tuple[int, ...], size_out: int):
  """The align_corners matrices of inputs sizes_in -> size_out, cut into row blocks.

  Output rows go in blocks of 64 (or 32, or all of them where neither divides size_out); a
  block of rows reads only a short window of each input (the rows it interpolates between).
  Returns ((window starts per block, window length) per input, [blocks, block, sum of window
  lengths] matrix): block j of the output is matrix[j] @ (input windows j stacked).
  """
  block = next((b for b in (64, 32) if size_out % b == 0 and size_out > b), size_out)
  n_blocks = size_out // block
  windows, matrices = [], []
  for n in sizes_in:
    lo, hi, _ = _align_corners_taps(n, size_out)
    m = _align_corners_matrix(n, size_out)
    span = max(int(hi[(j + 1) * block - 1] - lo[j * block]) + 1 for j in range(n_blocks))
    starts = tuple(min(int(lo[j * block]), n - span) for j in range(n_blocks))
    rows = m.reshape(n_blocks, block, n)
    matrices.append(np.stack([r[:, s:s + span] for r, s in zip(rows, starts)]))
    # Every weight of a block's rows lies inside its window (the windows hold all non-zeros).
    assert np.count_nonzero(matrices[-1]) == np.count_nonzero(m), (n, size_out)
    windows.append((starts, span))
  return tuple(windows), np.concatenate(matrices, axis=2)


def _windows(x: jax.Array, starts: Sequence[int], span: int, axis: int) -> jax.Array:
  """[len(starts), ...]: x's slices [start, start + span) along `axis`, stacked in front."""
  return jnp.stack([jax.lax.slice_in_dim(x, s, s + span, axis=axis) for s in starts])


def upsample_bilinear_sum(maps: Sequence[jax.Array], factors: Sequence[int]) -> jax.Array:
  """sum_i torch `nn.Upsample(scale_factor=factors[i], mode='bilinear', align_corners=True)`
  of maps[i], NHWC, for maps that land on one [B, H, W, C] grid (one map: a plain upsample).

  Separable: matrix products per axis. Unlike a gather + lerp, its backward pass is a matrix
  product too (a gather's is a scatter-add, several times slower on CPU and GPU). The
  interpolation matrices have two non-zeros a row, so each product is banded
  (`_banded_matrices`): blocks of output rows times the short input windows they read, a
  batched product with ~1/6 of a dense product's FLOPs (Swin-B neck at 512 px: 38 -> 6 GFLOP
  forward + backward, 0.30 -> 0.12 s). Each map's H axis has its own product; the W axis of
  all maps is ONE product: their H-upsampled columns' windows are stacked against the stacked
  interpolation matrices, which interpolates and sums at once (no per-map full-size output).
  That product is written [W_out, W_in] @ [W_in, B*H*C] and transposed by whole C-vectors
  back to NHWC. Written as einsum 'pw,bowc->bopc', XLA computed it as [B*H*C, W] and fused
  the element-wise transpose back to NHWC into every consumer: the Swin-B neck's EGA ran its
  shifted sums ~4x slower (512 px: 2 s of its step).
  """
  if len(maps) != len(factors) or not maps:
    raise ValueError(f'upsample_bilinear_sum: {len(maps)} maps for {len(factors)} factors')
  b, h0, w0, c = maps[0].shape
  out_h, out_w = h0 * factors[0], w0 * factors[0]
  precision = jax.lax.Precision.HIGHEST
  columns = []
  for x, f in zip(maps, factors):
    if (x.shape[0], x.shape[1] * f, x.shape[2] * f, x.shape[3]) != (b, out_h, out_w, c):
      raise ValueError(f'upsample_bilinear_sum: map {x.shape} x {f} does not land on the '
                       f'{(b, out_h, out_w, c)} grid of the first map')
    ((starts, span),), mh = _banded_matrices((x.shape[1],), out_h)
    rows = jnp.einsum('jps,jbswc->wbjpc', jnp.asarray(mh, x.dtype),
                      _windows(x, starts, span, axis=1), precision=precision)
    columns.append(rows.reshape(x.shape[2], -1))  # [W_in, B * H_out * C]
  windows, mw = _banded_matrices(tuple(x.shape[2] for x in maps), out_w)
  stacked = jnp.concatenate([_windows(col, starts, span, axis=0)
                             for col, (starts, span) in zip(columns, windows)], axis=1)
  out = jnp.einsum('jps,jsn->jpn', jnp.asarray(mw, stacked.dtype), stacked,
                   precision=precision)
  return out.reshape(out_w, b, out_h, c).transpose(1, 2, 0, 3)


def add_broadcast(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b, b broadcast over x's leading axes (b.shape == x.shape[-b.ndim:]).

  Same maths as `x + b`. b's gradient, the cotangent summed over the leading axes, is a
  product with a ones row: XLA:CPU runs a reduction over a few leading rows ~100x slower
  (summing [2, 25, 16, 49, 49] to a Swin-B stage-3 block's [16, 49, 49] relative position
  bias gradient at 512 px: 13 ms as a reduce, 0.14 ms as a matrix-vector product).
  """
  if b.shape != x.shape[x.ndim - b.ndim:]:
    raise ValueError(f'add_broadcast: {b.shape} is not the trailing shape of {x.shape}')
  x_dtype, b_shape, b_dtype = x.dtype, b.shape, b.dtype

  @jax.custom_vjp
  def add(x, b):
    return x + b

  def bwd(_, g):
    g2 = g.reshape(-1, int(np.prod(b_shape)))  # the leading axes may be symbolic (export)
    ones = jnp.ones((1, g2.shape[0]), g.dtype)
    # HIGHEST: a float32 sum also on accelerators, whose default matmul precision is lower.
    db = jnp.matmul(ones, g2, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
    return g.astype(x_dtype), db.reshape(b_shape).astype(b_dtype)

  add.defvjp(lambda x, b: (x + b, None), bwd)
  return add(x, b)


def conv1x1_rules(torch_prefix: str, path, bias: bool = True) -> list:
  """torch 1x1 Conv2d -> our Dense over channels."""
  from segchange_jax.interop import torch_rules as tc  # pylint: disable=g-import-not-at-top
  rules = [tc.Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv1x1_to_dense')]
  if bias:
    rules.append(tc.Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules


def _pad_same(x: jax.Array, k: int) -> jax.Array:
  """x zero-padded by k//2 on both sides of H and W."""
  p = k // 2
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _taps(x: jax.Array, k: int):
  """(dy, dx, x shifted by (dy - k//2, dx - k//2)) for every tap of a k x k 'same' window."""
  h, w = x.shape[1:3]
  xp = _pad_same(x, k)
  for dy in range(k):
    for dx in range(k):
      yield dy, dx, xp[:, dy:dy + h, dx:dx + w]


def _shift_sum(x: jax.Array, kernel: jax.Array, tap: Callable) -> jax.Array:
  out = None
  for dy, dx, s in _taps(x, kernel.shape[0]):
    term = tap(s, kernel[dy, dx])
    out = term if out is None else out + term
  return out


def _mul(s, w):
  return s * w


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 'same' convolution, stride 1, no bias: x [B, H, W, C], kernel [k, k, C].

  torch Conv2d(C, C, k, padding=k//2, groups=C) with weight[c, 0, dy, dx] = kernel[dy, dx, c],
  computed as k*k shifted multiply-adds (one fused elementwise loop; XLA:CPU runs depthwise
  convolutions and their gradients as a slow generic loop). The VJP is written out: autodiff
  of the shifted form keeps every shifted copy of x as a residual (k*k x the activation) and
  XLA:CPU materialises each one in the forward pass; here the residual is x alone, the input
  gradient is the same shifted form on the cotangent with the kernel flipped, and each tap's
  kernel gradient is one reduction.
  """
  return _shift_sum(x, kernel, _mul)


def _depthwise_fwd(x, kernel):
  return _shift_sum(x, kernel, _mul), (x, kernel)


def _depthwise_bwd(res, g):
  x, kernel = res
  dx = _shift_sum(g, kernel[::-1, ::-1], _mul)
  dk = _depthwise_kernel_grad(x, g, kernel.shape[0])
  return dx, dk.astype(kernel.dtype)


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """[k, k, C] kernel gradient of `depthwise_conv`: sum over b, h, w of x times g shifted.

  Tap (dy, dx) pairs x shifted by +d with g; the same sum shifts g by -d instead (copies of x
  could be made as soon as x exists, and XLA did make all k*k of them in the forward pass).
  The sum runs over blocks of two rows: each iteration reads two rows of x and the k + 1 rows
  of g they meet, and all k*k taps reduce them while they are in cache. A loop over taps
  instead streamed x and a shifted copy of g from memory k*k times: 2x slower at 512 px
  (0.33 -> 0.16 s per kernel), and twice the temporary memory. Float32 accumulation.
  """
  _, h, w, c = x.shape
  rows = 2 if h % 2 == 0 else 1
  gp = _pad_same(g, k)

  def block(i, acc):
    xs = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)
    gs = jax.lax.dynamic_slice_in_dim(gp, i * rows, rows + k - 1, axis=1)
    taps = [jnp.sum(xs * gs[:, k - 1 - dy:k - 1 - dy + rows, k - 1 - dx:k - 1 - dx + w],
                    axis=(0, 1, 2), dtype=jnp.float32)
            for dy in range(k) for dx in range(k)]
    return acc + jnp.stack(taps).reshape(k, k, c)
  return jax.lax.fori_loop(0, h // rows, block, jnp.zeros((k, k, c), jnp.float32))


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


@jax.custom_vjp
def shifted_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Dense 'same' convolution, stride 1, no bias: x [B, H, W, Cin], kernel [k, k, Cin, Cout].

  Same maths as `nn.Conv` (HWIO kernel), as k*k shifted matrix products: XLA:CPU runs a
  full-resolution 3x3 convolution's backward pass ~10x slower than its forward, matmuls are
  fast both ways. The VJP is written out, as `depthwise_conv`'s: autodiff keeps the k*k
  shifted copies of x as residuals and forms the k*k input-gradient terms side by side (at
  512 px batch 2 the mask head's conv held 4.5 GB of them at the train step's memory peak).
  Undifferentiated (inference, export), the taps are unrolled: no loop for exporters to lower.
  """
  return _shift_sum(x, kernel, _matmul_f32).astype(x.dtype)


def _matmul_f32(s, w):
  return jnp.matmul(s, w, preferred_element_type=jnp.float32)


def _shift_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum over taps of (x shifted) @ kernel[tap], one tap per loop iteration, float32 accumulated.

  A loop, not k*k unrolled products (`shifted_conv`'s primal): in the train step XLA:CPU
  materialised all k*k shifted copies of x at once, early, next to the forward pass's
  full-resolution residuals (2.1 GB at 512 px batch 2). Same sums in the same order.
  """
  k = kernel.shape[0]
  xp = _pad_same(x, k)
  taps = jnp.asarray(kernel).reshape(k * k, *kernel.shape[2:])

  def body(t, acc):
    s = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0), x.shape)
    return acc + jnp.matmul(s, taps[t], preferred_element_type=jnp.float32)
  acc = jnp.zeros((*x.shape[:3], kernel.shape[-1]), jnp.float32)
  return jax.lax.fori_loop(0, k * k, body, acc).astype(x.dtype)


def _shifted_fwd(x, kernel):
  return _shift_matmul(x, kernel), (x, kernel)


def _shifted_bwd(res, g):
  x, kernel = res
  k, c, o = kernel.shape[0], x.shape[-1], g.shape[-1]
  dx = _shift_matmul(g, jnp.swapaxes(kernel[::-1, ::-1], -1, -2))
  # Kernel gradient of tap (dy, dx): x^T [Cin, N] times g shifted by -d [N, Cout], float32
  # accumulated. x is transposed once, so every tap's product is a plain [M, K] x [K, N] matmul
  # (x^T @ shifted x made XLA transpose each slice: 5x slower); g is the narrower side to copy.
  # Pairing x shifted by +d with g equals pairing x with g shifted by -d; the taps run in a loop
  # (lax.map) so that one shifted copy of g exists at a time (unrolled, XLA scheduled all k*k).
  xt = x.reshape(-1, c).T
  gp = _pad_same(g, k)

  def tap(t):
    s = jax.lax.dynamic_slice(gp, (0, k - 1 - t // k, k - 1 - t % k, 0), g.shape)
    return jnp.matmul(xt, s.reshape(-1, o), preferred_element_type=jnp.float32)
  dk = jax.lax.map(tap, jnp.arange(k * k))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


shifted_conv.defvjp(_shifted_fwd, _shifted_bwd)


class DepthwiseConv(nn.Module):
  """torch Conv2d(C, C, k, padding=k//2, groups=C, bias=False): `depthwise_conv`.

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
    return depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype))


class ConvNoBias(nn.Module):
  """torch Conv2d(k, stride, padding, groups 1 or C, bias=False) with `nn.Conv`'s parameter.

  Parameter `kernel` [k, k, C / groups, features] (HWIO, path `<name>/kernel`) as
  `nn.Conv(use_bias=False)`, so converters and checkpoints do not change. Stride-1 'same'
  convolutions are computed without XLA's convolution, whose gradients XLA:CPU runs as slow
  generic loops: 1x1 as a matmul, depthwise as `depthwise_conv`, dense kxk as `shifted_conv`.
  Other strides / paddings use `lax.conv_general_dilated`, as nn.Conv does.
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
        return shifted_conv(x, kernel)
      if self.groups == c == self.features:
        return depthwise_conv(x, kernel[:, :, 0])
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(p, p), (p, p)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)


class GroupedConv(nn.Module):
  """torch Conv2d(C, groups, k, padding=k//2, groups=groups): ONE output channel per group.

  Same parameters (names, shapes, init) and maths as `nn.Conv(..., feature_group_count=groups)`,
  computed as a per-channel `depthwise_conv` followed by a sum within each group. XLA's CPU
  backend lowers grouped convolutions, and above all their weight and input gradients, to a
  slow generic loop (the CBAM spatial gate's backward was the largest single op of the Swin-B
  train step); this form is a few memory-bound loops both ways.
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
    acc = depthwise_conv(x.astype(self.dtype), wc)
    return acc.reshape(b, h, w, self.groups, g).sum(-1) + bias.astype(self.dtype)


class ShiftedConv(nn.Module):
  """torch Conv2d(k, stride 1, padding k//2): `shifted_conv` plus bias.

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
    out = shifted_conv(x.astype(self.dtype), kernel.astype(self.dtype))
    return out + bias.astype(self.dtype)
