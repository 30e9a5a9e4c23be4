"""Loss parity against torch versions of the same formulas (tests/torch_ref/losses.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import base
from segchange_jax.train import losses
from tests.torch_ref.losses import torch_binary
from tests.torch_ref.losses import torch_multiclass
from tests.torch_ref.losses import torch_total

LOSS_CFG = base.get_config().loss


def _total(parts):
  return torch_total(parts, LOSS_CFG)


def _assert_parts(ours, ref, tol=1e-5):
  for k in ('ce', 'dice', 'focal', 'bcl'):
    r = float(ref[k].detach())
    assert abs(float(ours[k]) - r) <= tol * max(1.0, abs(r)), (k, float(ours[k]), r)


@pytest.mark.parametrize('case', ['random', 'all_negative', 'all_positive'])
def test_binary_parity_values_and_grads(case):
  rng = np.random.default_rng(0)
  z = (3 * rng.normal(size=(3, 16, 16))).astype(np.float32)
  y = {'random': rng.integers(0, 2, (3, 16, 16)), 'all_negative': np.zeros((3, 16, 16)),
       'all_positive': np.ones((3, 16, 16))}[case].astype(np.int32)
  zt = torch.tensor(z, requires_grad=True)
  ref = torch_binary(zt, torch.tensor(y))
  _total(ref).backward()
  total, parts = losses.total_loss(jnp.asarray(z)[..., None], jnp.asarray(y), None, LOSS_CFG)
  _assert_parts(parts, ref)
  want = float(_total(ref).detach())
  assert abs(float(total) - want) < 1e-5 * max(1, abs(want))
  grad = jax.grad(lambda v: losses.total_loss(v[..., None], jnp.asarray(y), None, LOSS_CFG)[0])(
      jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(grad), zt.grad.numpy(), atol=1e-7, rtol=1e-4)
  if case == 'all_negative':
    # n_pos = 0: the positive BCL term is 0, not NaN.
    assert np.isfinite(float(parts['bcl']))


def test_multiclass_parity_values_and_grads():
  rng = np.random.default_rng(1)
  k = 4
  z = (2 * rng.normal(size=(2, k, 12, 12))).astype(np.float32)
  y = rng.integers(0, k - 1, (2, 12, 12)).astype(np.int64)  # class 3 absent: BCL skips it
  zt = torch.tensor(z, requires_grad=True)
  ref = torch_multiclass(zt, torch.tensor(y))
  _total(ref).backward()
  z_nhwc = jnp.asarray(z.transpose(0, 2, 3, 1))
  total, parts = losses.total_loss(z_nhwc, jnp.asarray(y, jnp.int32), None, LOSS_CFG)
  _assert_parts(parts, ref)
  grad = jax.grad(lambda v: losses.total_loss(v, jnp.asarray(y, jnp.int32), None, LOSS_CFG)[0])(
      z_nhwc)
  np.testing.assert_allclose(np.asarray(grad), zt.grad.numpy().transpose(0, 2, 3, 1),
                             atol=1e-7, rtol=1e-4)


def test_multiclass_bcl_reduces_to_binary_for_one_channel():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(2, 8, 8)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 2, (2, 8, 8)).astype(np.int32))
  b = losses.binary_losses(z, y)['bcl']
  # Same formula on the one channel, class "1" = change: one-vs-rest over a single channel.
  d = jnp.abs(z - y)
  ref = jnp.sum(d * y) / jnp.sum(y) + jnp.sum(jnp.maximum(2 - d, 0) * (1 - y)) / jnp.sum(1 - y)
  assert abs(float(b) - float(ref)) < 1e-6


@pytest.mark.parametrize('num_classes', [1, 3])
def test_mask_excludes_padded_examples(num_classes):
  rng = np.random.default_rng(3)
  z = rng.normal(size=(4, 8, 8, num_classes)).astype(np.float32)
  y = rng.integers(0, max(2, num_classes), (4, 8, 8)).astype(np.int32)
  mask = np.array([1, 0, 1, 0], np.float32)
  z_pad = z.copy()
  z_pad[mask == 0] = 1e3 * rng.normal(size=z[mask == 0].shape)  # garbage in padded rows
  t_pad, p_pad = losses.total_loss(jnp.asarray(z_pad), jnp.asarray(y), jnp.asarray(mask), LOSS_CFG)
  keep = mask == 1
  t_sub, p_sub = losses.total_loss(jnp.asarray(z[keep]), jnp.asarray(y[keep]), None, LOSS_CFG)
  assert abs(float(t_pad) - float(t_sub)) < 1e-5
  for k in p_sub:
    assert abs(float(p_pad[k]) - float(p_sub[k])) < 1e-5, k


def test_all_padded_batch_is_finite_and_zero_grad():
  z = jnp.ones((2, 4, 4, 1))
  y = jnp.zeros((2, 4, 4), jnp.int32)
  mask = jnp.zeros((2,))
  g = jax.grad(lambda v: losses.total_loss(v, y, mask, LOSS_CFG)[0])(z)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) == 0.0
