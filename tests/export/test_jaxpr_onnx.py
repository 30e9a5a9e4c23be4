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
