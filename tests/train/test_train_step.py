"""Train/eval steps on the toy model: 1 device vs 8-device meshes, grad accumulation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.train import metrics
from segchange_jax.train import sharding
from segchange_jax.train import train_step
from tests.train.traincore_toy import ToyModel
from tests.train.traincore_toy import toy_config

B, S, P_TEXT = 8, 16, 3


def make_batches(n, batch=B, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    out.append({'image_a': rng.normal(size=(batch, S, S, 3)).astype(np.float32),
                'image_b': rng.normal(size=(batch, S, S, 3)).astype(np.float32),
                'label': rng.integers(0, 2, (batch, S, S)).astype(np.int32),
                'prompt_index': rng.integers(0, P_TEXT, batch).astype(np.int32),
                'mask': np.ones(batch, np.float32)})
  return out


def text_table(seed=1):
  return np.random.default_rng(seed).normal(size=(P_TEXT, 8, 16)).astype(np.float32)


def setup(config, model, devices=None, seed=0):
  mesh = sharding.create_mesh(config, devices=devices)
  shapes = {k: jax.ShapeDtypeStruct((B, S, S, 3), jnp.float32) for k in ('image_a', 'image_b')}
  state, shardings = train_step.create_train_state(model, config, jax.random.PRNGKey(seed), shapes,
                                                  mesh, steps_per_epoch=4)
  step = train_step.make_train_step(model, config, mesh, shardings)
  return mesh, state, shardings, step


def run(config, model, batches, devices=None):
  mesh, state, _, step = setup(config, model, devices)
  table = jax.device_put(text_table(), sharding.replicated(mesh))
  losses = []
  for b in batches:
    state, out = step(state, train_step.shard_batch(b, mesh), table)
    losses.append(float(out['loss']))
  return state, np.array(losses)


def _mesh_cfg(data, fsdp, **train):
  c = toy_config(lr=1e-2, lr_backbone=1e-3, batch_size=B, **train)
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp = data, fsdp
  return c


@pytest.fixture(scope='module')
def one_device_run():
  model = ToyModel(use_bn=True, dropout=0.1)
  return run(_mesh_cfg(-1, 1), model, make_batches(4), devices=jax.devices()[:1])


@pytest.mark.parametrize('data,fsdp', [(2, 4), pytest.param(8, 1, marks=pytest.mark.slow)])
def test_same_loss_curve_on_1_device_and_8_device_meshes(one_device_run, data, fsdp):
  s1, l1 = one_device_run
  s8, l8 = run(_mesh_cfg(data, fsdp), ToyModel(use_bn=True, dropout=0.1), make_batches(4))
  assert l1[-1] < l1[0]  # it trains
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  if fsdp > 1:  # fsdp actually shards the big kernels
    assert s8.params['fuse']['kernel'].sharding.spec == jax.sharding.PartitionSpec(
        None, None, 'fsdp', None)
  # BatchNorm running stats are global-batch stats on every mesh (sync BN under jit).
  flat1 = dict(jax.tree_util.tree_leaves_with_path((s1.params, s1.model_state)))
  flat8 = dict(jax.tree_util.tree_leaves_with_path((s8.params, s8.model_state)))
  for path, a in flat1.items():
    np.testing.assert_allclose(np.asarray(flat8[path]), np.asarray(a), atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  assert int(s8.step) == 4


def test_grad_accumulation_matches_full_batch_for_pixel_mean_losses():
  # Without BatchNorm/dropout and with only per-pixel-mean terms (BCE + focal), 2 microbatches of
  # 4 give the gradient of the batch of 8. Dice and BCL normalise over the microbatch instead.
  model = ToyModel(use_bn=False)
  batches = make_batches(2)
  cfgs = [_mesh_cfg(-1, 1, grad_accum_steps=1), _mesh_cfg(2, 4, grad_accum_steps=2)]
  for c in cfgs:
    with c.unlocked():
      c.loss.weight_dice = c.loss.weight_bcl = 0.0
  s_full, l_full = run(cfgs[0], model, batches, devices=jax.devices()[:1])
  s_acc, l_acc = run(cfgs[1], model, batches)  # microbatches of a batch split over 8 devices
  np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_acc.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_eval_step_sums_and_padding():
  config = _mesh_cfg(-1, 1)
  model = ToyModel(use_bn=True)
  mesh, state, shardings, _ = setup(config, model)
  eval_step = train_step.make_eval_step(model, config, mesh, shardings)
  table = jax.device_put(text_table(), sharding.replicated(mesh))
  (b,) = make_batches(1, seed=5)
  full = jax.device_get(eval_step(state, train_step.shard_batch(b, mesh), table))
  padded = dict(b, mask=np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32))
  part = jax.device_get(eval_step(state, train_step.shard_batch(padded, mesh), table))
  assert full['cm'].sum() == B * S * S and part['cm'].sum() == 6 * S * S
  assert float(full['n']) == 8 and float(part['n']) == 6
  assert metrics.compute_metrics(full['cm'])['oa'] > 0
  # Eval uses running BatchNorm stats, so the 6 real examples score the same as a batch of 6.
  six = {k: v[:6] for k, v in b.items()}
  mesh1 = sharding.create_mesh(_mesh_cfg(-1, 1), devices=jax.devices()[:1])
  eval1 = train_step.make_eval_step(model, config, mesh1, jax.tree.map(
      lambda _: sharding.replicated(mesh1), shardings))
  state1 = jax.device_put(state, sharding.replicated(mesh1))
  ref = jax.device_get(eval1(state1, {k: jnp.asarray(v) for k, v in six.items()},
                             jnp.asarray(text_table())))
  np.testing.assert_array_equal(part['cm'], ref['cm'])
  assert float(part['loss_sum']) == pytest.approx(float(ref['loss_sum']), rel=1e-5)


def test_shard_batch_names_missing_keys():
  mesh = sharding.create_mesh(_mesh_cfg(-1, 1))
  (b,) = make_batches(1)
  del b['mask']
  with pytest.raises(KeyError, match='mask'):
    train_step.shard_batch(b, mesh)


def _flat_cfg(data=8, fsdp=1, **train):
  c = _mesh_cfg(data, fsdp, **train)
  with c.unlocked():
    c.train.grad_reduction = 'flat'
  return c


@pytest.mark.parametrize('accum', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_flat_grad_reduction_is_the_same_step(accum):
  # Per-device forward/backward under shard_map, one all-reduce of the raveled gradients,
  # BatchNorm statistics averaged over the devices: the same losses, parameters and running
  # statistics as jit's partitioning on one device (no dropout: its per-device draws differ).
  model = ToyModel(use_bn=True)
  batches = make_batches(3)
  s1, l1 = run(_mesh_cfg(-1, 1, grad_accum_steps=accum), model, batches,
               devices=jax.devices()[:1])
  devices = 8 // accum   # each microbatch splits evenly over the devices
  s8, l8 = run(_flat_cfg(devices, grad_accum_steps=accum), model, batches,
               devices=jax.devices()[:devices])
  assert l1[-1] < l1[0]
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  flat1 = dict(jax.tree_util.tree_leaves_with_path((s1.params, s1.model_state)))
  flat8 = dict(jax.tree_util.tree_leaves_with_path((s8.params, s8.model_state)))
  assert flat1.keys() == flat8.keys()
  for path, a in flat1.items():
    np.testing.assert_allclose(np.asarray(flat8[path]), np.asarray(a), atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def _all_reduced_arrays(config, model) -> list[str]:
  """The array types (e.g. 'f32[2113]') the compiled step's all-reduce instructions move."""
  mesh, state, _, step = setup(config, model)
  (b,) = make_batches(1)
  hlo = step.lower(state, train_step.shard_batch(b, mesh),
                   jnp.asarray(text_table())).compile().as_text()
  out = []
  for line in hlo.splitlines():
    m = re.search(r'=\s*(.*?)\s*all-reduce(?:-start)?\(', line)
    if m:
      out += re.findall(r'[a-z]+\d*\[[\d,]*\]', m.group(1))
  return out


def test_flat_grad_reduction_all_reduces_the_gradients_as_one_array():
  model = ToyModel(use_bn=True)
  mesh, state, _, _ = setup(_mesh_cfg(8, 1), model)
  shapes = [x.shape for x in jax.tree.leaves(state.params)]
  n = sum(int(np.prod(s)) for s in shapes)
  per_param = _all_reduced_arrays(_mesh_cfg(8, 1), model)
  flat = _all_reduced_arrays(_flat_cfg(), model)
  kernels = [f'f32[{",".join(map(str, s))}]' for s in shapes if len(s) == 4]
  assert kernels and all(k in per_param for k in kernels), per_param  # one array per parameter
  assert f'f32[{n}]' in flat and not any(k in flat for k in kernels), flat
  assert len(flat) <= len(per_param) - len(shapes) + 1, (flat, per_param)


def test_flat_grad_reduction_needs_a_data_parallel_mesh_and_whole_rows_per_device():
  with pytest.raises(ValueError, match=r"mesh splits parameters over fsdp=4 .*config.mesh.fsdp=1"):
    setup(_flat_cfg(2, 4), ToyModel())
  with pytest.raises(ValueError, match=r'grad_accum_steps=2 = 4 rows do not split over 8 devices'):
    setup(_flat_cfg(grad_accum_steps=2), ToyModel())
