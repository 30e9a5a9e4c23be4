"""Kernels: the same maths as a plain JAX op, written so that XLA (above all XLA:CPU) runs it well.

Each public function here equals a one-line plain form (a convolution, a bilinear upsample, an
add) in value and gradient, and is written out because XLA lowers the plain form, or autodiff of
it, slowly or with large temporaries. Each docstring says what it computes, why it exists and
which test in tests/models/test_kernels.py proves it equal to the plain form. The linen modules
that wrap the convolution kernels (`DepthwiseConv`, `ConvNoBias`, `GroupedConv`, `ShiftedConv`)
are building blocks in `layers.py`. Everything is NHWC.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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

  Written as banded matrix products because a gather + lerp has a scatter-add as its backward
  pass (slow on CPU and GPU), while a product's backward is a product too. Separable: each
  map's H axis is its own product; the W axis of all maps is ONE product that interpolates and
  sums at once (no per-map full-size output). The interpolation matrices have two non-zeros a
  row, so each product only multiplies blocks of output rows by the short input windows they
  read (`_banded_matrices`). The W product is written [W_out, W_in] @ [W_in, B*H*C] and
  transposed by whole C-vectors back to NHWC: as an einsum straight to NHWC, XLA fused an
  element-wise transpose into every consumer of the result, which slowed them all. Equal to
  the sum of torch's upsamplings and, with its gradient, to the dense separable product:
  tests/models/test_kernels.py::test_upsample_bilinear_sum_equals_torch_and_the_dense_product.
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

  Same maths as `x + b`, with a written-out VJP: b's gradient, the cotangent summed over the
  leading axes, is computed as a product with a ones row, because XLA:CPU runs a reduction over
  a few leading rows (e.g. a Swin block's relative position bias gradient) far slower than the
  matrix-vector product. Value and gradients equal autodiff of `x + b`:
  tests/models/test_kernels.py::test_add_broadcast_gradient_is_the_leading_sum.
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
  """sum over taps of tap(x shifted, kernel[dy, dx]): a 'same' convolution as shifted terms."""
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
  computed as k*k shifted multiply-adds (one fused elementwise loop) because XLA:CPU runs
  depthwise convolutions and their gradients as a slow generic loop. The VJP is written out:
  autodiff of the shifted form keeps every shifted copy of x as a residual (k*k times the
  activation) and XLA:CPU materialises each one in the forward pass; here the residual is x
  alone, the input gradient is the same shifted form on the cotangent with the kernel flipped,
  and the kernel gradient is `_depthwise_kernel_grad`. Value and gradients equal XLA's
  depthwise convolution:
  tests/models/test_kernels.py::test_depthwise_conv_equals_lax_convolution.
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
  of g they meet, and all k*k taps reduce them while they are in cache (a loop over taps would
  stream x and a shifted copy of g from memory k*k times, with more temporary memory).
  Float32 accumulation. The loop keeps one partial sum per example and the batch is summed
  after it: with the batch split over devices, a sum over the batch inside the loop is a
  cross-device all-reduce in every iteration (bench/README.md, "Multi-host on CPU").
  """
  b, h, w, c = x.shape
  rows = 2 if h % 2 == 0 else 1
  gp = _pad_same(g, k)

  def block(i, acc):
    xs = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)
    gs = jax.lax.dynamic_slice_in_dim(gp, i * rows, rows + k - 1, axis=1)
    taps = [jnp.sum(xs * gs[:, k - 1 - dy:k - 1 - dy + rows, k - 1 - dx:k - 1 - dx + w],
                    axis=(1, 2), dtype=jnp.float32)
            for dy in range(k) for dx in range(k)]
    return acc + jnp.stack(taps, axis=1).reshape(b, k, k, c)
  acc = jax.lax.fori_loop(0, h // rows, block, jnp.zeros((b, k, k, c), jnp.float32))
  return jnp.sum(acc, axis=0)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


@jax.custom_vjp
def shifted_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Dense 'same' convolution, stride 1, no bias: x [B, H, W, Cin], kernel [k, k, Cin, Cout].

  Same maths as `nn.Conv` (HWIO kernel), as k*k shifted matrix products, because XLA:CPU runs
  a full-resolution convolution's backward pass much slower than its forward while matmuls are
  fast both ways. The VJP is written out, as `depthwise_conv`'s: autodiff keeps the k*k
  shifted copies of x as residuals and forms the k*k input-gradient terms side by side, which
  set the train step's memory peak; the written-out backward runs the taps in a loop
  (`_shift_matmul`, `_shifted_bwd`) with x as the only residual. Undifferentiated (inference,
  export), the taps are unrolled: no loop for exporters to lower. Value and gradients equal
  XLA's convolution:
  tests/models/test_kernels.py::test_shifted_conv_equals_lax_convolution.
  """
  return _shift_sum(x, kernel, _matmul_f32).astype(x.dtype)


def _matmul_f32(s, w):
  return jnp.matmul(s, w, preferred_element_type=jnp.float32)


def _shift_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum over taps of (x shifted) @ kernel[tap], one tap per loop iteration, float32 accumulated.

  A loop, not k*k unrolled products (`shifted_conv`'s primal): in the train step XLA:CPU
  materialised all k*k shifted copies of x at once, early, next to the forward pass's
  full-resolution residuals. Same sums in the same order.
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
  # Kernel gradient of tap (dy, dx): x^T [Cin, HW] times g shifted by -d [HW, Cout] per example,
  # float32 accumulated. x is transposed once, so every tap's product is a plain batched matmul
  # (x^T @ shifted x made XLA transpose each slice); g is the narrower side to copy.
  # Pairing x shifted by +d with g equals pairing x with g shifted by -d; the taps run in a loop
  # (lax.map) so that one shifted copy of g exists at a time (unrolled, XLA scheduled all k*k).
  # One product per example, summed over the batch after the loop: a batch split over devices
  # then all-reduces once, not once per tap.
  b = x.shape[0]
  xt = jnp.swapaxes(x.reshape(b, -1, c), 1, 2)
  gp = _pad_same(g, k)

  def tap(t):
    s = jax.lax.dynamic_slice(gp, (0, k - 1 - t // k, k - 1 - t % k, 0), g.shape)
    return jnp.matmul(xt, s.reshape(b, -1, o), preferred_element_type=jnp.float32)
  dk = jnp.sum(jax.lax.map(tap, jnp.arange(k * k)), axis=1)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


shifted_conv.defvjp(_shifted_fwd, _shifted_bwd)
