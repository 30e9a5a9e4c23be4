"""BatchNorm against torch.nn.BatchNorm2d in training: outputs, gradients, running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch

from segchange_jax.models import layers
from segchange_jax.models import norms

C = 6


class _TwoCalls(nn.Module):
  """One BatchNorm applied to two batches in one step (like the siamese backbone)."""

  @nn.compact
  def __call__(self, a, b, train: bool = False):
    bn = norms.BatchNorm(name='bn')
    return bn(a, train), bn(b, train)


def _inputs(n=2, hw=5, seed=0):
  rs = np.random.RandomState(seed)
  # Channel means far from 0 (up to 30x the std): the variance must not lose them.
  shift = rs.uniform(-30, 30, C).astype(np.float32)
  return [(rs.randn(n, hw, hw, C) * rs.uniform(0.5, 2, C) + shift).astype(np.float32)
          for _ in range(2)]


def _torch_bn(seed=0):
  rs = np.random.RandomState(seed + 1)
  bn = torch.nn.BatchNorm2d(C).train()
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(rs.randn(C).astype(np.float32)))
    bn.bias.copy_(torch.from_numpy(rs.randn(C).astype(np.float32)))
    bn.running_mean.copy_(torch.from_numpy(rs.randn(C).astype(np.float32)))
    bn.running_var.copy_(torch.from_numpy(rs.uniform(0.5, 2, C).astype(np.float32)))
  return bn


def _variables(bn: torch.nn.BatchNorm2d) -> dict:
  t = lambda x: jnp.asarray(x.detach().numpy())
  return {'params': {'bn': {'scale': t(bn.weight), 'bias': t(bn.bias)}},
          'batch_stats': {'bn': {'mean': t(bn.running_mean), 'var': t(bn.running_var)}}}


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_two_calls_match_torch_batchnorm2d_in_training():
  a, b = _inputs()
  tbn = _torch_bn()
  variables = _variables(tbn)
  ta, tb = (torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_() for x in (a, b))
  # A random linear read-out (sum(y^2) would have a near-zero input gradient through BN).
  wa, wb = (np.random.RandomState(s).randn(*a.shape).astype(np.float32) for s in (10, 11))
  nchw = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2))
  oa, ob = tbn(ta), tbn(tb)
  ((oa * oa * nchw(wa)).sum() + (ob * nchw(wb)).sum()).backward()

  def loss(params, a, b):
    (ya, yb), upd = _TwoCalls().apply({'params': params, 'batch_stats': variables['batch_stats']},
                                      a, b, train=True, mutable=['batch_stats'])
    return (ya * ya * wa).sum() + (yb * wb).sum(), (ya, yb, upd['batch_stats'])

  (_, (ya, yb, stats)), (g_params, ga, gb) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(variables['params'], a, b)
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  assert _rel(ya, nhwc(oa)) < 1e-5 and _rel(yb, nhwc(ob)) < 1e-5
  # Running statistics: updated once per call, unbiased variance, momentum 0.1.
  assert _rel(stats['bn']['mean'], tbn.running_mean.numpy()) < 1e-6
  # (A biased-variance update, as flax.linen.BatchNorm's, is off by n/(n-1) = 50/49 here.)
  assert _rel(stats['bn']['var'], tbn.running_var.numpy()) < 1e-6
  assert _rel(g_params['bn']['scale'], tbn.weight.grad.numpy()) < 1e-5
  assert _rel(g_params['bn']['bias'], tbn.bias.grad.numpy()) < 1e-5
  assert _rel(ga, nhwc(ta.grad)) < 1e-4 and _rel(gb, nhwc(tb.grad)) < 1e-4
  # Eval: running statistics, nothing updated.
  tbn.eval()
  with torch.no_grad():
    want = nhwc(tbn(torch.from_numpy(a.transpose(0, 3, 1, 2))))
  got = _TwoCalls().apply({'params': variables['params'], 'batch_stats': stats}, a, b)[0]
  assert _rel(got, want) < 1e-5


def test_layers_batch_norm_is_the_torch_batchnorm():
  """`layers.batch_norm` (diff, CBAM, EGA) is the same module: same variables, same update."""
  a, _ = _inputs(seed=3)

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return layers.batch_norm(train, jnp.float32, 'bn')(x)

  tbn = _torch_bn(3)
  variables = _variables(tbn)
  y, upd = Wrap().apply(variables, a, train=True, mutable=['batch_stats'])
  want = tbn(torch.from_numpy(a.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  assert jax.tree.structure(upd) == jax.tree.structure({'batch_stats': variables['batch_stats']})
  assert _rel(y, want) < 1e-5  # x ~ 30 std: float32 rounding of x - mean
  assert _rel(upd['batch_stats']['bn']['var'], tbn.running_var.numpy()) < 1e-6
  assert _rel(upd['batch_stats']['bn']['mean'], tbn.running_mean.numpy()) < 1e-6


@pytest.mark.parametrize('axes', [('data',), ('data', 'fsdp')])
def test_sharded_statistics_equal_single_device(axes):
  """Batch split over 8 devices: global mean/var and the GLOBAL count n in n/(n-1)."""
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, 'tests/conftest.py sets up 8 simulated CPU devices'
  mesh = jax.sharding.Mesh(devices.reshape((8,) if len(axes) == 1 else (2, 4)), axes)
  a, b = _inputs(n=8, hw=3, seed=7)  # n = 72 globally, 9 per device
  variables = _variables(_torch_bn(7))

  def step(a, b):
    out, upd = _TwoCalls().apply(variables, a, b, train=True, mutable=['batch_stats'])
    return out, upd['batch_stats']

  (ya1, yb1), stats1 = jax.jit(step)(a, b)
  spec = NamedSharding(mesh, P(axes))
  (ya8, yb8), stats8 = jax.jit(step, in_shardings=(spec, spec))(
      jax.device_put(a, spec), jax.device_put(b, spec))
  assert ya8.sharding.spec == P(axes)  # the computation really was split
  for k in ('mean', 'var'):
    np.testing.assert_allclose(np.asarray(stats8['bn'][k]), np.asarray(stats1['bn'][k]),
                               rtol=1e-6, atol=0, err_msg=k)
  # Outputs: cross-device sums round differently (x ~ 30 std), within float32 noise.
  assert _rel(ya8, ya1) < 2e-5 and _rel(yb8, yb1) < 2e-5
  tbn = _torch_bn(7)
  for x in (a, b):
    tbn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  assert _rel(stats8['bn']['var'], tbn.running_var.numpy()) < 1e-6
