"""segchange_jax/models/kernels.py: each kernel equals its plain form, in value and gradient.

The test each kernel's docstring names lives here (the last test checks that those names exist).
"""

import ast
import itertools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segchange_jax.models import kernels
from tests.torch_ref import util

TOL = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST


def _check(name, ours, theirs):
  err = util.rel_err(ours, theirs)
  print(f'{name}: max abs err / max |ref| = {err:.2e}')
  assert err <= TOL, f'{name}: relative error {err:.2e} > {TOL}'


def _lax_conv(x, kernel_hwio, groups):
  """XLA's 'same' convolution, stride 1: the plain form of the convolution kernels."""
  p = kernel_hwio.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel_hwio, (1, 1), [(p, p), (p, p)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups, precision=HIGHEST)


def _assert_equal_value_and_vjp(fn, plain, x, kernel, tol=1e-5):
  """fn(x, kernel) == plain(x, kernel): the undifferentiated value, the value under `jax.vjp`
  (the kernels' forward rule) and both input and kernel gradients for a random cotangent."""
  want, plain_vjp = jax.vjp(plain, x, kernel)
  got_value = fn(x, kernel)
  got, fn_vjp = jax.vjp(fn, x, kernel)
  ct = jnp.asarray(np.random.default_rng(7).normal(size=want.shape), jnp.float32)
  pairs = [('value', got_value, want), ('value under vjp', got, want)]
  pairs += list(zip(('input gradient', 'kernel gradient'), fn_vjp(ct), plain_vjp(ct)))
  for what, a, b in pairs:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    err = util.rel_err(a, b)
    assert err <= tol, f'{fn.__name__} {what}: relative error {err:.2e} > {tol}'


@pytest.mark.parametrize('k,height', [(3, 7), (3, 8), (5, 8)])
def test_depthwise_conv_equals_lax_convolution(k, height):
  """Value and gradients of depthwise_conv equal XLA's depthwise convolution
  (feature_group_count = C), at an odd and an even height (the kernel gradient sums blocks of
  two rows where the height allows)."""
  rng = np.random.default_rng(10 * k + height)
  x = jnp.asarray(rng.normal(size=(2, height, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4)), jnp.float32)
  plain = lambda x, w: _lax_conv(x, w[:, :, None, :], groups=x.shape[-1])
  _assert_equal_value_and_vjp(kernels.depthwise_conv, plain, x, kernel)


@pytest.mark.parametrize('k,height', [(3, 7), (3, 8), (5, 8)])
def test_shifted_conv_equals_lax_convolution(k, height):
  """Value (unrolled taps undifferentiated, the loop under vjp) and gradients of shifted_conv
  equal XLA's dense convolution (HWIO kernel)."""
  rng = np.random.default_rng(20 * k + height)
  x = jnp.asarray(rng.normal(size=(2, height, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4, 6)), jnp.float32)
  plain = lambda x, w: _lax_conv(x, w, groups=1)
  _assert_equal_value_and_vjp(kernels.shifted_conv, plain, x, kernel)


def test_written_out_vjp_equals_autodiff_in_bfloat16_too():
  """depthwise_conv's and shifted_conv's hand-written VJPs against autodiff of the same shifted
  form (float32 and bfloat16), at an odd and an even height (the depthwise kernel gradient
  sums blocks of two rows where the height allows)."""
  rng = np.random.default_rng(3)
  cases = [(kernels.depthwise_conv, rng.normal(size=(5, 5, 4)), lambda s, w: s * w),
           (kernels.shifted_conv, rng.normal(size=(3, 3, 4, 6)), lambda s, w: s @ w)]
  for (fn, kernel, tap), height in itertools.product(cases, (7, 8)):
    x = jnp.asarray(rng.normal(size=(2, height, 6, 4)), jnp.float32)
    kernel = jnp.asarray(kernel, jnp.float32)
    plain = lambda x, k: kernels._shift_sum(x, k, tap)  # pylint: disable=protected-access
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
      xs, ks = x.astype(dtype), kernel.astype(dtype)
      loss = lambda f: lambda x, k: jnp.sum(jnp.cos(f(x, k).astype(jnp.float32)))
      got = jax.grad(loss(fn), argnums=(0, 1))(xs, ks)
      want = jax.grad(loss(plain), argnums=(0, 1))(xs, ks)
      for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= tol * scale


def test_upsample_bilinear_sum_matches_torch_interpolate():
  """Non-square maps, batch 2: each map's own H and W matrices, one stacked W product."""
  rs = np.random.RandomState(3)
  maps = [rs.randn(2, 48 // f, 80 // f, 5).astype(np.float32) for f in (4, 8, 16)]
  want = sum(util.nhwc(torch.nn.functional.interpolate(
      util.nchw(m), scale_factor=f, mode='bilinear', align_corners=True))
      for m, f in zip(maps, (4, 8, 16)))
  _check('upsample_bilinear_sum', kernels.upsample_bilinear_sum(maps, (4, 8, 16)), want)
  _check('upsample_bilinear_sum, one map', kernels.upsample_bilinear_sum([maps[1]], [8]),
         util.nhwc(torch.nn.functional.interpolate(util.nchw(maps[1]), scale_factor=8,
                                                   mode='bilinear', align_corners=True)))
  with pytest.raises(ValueError, match='does not land on the'):
    kernels.upsample_bilinear_sum(maps, (4, 8, 8))


def test_upsample_bilinear_sum_equals_torch_and_the_dense_product():
  """128 x 192 output: 2 and 3 row blocks of 64, windows that overlap. Value against torch;
  value and input gradients against the dense separable product (the blocks only drop zeros)."""
  rs = np.random.RandomState(5)
  factors = (4, 8, 16, 32)
  maps = [rs.randn(2, 128 // f, 192 // f, 3).astype(np.float32) for f in factors]
  want = sum(util.nhwc(torch.nn.functional.interpolate(
      util.nchw(m), scale_factor=f, mode='bilinear', align_corners=True))
      for m, f in zip(maps, factors))
  _check('upsample_bilinear_sum, banded', kernels.upsample_bilinear_sum(maps, factors), want)
  windows, mw = kernels._banded_matrices(tuple(m.shape[2] for m in maps), 192)
  assert mw.shape[:2] == (3, 64) and mw.shape[2] < sum(m.shape[2] for m in maps)

  def dense(ms):
    return sum(jnp.einsum('oh,pw,bhwc->bopc', kernels._align_corners_matrix(m.shape[1], 128),
                          kernels._align_corners_matrix(m.shape[2], 192), m, precision=HIGHEST)
               for m in ms)
  cotangent = jnp.asarray(rs.randn(2, 128, 192, 3), jnp.float32)
  banded = lambda ms: kernels.upsample_bilinear_sum(ms, factors)
  grads = [jax.grad(lambda ms, f=f: jnp.vdot(f(ms), cotangent))([jnp.asarray(m) for m in maps])
           for f in (banded, dense)]
  for ours, theirs in zip(*grads):
    _check('upsample_bilinear_sum, banded, input gradient', ours, theirs)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_add_broadcast_gradient_is_the_leading_sum(dtype):
  """Value and VJP of kernels.add_broadcast equal autodiff of x + b (bias over 2 leading axes)."""
  rs = np.random.RandomState(4)
  x = jnp.asarray(rs.randn(2, 5, 3, 7, 7), dtype)
  b = jnp.asarray(rs.randn(3, 7, 7), jnp.float32)
  ct = jnp.asarray(rs.randn(2, 5, 3, 7, 7), jnp.float32)
  out, vjp = jax.vjp(kernels.add_broadcast, x, b)
  want, want_vjp = jax.vjp(lambda x, b: x + b, x, b)
  np.testing.assert_array_equal(out, want)
  (dx, db), (want_dx, want_db) = vjp(ct), want_vjp(ct)
  assert dx.dtype == x.dtype and db.dtype == b.dtype
  np.testing.assert_array_equal(dx, want_dx)
  np.testing.assert_allclose(db, want_db, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='trailing shape'):
    kernels.add_broadcast(x, b[:2])


def _collectives_in_loops(hlo: str) -> list[str]:
  """Collective instructions of optimized HLO text that sit in a while loop's body (or in a
  computation that body calls): each runs once per iteration."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      name = line.split('(', 1)[0].split()[-1].lstrip('%')
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  todo = re.findall(r'body=%?([\w.\-]+)', hlo)
  seen, found = set(), []
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in comps:
      continue
    seen.add(comp)
    for line in comps[comp]:
      if re.search(r'\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)'
                   r'(-start)?\(', line):
        found.append(line.strip()[:120])
      todo += re.findall(r'(?:calls|to_apply|body)=%?([\w.\-]+)', line)
  return found


@pytest.mark.parametrize('fn,groups', [(kernels.depthwise_conv, 'depthwise'),
                                       (kernels.shifted_conv, 'dense')])
def test_kernel_gradients_all_reduce_once_over_a_sharded_batch(fn, groups):
  """With the batch split over 8 devices, the written-out kernel gradients sum over the batch
  after their loops: no collective runs inside a loop (one per iteration made the 2-process
  demo step ~15x slower: bench/README.md, "Multi-host on CPU"), and the gradients equal the
  single-device ones."""
  devices = jax.devices()
  assert len(devices) == 8, 'tests/conftest.py sets 8 host devices'
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  rng = np.random.default_rng(3)
  c = 4
  x = jnp.asarray(rng.normal(size=(8, 16, 16, c)), jnp.float32)
  shape = (3, 3, c) if groups == 'depthwise' else (3, 3, c, 6)
  kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(8, 16, 16, shape[-1])), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) * ct), argnums=(0, 1)))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  xs, ks = jax.device_put(x, batch), jax.device_put(kernel, whole)
  hlo = grad.lower(xs, ks).compile().as_text()
  assert re.search(r'\sall-reduce(-start)?\(', hlo), 'the kernel gradient must sum over devices'
  assert _collectives_in_loops(hlo) == []
  for got, want in zip(grad(xs, ks), grad(x, kernel)):
    assert util.rel_err(got, want) <= 1e-6


def test_every_kernel_names_an_existing_test_of_this_file():
  """Each public function of kernels.py names, in its docstring, the test here that proves it
  equal to its plain form."""
  here = pathlib.Path(__file__)
  tests = {n.name for n in ast.parse(here.read_text()).body if isinstance(n, ast.FunctionDef)}
  public = [n for n in ast.parse(pathlib.Path(kernels.__file__).read_text()).body
            if isinstance(n, ast.FunctionDef) and not n.name.startswith('_')]
  assert {'upsample_bilinear_sum', 'add_broadcast', 'depthwise_conv', 'shifted_conv'} <= {
      n.name for n in public}
  for node in public:
    named = re.findall(r'tests/models/test_kernels\.py::(\w+)', ast.get_docstring(node) or '')
    assert len(named) == 1, f'kernels.{node.name} names {named}, not one test of {here.name}'
    assert named[0] in tests, f'kernels.{node.name} names {named[0]}, which is not in {here.name}'
