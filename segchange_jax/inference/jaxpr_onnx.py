r"""A jaxpr -> ONNX converter (opset 17, symbolic dimensions become dynamic ones).

    model, ops = jaxpr_onnx.to_onnx(fn, {'x': jax.ShapeDtypeStruct((b, 8), jnp.float32)},
                                    consts=[w], output_names=['y'])
    jaxpr_onnx.save(model, 'f.onnx')

`fn(consts, *inputs)` is traced to a jaxpr (`consts` become initializers, `inputs` the graph
inputs, in order) and each equation is emitted as ONNX nodes with `onnx.helper`:

- Equations whose inputs are all known (weights, numpy tables, index arithmetic) are evaluated
  at conversion time with JAX itself (constant folding), so e.g. a relative-position gather
  or a kernel reshape becomes an initializer.
- `gather` with a static or a dynamic start vector and no batch of indices (what jnp slicing
  lowers to when the batch is symbolic) becomes Slice/Squeeze; whole rows of a table picked by
  an array of indices of any rank (`table[idx]`, indices clamped into range like XLA's)
  becomes Gather.
- `dot_general` becomes MatMul (dense layers) or Einsum; convolutions Transpose+Conv+Transpose;
  `reduce_window_max` MaxPool; `erfc` 1 - Erf; `rsqrt` Reciprocal(Sqrt).
- Shapes that contain a symbolic dimension (`b`, `2*b`, ...) are computed in the graph from
  the Shape of the first input that has the bare symbol.

An equation outside these forms raises `ConversionError` naming the primitive and its source
line; a new primitive is one `p_<name>` method of `Converter`.

Why a converter of our own: jax2onnx (PyPI) pins orbax-checkpoint < 0.11.37, which conflicts
with this package's orbax-checkpoint >= 0.12.8, and it pulls equinox, dm-pix and netron.
This module imports jax, numpy and onnx only (nothing of the package around it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

OPSET = 17
# A folded broadcast may grow at most this much beyond its input (a bias broadcast to a
# feature-map shape would bloat the file; it is emitted as Expand instead).
_FOLD_GROWTH = 1 << 16
# float32 sums over more elements than this are accumulated in float64 (see p_reduce_sum).
_F64_SUM_ABOVE = 64


class ConversionError(ValueError):
  """The function cannot be converted; the message names the primitive and its source line."""


def plain_symbol(d) -> tuple[str, int, int] | None:
  """(symbol, 0, 1) for a bare symbolic dimension such as `b`, else None."""
  name = str(d)
  return (name, 0, 1) if name.isidentifier() else None


class _Tensor:
  """A runtime value of the ONNX graph: its name and the JAX aval (shape may be symbolic)."""

  def __init__(self, name: str, aval):
    self.name, self.aval = name, aval


def _is_const_dim(d) -> bool:
  return isinstance(d, (int, np.integer))


def _source(eqn) -> str:
  from jax.extend import source_info_util  # pylint: disable=g-import-not-at-top
  return source_info_util.summarize(eqn.source_info)


def _unary(op: str):
  """Lowering of an elementwise lax primitive to one ONNX op."""
  def lower(self, eqn, x, **_):
    del eqn
    return self.node1(op, [self.name_of(x)])
  return lower


def _binary(op: str):
  def lower(self, eqn, x, y):
    del eqn
    return self.node1(op, [self.name_of(x), self.name_of(y)])
  return lower


class Converter:
  """Walks a jaxpr and appends ONNX nodes; see the module docstring.

  `linear_dim(d)` reads a symbolic dimension as (symbol, c0, k) meaning c0 + k * symbol (None
  when it is not one); the default knows bare symbols only (`plain_symbol`).
  """

  def __init__(self, linear_dim: Callable[[Any], tuple[str, int, int] | None] | None = None):
    import onnx  # pylint: disable=g-import-not-at-top
    self.linear_dim = linear_dim or plain_symbol
    self.onnx = onnx
    self.helper = onnx.helper
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self._const_names: dict[int, tuple[str, np.ndarray]] = {}
    self._counter = 0
    self.dims: dict[str, str] = {}  # symbol -> int64 [1] tensor name
    self.ops_used: dict[str, int] = {}

  # ------------------------------------------------------------------ graph helpers
  def fresh(self, hint: str = 't') -> str:
    self._counter += 1
    return f'{hint}_{self._counter}'

  def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> list[str]:
    outs = [self.fresh(op.lower()) for _ in range(n_out)]
    self.nodes.append(self.helper.make_node(op, list(inputs), outs, **attrs))
    self.ops_used[op] = self.ops_used.get(op, 0) + 1
    return outs

  def node1(self, op: str, inputs: Sequence[str], **attrs) -> str:
    return self.node(op, inputs, 1, **attrs)[0]

  def const(self, value) -> str:
    """Initializer name for a numpy value (deduplicated by identity)."""
    arr = np.asarray(value)
    key = id(value)
    hit = self._const_names.get(key)
    if hit is not None and hit[1] is value:
      return hit[0]
    if arr.dtype == np.dtype('bfloat16') or arr.dtype.kind not in 'fiub':
      raise ConversionError(f'constant of dtype {arr.dtype} has no ONNX form here')
    name = self.fresh('c')
    # reshape: np.ascontiguousarray makes a 0-d array 1-d, which Unsqueeze would then misread.
    self.initializers.append(self.onnx.numpy_helper.from_array(
        np.ascontiguousarray(arr).reshape(arr.shape), name))
    self._const_names[key] = (name, value)
    return name

  def ints(self, values: Sequence[int]) -> str:
    return self.const(np.asarray(list(values), np.int64))

  def name_of(self, v) -> str:
    return v.name if isinstance(v, _Tensor) else self.const(v)

  def dim(self, d) -> str:
    """int64 [1] tensor holding dimension `d` (an int or a linear expression of one symbol)."""
    if _is_const_dim(d):
      return self.ints([int(d)])
    linear = self.linear_dim(d)
    if linear is None or linear[0] not in self.dims:
      raise ConversionError(f'dimension {d} is not a linear function of the batch')
    s, c0, k = linear
    out = self.dims[s]
    if k != 1:
      out = self.node1('Mul', [out, self.ints([k])])
    if c0:
      out = self.node1('Add', [out, self.ints([c0])])
    return out

  def shape(self, dims: Sequence[Any], allow_infer: bool = True) -> str:
    """int64 shape tensor; one symbolic dimension becomes -1 when `allow_infer` (Reshape)."""
    if all(_is_const_dim(d) for d in dims):
      return self.ints([int(d) for d in dims])
    sym = [i for i, d in enumerate(dims) if not _is_const_dim(d)]
    if allow_infer and len(sym) == 1:
      return self.ints([-1 if i == sym[0] else int(d) for i, d in enumerate(dims)])
    return self.node1('Concat', [self.dim(d) for d in dims], axis=0)

  # ------------------------------------------------------------------ jaxpr walk
  def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Emits `jaxpr` (open) with constvars = consts and invars = args; returns its outputs."""
    from jax.extend import core  # pylint: disable=g-import-not-at-top
    env: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, core.Literal):
        return np.asarray(v.val, dtype=v.aval.dtype)
      return env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x if isinstance(x, _Tensor) else np.asarray(x)
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      try:
        outs = self.eqn(eqn, ins)
      except ConversionError as e:
        if 'at ' in str(e).split('\n')[-1]:
          raise
        raise ConversionError(f'{e}\n  at {eqn.primitive.name} ({_source(eqn)})') from None
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    sub = _subjaxpr(eqn)
    if sub is not None:  # jit, custom_jvp_call, remat...: inline
      jaxpr, consts = sub
      return self.run(jaxpr, consts, ins)
    if self._foldable(eqn, ins):
      return self._fold(eqn, ins)
    fn = getattr(self, f'p_{name}', None)
    if fn is None:
      raise ConversionError(f'no ONNX lowering for lax primitive {name!r}')
    out = fn(eqn, *ins)
    outs = out if isinstance(out, list) else [out]
    return [_Tensor(o, v.aval) for o, v in zip(outs, eqn.outvars)]

  def _foldable(self, eqn, ins) -> bool:
    if any(isinstance(x, _Tensor) for x in ins):
      return False
    if eqn.primitive.name == 'dim_as_value':
      return False
    for v in eqn.outvars:
      if not all(_is_const_dim(d) for d in v.aval.shape):
        return False
    if eqn.primitive.name not in ('broadcast_in_dim', 'iota'):
      return True
    biggest = max([int(np.size(x)) for x in ins] + [1])
    return all(int(np.prod(v.aval.shape)) <= biggest + _FOLD_GROWTH for v in eqn.outvars)

  def _fold(self, eqn, ins) -> list[np.ndarray]:
    # As jax.core.eval_jaxpr binds an equation (its exact semantics, no numpy re-implementation).
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    out = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o) for o in out]

  # ------------------------------------------------------------------ primitives
  p_neg, p_abs, p_exp = _unary('Neg'), _unary('Abs'), _unary('Exp')
  p_log, p_sqrt, p_tanh = _unary('Log'), _unary('Sqrt'), _unary('Tanh')
  p_logistic, p_sign, p_floor = _unary('Sigmoid'), _unary('Sign'), _unary('Floor')
  p_ceil, p_erf, p_not = _unary('Ceil'), _unary('Erf'), _unary('Not')
  p_sin, p_cos = _unary('Sin'), _unary('Cos')
  p_add, p_sub, p_mul, p_div = _binary('Add'), _binary('Sub'), _binary('Mul'), _binary('Div')
  p_max, p_min, p_pow = _binary('Max'), _binary('Min'), _binary('Pow')
  p_eq, p_lt, p_gt = _binary('Equal'), _binary('Less'), _binary('Greater')
  p_le, p_ge = _binary('LessOrEqual'), _binary('GreaterOrEqual')
  p_and, p_or = _binary('And'), _binary('Or')

  def p_ne(self, eqn, x, y):
    return self.node1('Not', [self.p_eq(eqn, x, y)])

  def p_rsqrt(self, eqn, x, **_):
    return self.node1('Reciprocal', [self.node1('Sqrt', [self.name_of(x)])])

  def p_erfc(self, eqn, x):
    one = self.const(np.ones((), eqn.outvars[0].aval.dtype))
    return self.node1('Sub', [one, self.node1('Erf', [self.name_of(x)])])

  def p_square(self, eqn, x):
    n = self.name_of(x)
    return self.node1('Mul', [n, n])

  def p_integer_pow(self, eqn, x):
    y = int(eqn.params['y'])
    n = self.name_of(x)
    if y == 0:
      return self.node1('Expand', [self.const(np.ones((), eqn.outvars[0].aval.dtype)),
                                   self.node1('Shape', [n])])
    acc = n
    for _ in range(abs(y) - 1):  # repeated products, as XLA expands small integer powers
      acc = self.node1('Mul', [acc, n])
    return self.node1('Reciprocal', [acc]) if y < 0 else acc

  def _identity(self, eqn, x, *_, **__):
    return self.node1('Identity', [self.name_of(x)])

  p_copy = p_copy_p = p_stop_gradient = p_optimization_barrier = _identity
  p_sharding_constraint = _identity

  def p_convert_element_type(self, eqn, x):
    import onnx  # pylint: disable=g-import-not-at-top
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params['new_dtype']))
    return self.node1('Cast', [self.name_of(x)], to=to)

  def p_select_n(self, eqn, pred, *cases):
    if len(cases) != 2:
      raise ConversionError(f'select_n with {len(cases)} cases')
    p = self.name_of(pred)
    if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
      p = self.node1('Cast', [p], to=self.onnx.TensorProto.BOOL)
    return self.node1('Where', [p, self.name_of(cases[1]), self.name_of(cases[0])])

  def p_dim_as_value(self, eqn):
    import onnx  # pylint: disable=g-import-not-at-top
    scalar = self.node1('Reshape', [self.dim(eqn.params['dim']), self.ints([])])
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.outvars[0].aval.dtype))
    return self.node1('Cast', [scalar], to=to)

  def p_reshape(self, eqn, x, *dyn):
    if dyn or eqn.params.get('dimensions') is not None:
      raise ConversionError('reshape with dynamic shape operands or dimensions')
    return self.node1('Reshape', [self.name_of(x), self.shape(eqn.params['new_sizes'])])

  def p_squeeze(self, eqn, x):
    return self.node1('Squeeze', [self.name_of(x), self.ints(eqn.params['dimensions'])])

  def p_transpose(self, eqn, x):
    return self.node1('Transpose', [self.name_of(x)],
                      perm=[int(p) for p in eqn.params['permutation']])

  def p_concatenate(self, eqn, *xs):
    return self.node1('Concat', [self.name_of(x) for x in xs],
                      axis=int(eqn.params['dimension']))

  def p_stack(self, eqn, *xs):  # jnp.stack (a primitive since jax 0.10): a new axis, then Concat
    axis = self.ints([int(eqn.params['axis'])])
    return self.node1('Concat', [self.node1('Unsqueeze', [self.name_of(x), axis]) for x in xs],
                      axis=int(eqn.params['axis']))

  def p_broadcast_in_dim(self, eqn, x, *dyn):
    if dyn:
      raise ConversionError('broadcast_in_dim with dynamic shape operands')
    shape = tuple(eqn.params['shape'])
    bdims = [int(d) for d in eqn.params['broadcast_dimensions']]
    if bdims != sorted(bdims):
      raise ConversionError(f'broadcast_in_dim with unsorted dimensions {bdims}')
    in_shape = tuple(eqn.invars[0].aval.shape)
    n = self.name_of(x)
    missing = [i for i in range(len(shape)) if i not in bdims]
    if missing:
      n = self.node1('Unsqueeze', [n, self.ints(missing)])
    full = [1] * len(shape)
    for src, dst in enumerate(bdims):
      full[dst] = in_shape[src]
    if tuple(full) == shape:
      return n if missing else self.node1('Identity', [n])
    # Expand broadcasts both ways: a target of 1 keeps the operand's (symbolic) size.
    target = [1 if (not _is_const_dim(t) and f is t) or (str(f) == str(t)) else t
              for f, t in zip(full, shape)]
    return self.node1('Expand', [n, self.shape(target, allow_infer=False)])

  def p_slice(self, eqn, x):
    shape = eqn.invars[0].aval.shape
    starts = [int(s) for s in eqn.params['start_indices']]
    # A symbolic limit that is the whole (symbolic) axis becomes "to the end".
    limits = [int(s) if _is_const_dim(s) else (np.iinfo(np.int64).max if str(s) == str(d) else s)
              for s, d in zip(eqn.params['limit_indices'], shape)]
    strides = eqn.params.get('strides') or [1] * len(starts)
    axes = list(range(len(starts)))
    return self.node1('Slice', [self.name_of(x), self.ints(starts),
                                self.shape(limits, allow_infer=False),
                                self.ints(axes), self.ints([int(s) for s in strides])])

  def p_split(self, eqn, x):
    sizes = [int(s) for s in eqn.params['sizes']]
    return self.node('Split', [self.name_of(x), self.ints(sizes)], len(sizes),
                     axis=int(eqn.params['axis']))

  def p_pad(self, eqn, x, value):
    cfg = [(int(lo), int(hi), int(it)) for lo, hi, it in eqn.params['padding_config']]
    if any(it for _, _, it in cfg) or any(lo < 0 or hi < 0 for lo, hi, _ in cfg):
      raise ConversionError(f'pad with interior or negative padding {cfg}')
    pads = [lo for lo, _, _ in cfg] + [hi for _, hi, _ in cfg]
    return self.node1('Pad', [self.name_of(x), self.ints(pads), self.name_of(value)],
                      mode='constant')

  def p_reduce_sum(self, eqn, x, **_):
    axes = [int(a) for a in eqn.params['axes']]
    shape = eqn.invars[0].aval.shape
    n = int(np.prod([shape[a] for a in axes if _is_const_dim(shape[a])]))
    xn = self.name_of(x)
    if np.dtype(eqn.invars[0].aval.dtype) == np.float32 and n > _F64_SUM_ABOVE:
      # onnxruntime sums float32 sequentially (error ~n * eps); XLA accumulates in vector lanes
      # and trees. The norms' E[x^2] - E[x]^2 amplifies that difference by mean^2 / var, so
      # long sums run in float64 and are rounded once.
      d = self.node1('Cast', [xn], to=self.onnx.TensorProto.DOUBLE)
      s = self.node1('ReduceSum', [d, self.ints(axes)], keepdims=0)
      return self.node1('Cast', [s], to=self.onnx.TensorProto.FLOAT)
    return self.node1('ReduceSum', [xn, self.ints(axes)], keepdims=0)

  def p_reduce_max(self, eqn, x, **_):
    return self.node1('ReduceMax', [self.name_of(x)],
                      axes=[int(a) for a in eqn.params['axes']], keepdims=0)

  def p_reduce_min(self, eqn, x, **_):
    return self.node1('ReduceMin', [self.name_of(x)],
                      axes=[int(a) for a in eqn.params['axes']], keepdims=0)

  def p_argmax(self, eqn, x):
    (axis,) = eqn.params['axes']
    out = self.node1('ArgMax', [self.name_of(x)], axis=int(axis), keepdims=0)
    to = self.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params['index_dtype']))
    return self.node1('Cast', [out], to=to)

  def p_dot_general(self, eqn, x, y):
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lc, rc, lb, rb = ([int(i) for i in t] for t in (lc, rc, lb, rb))
    xs, ys = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    xn, yn = self.name_of(x), self.name_of(y)
    if not lb and len(ys) == 2 and lc == [len(xs) - 1] and rc == [0]:
      out = self.node1('MatMul', [xn, yn])  # dense layer: [..., K] @ [K, N]
    else:
      letters = iter('abcdefghijklmnopqrstuvwxyz')
      xl = [next(letters) for _ in xs]
      yl = [None] * len(ys)
      for i, j in zip(lb, rb):
        yl[j] = xl[i]
      for i, j in zip(lc, rc):
        yl[j] = xl[i]
      yl = [l or next(letters) for l in yl]
      outl = ([xl[i] for i in lb] + [l for i, l in enumerate(xl) if i not in lb + lc]
              + [l for j, l in enumerate(yl) if j not in rb + rc])
      eq = f'{"".join(xl)},{"".join(yl)}->{"".join(outl)}'
      out = self.node1('Einsum', [xn, yn], equation=eq)
    want = np.dtype(eqn.outvars[0].aval.dtype)
    if want != np.dtype(eqn.invars[0].aval.dtype):
      out = self.node1('Cast', [out], to=self.helper.np_dtype_to_tensor_dtype(want))
    return out

  def p_conv_general_dilated(self, eqn, x, w):
    p = eqn.params
    if any(int(d) != 1 for d in p['lhs_dilation']) or int(p['batch_group_count']) != 1:
      raise ConversionError('transposed / batch-grouped convolution')
    dn = p['dimension_numbers']
    lhs, rhs, out = (list(map(int, s)) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    xn = self.node1('Transpose', [self.name_of(x)], perm=lhs)
    if isinstance(w, _Tensor):
      wn = self.node1('Transpose', [w.name], perm=rhs)
    else:
      wn = self.const(np.ascontiguousarray(np.transpose(w, rhs)))
    pads = [int(lo) for lo, _ in p['padding']] + [int(hi) for _, hi in p['padding']]
    if any(q < 0 for q in pads):
      raise ConversionError(f'convolution with negative padding {pads}')
    y = self.node1('Conv', [xn, wn], strides=[int(s) for s in p['window_strides']], pads=pads,
                   dilations=[int(d) for d in p['rhs_dilation']],
                   group=int(p['feature_group_count']))
    return self.node1('Transpose', [y], perm=[int(i) for i in np.argsort(out)])

  def p_reduce_window_max(self, eqn, x):
    p = eqn.params
    win, strides = list(p['window_dimensions']), list(p['window_strides'])
    pad = list(p['padding'])
    nd = len(win)
    if (nd != 4 or win[0] != 1 or win[3] != 1 or strides[0] != 1 or strides[3] != 1
        or any(int(d) != 1 for d in p['base_dilation']) or any(pad[0]) or any(pad[3])):
      raise ConversionError(f'reduce_window_max other than an NHWC spatial pool: {p}')
    dil = [int(d) for d in p['window_dilation'][1:3]]
    xn = self.node1('Transpose', [self.name_of(x)], perm=[0, 3, 1, 2])
    # MaxPool's padding never wins the max, like reduce_window's -inf init value.
    y = self.node1('MaxPool', [xn], kernel_shape=[int(w) for w in win[1:3]],
                   strides=[int(s) for s in strides[1:3]], dilations=dil,
                   pads=[int(pad[1][0]), int(pad[2][0]), int(pad[1][1]), int(pad[2][1])])
    return self.node1('Transpose', [y], perm=[0, 2, 3, 1])

  def p_gather(self, eqn, x, idx):
    """Slices: one start vector (no batch of indices), full size on the non-indexed axes."""
    dn, sizes = eqn.params['dimension_numbers'], list(eqn.params['slice_sizes'])
    shape = list(eqn.invars[0].aval.shape)
    smap = [int(d) for d in dn.start_index_map]
    ishape = tuple(eqn.invars[1].aval.shape)
    if self._is_row_gather(eqn, ishape):
      return self._row_gather(eqn, x, idx)
    if dn.operand_batching_dims or ishape != (len(smap),):
      raise ConversionError(f'gather with a batch of indices {ishape} / {dn} (only slices)')
    for d in range(len(shape)):
      if d not in smap and str(sizes[d]) != str(shape[d]):
        raise ConversionError(f'gather slicing non-indexed axis {d}: {sizes} of {shape}')
    static = all(_is_const_dim(sizes[d]) and _is_const_dim(shape[d]) for d in smap)
    if not isinstance(idx, _Tensor) and static:
      st = [min(max(int(idx[k]), 0), int(shape[d]) - int(sizes[d])) for k, d in enumerate(smap)]
      starts = self.ints(st)
      ends = self.ints([s + int(sizes[d]) for s, d in zip(st, smap)])
    else:
      # Clamped like XLA's gather so the slice stays in bounds (e.g. x[b:] of the stacked pair,
      # whose start and size are symbolic).
      starts = (self.node1('Cast', [idx.name], to=self.onnx.TensorProto.INT64)
                if isinstance(idx, _Tensor) else self.ints([int(i) for i in idx]))
      size_t = self.node1('Concat', [self.dim(sizes[d]) for d in smap], axis=0)
      hi = self.node1('Sub', [self.node1('Concat', [self.dim(shape[d]) for d in smap], axis=0),
                              size_t])
      starts = self.node1('Min', [self.node1('Max', [starts, self.ints([0] * len(smap))]), hi])
      ends = self.node1('Add', [starts, size_t])
    y = self.node1('Slice', [self.name_of(x), starts, ends, self.ints(smap)])
    collapsed = [int(d) for d in dn.collapsed_slice_dims]
    if list(dn.offset_dims) != list(range(len(shape) - len(collapsed))):
      raise ConversionError(f'gather with offset_dims {dn.offset_dims}')
    return self.node1('Squeeze', [y, self.ints(collapsed)]) if collapsed else y

  def _is_row_gather(self, eqn, ishape) -> bool:
    """`table[idx]` / `jnp.take(table, idx, axis=0)`: whole rows of axis 0 for indices
    [..., 1] (e.g. [n, 1], or [b, P, 1] for a [b, P] index array)."""
    dn, sizes = eqn.params['dimension_numbers'], list(eqn.params['slice_sizes'])
    shape = list(eqn.invars[0].aval.shape)
    lead = len(ishape) - 1  # the index array's own axes come first in the output
    return (len(ishape) >= 2 and str(ishape[-1]) == '1' and not dn.operand_batching_dims
            and list(dn.start_index_map) == [0] and list(dn.collapsed_slice_dims) == [0]
            and list(dn.offset_dims) == list(range(lead, lead + len(shape) - 1))
            and str(sizes[0]) == '1' and [str(s) for s in sizes[1:]] == [str(d) for d in shape[1:]])

  def _row_gather(self, eqn, x, idx):
    # Indices clamped into range, as XLA's gather (modes clip and promise_in_bounds) does.
    mode = str(eqn.params.get('mode', ''))
    if 'FILL' in mode.upper():
      raise ConversionError('gather in fill mode (use mode="clip" or clip the indices)')
    rows = eqn.invars[0].aval.shape[0]
    if not _is_const_dim(rows):
      raise ConversionError('gather of rows from a table with a symbolic number of rows')
    i = self.node1('Cast', [self.name_of(idx)], to=self.onnx.TensorProto.INT64)
    i = self.node1('Squeeze', [i, self.ints([len(eqn.invars[1].aval.shape) - 1])])
    i = self.node1('Min', [self.node1('Max', [i, self.ints([0])]), self.ints([int(rows) - 1])])
    return self.node1('Gather', [self.name_of(x), i], axis=0)

  def p_iota(self, eqn):
    raise ConversionError('iota with a symbolic shape')


def _subjaxpr(eqn):
  """(open jaxpr, consts) of a call-like equation to inline, else None."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  name = eqn.primitive.name
  if name not in ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
                  'custom_vjp_call_jaxpr', 'checkpoint', 'remat', 'custom_lin'):
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    j = eqn.params.get(key)
    if isinstance(j, core.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, core.Jaxpr):
      return j, []
  raise ConversionError(f'call primitive {name} without a jaxpr')


def to_onnx(fn: Callable[..., Any], inputs: Mapping[str, Any], consts: Sequence[Any] = (),
            output_names: Sequence[str] = ('output',), *, opset: int = OPSET,
            graph_name: str = 'jax', producer_name: str = 'jaxpr_onnx',
            linear_dim: Callable[[Any], tuple[str, int, int] | None] | None = None):
  """ONNX ModelProto of `fn(consts, *inputs)` (module docstring); returns (model, {op: count}).

  `inputs`: graph input name -> `jax.ShapeDtypeStruct` (symbolic dimensions from
  `jax.export.symbolic_shape` become named dynamic ones); `consts`: arrays handed to `fn` as its
  first argument (a list), stored as initializers; `output_names`: one per output of `fn`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  consts = list(consts)
  closed = jax.make_jaxpr(fn)(
      [jax.ShapeDtypeStruct(np.shape(c), np.asarray(c).dtype) for c in consts], *inputs.values())
  if len(closed.out_avals) != len(output_names):
    raise ConversionError(f'fn has {len(closed.out_avals)} outputs, output_names names '
                          f'{len(output_names)}')
  conv = Converter(linear_dim)
  avals = closed.in_avals[len(consts):]
  args = [_Tensor(n, a) for n, a in zip(inputs, avals)]
  for name, aval in zip(inputs, avals):  # each symbol from the first input that has it bare
    for axis, d in enumerate(aval.shape):
      sym = plain_symbol(d)
      if not _is_const_dim(d) and sym is not None and sym[0] not in conv.dims:
        conv.dims[sym[0]] = conv.node1('Slice', [conv.node1('Shape', [name]),
                                                 conv.ints([axis]), conv.ints([axis + 1])])
  with jax.default_device(jax.devices('cpu')[0]):
    outs = conv.run(closed.jaxpr, closed.consts, [np.asarray(c) for c in consts] + args)
  for out, name in zip(outs, output_names):
    conv.nodes.append(onnx.helper.make_node('Identity', [conv.name_of(out)], [name]))
  graph = onnx.helper.make_graph(
      conv.nodes, graph_name,
      [_value_info(n, a) for n, a in zip(inputs, avals)],
      [_value_info(n, a) for n, a in zip(output_names, closed.out_avals)],
      initializer=conv.initializers)
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', opset)],
                                 producer_name=producer_name)
  proto.ir_version = min(proto.ir_version, 9)  # onnxruntime >= 1.17 reads IR 9
  return proto, dict(sorted(conv.ops_used.items()))


def _value_info(name: str, aval):
  import onnx  # pylint: disable=g-import-not-at-top
  dims = [int(d) if _is_const_dim(d) else str(d) for d in aval.shape]
  return onnx.helper.make_tensor_value_info(
      name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)), dims)


def save(proto, path: str) -> int:
  """Writes the model (one file; weights external beside it when over protobuf's 2 GB)."""
  import onnx  # pylint: disable=g-import-not-at-top
  if proto.ByteSize() < (2 << 30) - (64 << 20):
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
  else:
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + '.data')
    onnx.checker.check_model(path)
  return os.path.getsize(path)
