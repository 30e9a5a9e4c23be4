"""inference/jaxpr_onnx.py on its own: a plain jnp function with a symbolic batch converts and
runs in onnxruntime like in JAX, and the module imports nothing of segchange_jax."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip('onnx', reason='pip install .[onnx]')
ort = pytest.importorskip('onnxruntime', reason='pip install .[onnx]')

from segchange_jax.inference import jaxpr_onnx  # pylint: disable=g-import-not-at-top

MODULE = pathlib.Path(jaxpr_onnx.__file__)


def small_fn(consts, x, y):
  """A few primitives: dot_general (dense), add, tanh, reduce_max, broadcast, mul, concatenate,
  a symbolic-batch reshape and a slice."""
  (w, bias) = consts
  h = jnp.tanh(x @ w + bias)                                # [b, 4]
  m = jnp.max(x, axis=-1, keepdims=True)                    # [b, 1]
  z = jnp.concatenate([h * y, m], axis=-1)                  # [b, 5]
  return z.reshape(-1, 5, 1)[:, 1:, 0], jnp.sum(z * z, -1)  # [b, 4], [b]


def test_plain_jnp_function_onnxruntime_equals_jax(tmp_path):
  rs = np.random.RandomState(0)
  w, bias = rs.randn(8, 4).astype(np.float32), rs.randn(4).astype(np.float32)
  (b,) = jax.export.symbolic_shape('b')
  inputs = {'x': jax.ShapeDtypeStruct((b, 8), jnp.float32),
            'y': jax.ShapeDtypeStruct((b, 4), jnp.float32)}
  proto, ops = jaxpr_onnx.to_onnx(small_fn, inputs, [w, bias], ['z', 'sq'])
  assert {'MatMul', 'Tanh', 'ReduceMax', 'Concat', 'Slice'} <= set(ops), ops
  dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ['b', 8]
  path = str(tmp_path / 'small.onnx')
  assert jaxpr_onnx.save(proto, path) > 0
  sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  for n in (1, 5):
    x, y = rs.randn(n, 8).astype(np.float32), rs.randn(n, 4).astype(np.float32)
    got = sess.run(None, {'x': x, 'y': y})
    want = [np.asarray(v) for v in small_fn((w, bias), x, y)]
    for g, v in zip(got, want):
      assert g.shape == v.shape
      err = float(np.abs(g - v).max())
      assert err <= 1e-5 * max(1.0, float(np.abs(v).max())), err
    print(f'plain jnp function, batch {n}: onnxruntime vs jax {err:.2e}')


def test_unknown_primitive_names_it():
  inputs = {'x': jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(jaxpr_onnx.ConversionError, match="'cumsum'"):
    jaxpr_onnx.to_onnx(lambda c, x: jnp.cumsum(x), inputs)


def test_converter_imports_nothing_of_segchange_jax():
  tree = ast.parse(MODULE.read_text())
  names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  names += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert names and not [m for m in names if m.split('.')[0] == 'segchange_jax'], names
  assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], (
      'relative imports')
  roots = {m.split('.')[0] for m in names}
  assert roots <= {'__future__', 'os', 'typing', 'numpy', 'jax', 'onnx'}, roots


def test_row_gather_with_a_batch_of_indices_and_a_scalar_broadcast(tmp_path):
  """`jnp.take(table, idx, axis=0, mode='clip')` (a bundle's prompt table) becomes Gather with
  indices clamped like XLA's, and a scalar constant broadcast to a symbolic shape stays a scalar
  (np.ascontiguousarray would make it [1], which Unsqueeze misreads)."""
  table = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)

  def fn(consts, p):
    del consts
    valid = (p >= 0) & (p < 3)
    rows = jnp.take(table, jnp.clip(p, 0, 2), axis=0, mode='clip')
    return jnp.where(valid[:, None, None], rows, jnp.nan)

  (b,) = jax.export.symbolic_shape('b')
  proto, ops = jaxpr_onnx.to_onnx(fn, {'p': jax.ShapeDtypeStruct((b,), jnp.int32)}, [], ['y'])
  assert 'Gather' in ops, ops
  path = str(tmp_path / 'rows.onnx')
  jaxpr_onnx.save(proto, path)
  sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  for p in ([0], [2, 1, 0, 1], [5, -1, 1]):
    p = np.asarray(p, np.int32)
    got = sess.run(None, {'p': p})[0]
    np.testing.assert_array_equal(got, np.asarray(fn([], p)))
