"""Exact resume, keep-N + best retention, restore onto another mesh, restore_params."""

import jax
import numpy as np

from segchange_jax.train import checkpointing
from segchange_jax.train import sharding
from segchange_jax.train import train_step
from tests.train.test_train_step import _mesh_cfg
from tests.train.test_train_step import make_batches
from tests.train.test_train_step import setup
from tests.train.test_train_step import text_table
from tests.train.traincore_toy import ToyModel


def _assert_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exact_resume_retention_and_cross_mesh_restore(tmp_path):
  k = 2
  config = _mesh_cfg(-1, 1)
  with config.unlocked():
    config.checkpoint.keep = 2
  model = ToyModel(use_bn=True, dropout=0.2)
  batches = make_batches(2 * k)
  mesh, state, shardings, step = setup(config, model, devices=jax.devices()[:1])
  table = jax.device_put(text_table(), sharding.replicated(mesh))
  abstract = jax.eval_shape(lambda s: s, state)

  # Reference: 2k uninterrupted steps, checkpoints after each of the first k.
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), config)
  evals = [{'f1': 0.5, 'iou': 0.2}, {'f1': 0.4, 'iou': 0.3}]
  written = []
  for i, b in enumerate(batches):
    state, _ = step(state, train_step.shard_batch(b, mesh), table)
    if i < k:
      written.append(ckpt.save(int(state.step), state, {'epoch': 0, 'next': i + 1}, evals[i]))
  ckpt.close()
  assert written == [['latest', 'best_f1', 'best_iou'], ['latest', 'best_iou']]
  reference = jax.device_get(state)

  # Resume with a new checkpointer into a new state; the same (pure) step function continues.
  ckpt2 = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), config)
  restored, it_state, at = ckpt2.restore(abstract, shardings)
  assert at == k and it_state == {'epoch': 0, 'next': k}
  for b in batches[k:]:
    restored, _ = step(restored, train_step.shard_batch(b, mesh), table)
  resumed = jax.device_get(restored)
  assert int(resumed.step) == int(reference.step) == 2 * k
  _assert_identical((reference.params, reference.model_state, reference.opt_state, reference.rng),
                    (resumed.params, resumed.model_state, resumed.opt_state, resumed.rng))

  # Retention: best_f1 stays at step 1 (0.5 > 0.4), best_iou moved to step 2; the rebuilt
  # checkpointer remembers the stored bests, so a worse metric writes nothing.
  assert ckpt2.steps('best_f1') == [1] and ckpt2.steps('best_iou') == [2]
  assert ckpt2.save(3, restored, None, {'f1': 0.45, 'iou': 0.25}) == ['latest']
  assert ckpt2.save(4, restored, b'\x00grain', {'f1': 0.6, 'iou': 0.1}) == ['latest', 'best_f1']
  ckpt2.wait()
  assert ckpt2.steps('latest') == [3, 4] and ckpt2.steps('best_f1') == [4]
  assert ckpt2.restore(abstract, shardings)[1] == b'\x00grain'

  # Restore onto an 8-device data x fsdp mesh (a different device count).
  mesh24 = sharding.create_mesh(_mesh_cfg(2, 4))
  shardings24 = sharding.param_shardings(abstract, mesh24, config)
  on24, _, at24 = ckpt2.restore(abstract, shardings24, kind='best_iou')
  assert at24 == 2
  assert on24.params['fuse']['kernel'].sharding.spec == jax.sharding.PartitionSpec(
      None, None, 'fsdp', None)
  assert len(on24.params['fuse']['kernel'].sharding.device_set) == 8
  on1, _, _ = ckpt2.restore(abstract, shardings, kind='best_iou')
  _assert_identical(jax.device_get(on24), jax.device_get(on1))

  # init_from: the params of a checkpoint dir, as host arrays or placed like a target.
  params = checkpointing.restore_params(str(tmp_path / 'ckpt' / 'latest'))
  _assert_identical(params, jax.device_get(restored.params))
  placed = checkpointing.restore_params(str(tmp_path / 'ckpt'), on24.params)  # prefers best_iou
  _assert_identical(placed, on24.params)
  assert placed['fuse']['kernel'].sharding == on24.params['fuse']['kernel'].sharding
  ckpt2.close()
