"""The train step on the real (demo-sized) SegChange model: 1 vs 8 devices, float32 vs bfloat16.

tests/train/test_train_step.py checks the step mechanics on a toy model; this runs the same
step through the actual Swin / BEV / diff / L-FPN + EGA / mask-head stack, whose BatchNorm,
GroupNorm, dropout and attention layers are what a sharding mistake would break.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models import segchange
from segchange_jax.train import param_groups
from segchange_jax.train import sharding
from segchange_jax.train import train_step

B, S, STEPS, TEXT_DIM = 8, 64, 3, 16


def _config(repo_root, data=-1, fsdp=1, dtype='float32'):
  return config_lib.load_config(str(repo_root / 'configs/demo.py'), [
      f'data.image_size={S}', f'model.img_size={S}', f'text.dim={TEXT_DIM}',
      f'train.batch_size={B}', 'train.scheduler=step', 'train.lr=1e-3',
      'train.lr_backbone=1e-4', f'mesh.data={data}', f'mesh.fsdp={fsdp}',
      'mesh.fsdp_min_size=4096', f'model.dtype={dtype}'])


def _batches(n=STEPS, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a = rng.normal(size=(B, S, S, 3)).astype(np.float32)
    b = a.copy()
    label = np.zeros((B, S, S), np.int32)
    label[:, 16:40, 20:44] = 1  # a square that changes in B: a learnable signal
    b[label.astype(bool)] += 1.5
    out.append({'image_a': a, 'image_b': b, 'label': label,
                'prompt_index': np.zeros(B, np.int32), 'mask': np.ones(B, np.float32)})
  return out


def _train(config, devices=None):
  mesh = sharding.create_mesh(config, devices=devices)
  model = segchange.build_model(config)
  shapes = {k: jax.ShapeDtypeStruct((B, S, S, 3), jnp.float32) for k in ('image_a', 'image_b')}
  state, shardings = train_step.create_train_state(
      model, config, jax.random.PRNGKey(0), shapes, mesh, steps_per_epoch=10,
      label_fn=param_groups.lr_label_fn(config), frozen_mask_fn=param_groups.frozen_mask_fn(config))
  step = train_step.make_train_step(model, config, mesh, shardings)
  table = jax.device_put(
      jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, TEXT_DIM)), jnp.float32),
      sharding.replicated(mesh))
  losses, first_stats = [], None
  for b in _batches():
    state, out = step(state, train_step.shard_batch(b, mesh), table)
    losses.append(float(out['loss']))
    if first_stats is None:  # BatchNorm running stats after one step from identical params
      first_stats = jax.tree.map(np.asarray, state.model_state)
  return state, np.array(losses), first_stats


@pytest.fixture(scope='module')
def one_device(repo_root):
  return _train(_config(repo_root), devices=jax.devices()[:1])


@pytest.mark.parametrize('data,fsdp', [(2, 4), pytest.param(8, 1, marks=pytest.mark.slow)])
def test_real_model_same_losses_on_1_and_8_devices(repo_root, one_device, data, fsdp):
  s1, l1, stats1 = one_device
  s8, l8, stats8 = _train(_config(repo_root, data, fsdp))
  assert l1[-1] < l1[0], l1  # it learns the square
  np.testing.assert_allclose(l8, l1, rtol=1e-4)
  if fsdp > 1:
    specs = {x.sharding.spec for x in jax.tree.leaves(s8.params)}
    assert any('fsdp' in spec for spec in specs), specs  # large kernels really are sharded
  # Sync BN: the step-1 statistics are over the global batch on every mesh. (Later ones follow
  # Adam's amplification of float noise in near-zero gradients, so they are not compared.)
  assert jax.tree.leaves(stats1)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # 2.5 min on 2 cores; bench/bf16_curve.py reports the same comparison
def test_bfloat16_compute_trains_like_float32(repo_root, one_device):
  _, l32, _ = one_device
  s16, l16, _ = _train(_config(repo_root, dtype='bfloat16'), devices=jax.devices()[:1])
  assert np.all(np.isfinite(l16))
  assert l16[-1] < l16[0], l16
  # bf16 activations (8 mantissa bits) move the loss by well under 5 %.
  np.testing.assert_allclose(l16, l32, rtol=5e-2)
  # Parameters and optimizer state stay float32 (mixed precision, not bf16 training).
  assert {x.dtype for x in jax.tree.leaves(s16.params)} == {jnp.dtype('float32')}


@pytest.mark.slow  # two real-model trainings, ~2 min on 2 cores
def test_flat_grad_reduction_trains_the_real_model_like_one_device(repo_root):
  # config.train.grad_reduction='flat' runs Swin / BEV / diff / neck / head per device under
  # shard_map (the written-out kernel VJPs, BatchNorm averaged over devices) and sums the raveled
  # gradients once. Without dropout (its per-device draws differ) it follows one device.
  def config(data, reduction):
    c = _config(repo_root, data=data)
    with c.unlocked():
      c.model.dropout = c.model.swin.drop_path_rate = 0.0
      c.train.grad_reduction = reduction
    return c
  _, l1, stats1 = _train(config(-1, 'per_param'), devices=jax.devices()[:1])
  _, l8, stats8 = _train(config(8, 'flat'))
  assert l1[-1] < l1[0], l1
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
