"""Prompt slots (config.data.targets='prompts') in losses, metrics, the train / eval steps and
the loop's evaluation: K slots score as the mean (losses) or the sum (counts) of K one-slot
computations, and evaluation reports per-prompt F1 / IoU."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from segchange_jax import config_lib
from segchange_jax.data import convert
from segchange_jax.data import input_pipeline as ip
from segchange_jax.data import synthetic
from segchange_jax.train import loop
from segchange_jax.train import losses
from segchange_jax.train import metrics
from segchange_jax.train import sharding
from segchange_jax.train import train_step
from tests.train.traincore_toy import toy_config

B, S, K = 8, 16, 2   # B: the tests run on 8 CPU devices
LOSS = base.get_config().loss.to_dict()


class SlotToy(nn.Module):
  """Trunk (conv, BatchNorm) once per pair; a per-prompt head: text [B,T,L] -> [B,H,W,1],
  text [B,P,T,L] -> [B,H,W,P] with slot p equal to the call with text[:, p]."""
  width: int = 8

  @nn.compact
  def __call__(self, image_a, image_b, text_emb, train: bool = False):
    conv = nn.Conv(self.width, (3, 3), name='backbone')
    x = jnp.concatenate([conv(image_a), conv(image_b)], -1)
    x = nn.Conv(self.width, (3, 3), use_bias=False, name='fuse')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))
    t = nn.Dense(self.width, name='text')(jnp.mean(text_emb, axis=-2))
    t = t[:, None] if text_emb.ndim == 3 else t                # [B, P, width]
    y = nn.relu(x[:, :, :, None, :] + t[:, None, None])       # [B, H, W, P, width]
    return nn.Dense(1, name='head')(y)[..., 0]


def _slot_batch(seed=0, k=K):
  rng = np.random.default_rng(seed)
  label = (rng.random((B, S, S, k)) > 0.7).astype(np.int32)
  label[1, ..., 0] = 0   # a negative slot
  return {'image_a': rng.normal(size=(B, S, S, 3)).astype(np.float32),
          'image_b': rng.normal(size=(B, S, S, 3)).astype(np.float32),
          'label': label, 'prompt_index': rng.integers(0, 5, (B, k)).astype(np.int32),
          'mask': np.array([1, 1, 1, 0, 1, 1, 1, 0], np.float32)}


def _one_slot(batch, k):
  return {**batch, 'label': batch['label'][..., k:k + 1],
          'prompt_index': batch['prompt_index'][:, k:k + 1]}


def test_slot_losses_are_the_mean_of_one_slot_losses():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 8, 8, 3)).astype(np.float32))
  labels = jnp.asarray((rng.random((3, 8, 8, 3)) > 0.6).astype(np.int32))
  mask = jnp.asarray([1.0, 0.0, 1.0])
  total, parts = losses.total_loss(logits, labels, mask, LOSS)
  singles = [losses.total_loss(logits[..., k:k + 1], labels[..., k], mask, LOSS)
             for k in range(3)]
  np.testing.assert_allclose(total, np.mean([t for t, _ in singles]), rtol=1e-6)
  for name in parts:
    np.testing.assert_allclose(parts[name], np.mean([p[name] for _, p in singles]), rtol=1e-6)
  # One slot [B,H,W,1] with labels [B,H,W,1] is the binary loss of labels [B,H,W].
  one, _ = losses.total_loss(logits[..., :1], labels[..., :1], mask, LOSS)
  np.testing.assert_allclose(one, singles[0][0], rtol=1e-7)
  with pytest.raises(ValueError, match='must match the logits'):
    losses.slot_losses(logits, labels[..., :2], mask)


def test_slot_counts_and_prompt_metrics_by_hand():
  # One example, 4 pixels, 2 prompts; sigmoid(z) > 0.5 <=> z > 0.
  z = jnp.asarray(np.array([[[[3., -3.], [3., 3.], [-3., -3.], [-3., 3.]]]], np.float32))
  y = jnp.asarray(np.array([[[[1, 0], [0, 0], [1, 0], [0, 0]]]], np.int32))
  cms = np.asarray(metrics.slot_confusion_matrices(z, y, jnp.ones(1)))
  # prompt 0: tp 1 (px 0), fp 1 (px 1), fn 1 (px 2), tn 1; prompt 1: fp 2 (px 1, 3), tn 2.
  np.testing.assert_array_equal(cms, [[[1, 1], [1, 1]], [[2, 2], [0, 0]]])
  np.testing.assert_array_equal(metrics.confusion_matrix(z, y, jnp.ones(1)), cms.sum(0))
  np.testing.assert_array_equal(metrics.slot_confusion_matrices(z, y, jnp.zeros(1)),
                                np.zeros((2, 2, 2)))   # padding counts nothing
  got = metrics.prompt_metrics(np.array([[[5, 1], [2, 2]], [[10, 0], [0, 0]], [[3, 3], [0, 0]]]),
                               ['new roads', 'new mounds', 'any change'])
  assert got['f1/new roads'] == pytest.approx(4 / 7)
  assert got['iou/new roads'] == pytest.approx(2 / 5)
  assert got['precision/new roads'] == pytest.approx(2 / 3)
  assert got['recall/new roads'] == pytest.approx(1 / 2)
  assert got['f1/new mounds'] == got['f1/any change'] == 0.0
  # 'new mounds' is neither carried nor predicted: left out of the macro means.
  assert got['macro_f1'] == pytest.approx((4 / 7 + 0.0) / 2)
  assert got['macro_iou'] == pytest.approx((2 / 5) / 2)
  with pytest.raises(ValueError, match=r'\[2,2,2\] matrices'):
    metrics.prompt_metrics(np.zeros((3, 2, 2)), ['a', 'b'])


def _toy_state(config, model):
  mesh = sharding.create_mesh(config)
  shapes = {k: jax.ShapeDtypeStruct((B, S, S, 3), jnp.float32) for k in ('image_a', 'image_b')}
  state, shardings = train_step.create_train_state(model, config, jax.random.PRNGKey(0), shapes,
                                                  mesh, steps_per_epoch=4)
  return mesh, state, shardings


def test_train_and_eval_step_with_two_slots_equal_two_one_slot_steps():
  config = toy_config(lr=1e-2, batch_size=B)
  model = SlotToy()
  mesh, state, shardings = _toy_state(config, model)
  table = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8, 16)).astype(np.float32))
  batch = _slot_batch()
  grads = train_step._grads   # pylint: disable=protected-access
  grads_fn = jax.jit(lambda s, b: grads(model, config, s, b, table))
  g2, loss2, _, _, cm2 = grads_fn(state, batch)
  ones = [grads_fn(state, _one_slot(batch, k)) for k in range(K)]
  np.testing.assert_allclose(loss2, np.mean([o[1] for o in ones]), rtol=1e-6)
  jax.tree.map(lambda a, *b: np.testing.assert_allclose(a, np.mean(b, 0), rtol=1e-5, atol=1e-7),
               g2, *[o[0] for o in ones])
  np.testing.assert_array_equal(cm2, sum(np.asarray(o[4]) for o in ones))
  assert int(np.asarray(cm2).sum()) == 6 * S * S * K   # every slot of the 6 valid examples

  eval_step = train_step.make_eval_step(model, config, mesh, shardings)
  out2 = eval_step(state, train_step.shard_batch(batch, mesh), table)
  outs = [eval_step(state, train_step.shard_batch(_one_slot(batch, k), mesh), table)
          for k in range(K)]
  assert out2['prompt_cm'].shape == (K, 2, 2)
  for k, o in enumerate(outs):
    np.testing.assert_array_equal(out2['prompt_cm'][k], o['cm'])
    np.testing.assert_array_equal(o['prompt_cm'][0], o['cm'])
  np.testing.assert_allclose(out2['loss_sum'], np.mean([o['loss_sum'] for o in outs]), rtol=1e-6)
  # The label mode's eval outputs carry no per-prompt counts.
  label_batch = {**batch, 'label': batch['label'][..., 0],
                 'prompt_index': batch['prompt_index'][:, 0]}
  assert 'prompt_cm' not in eval_step(state, train_step.shard_batch(label_batch, mesh), table)

  step = train_step.make_train_step(model, config, mesh, shardings)
  new_state, out = step(state, train_step.shard_batch(batch, mesh), table)
  np.testing.assert_allclose(out['loss'], loss2, rtol=1e-6)
  assert int(new_state.step) == 1 and np.isfinite(float(out['grad_norm']))


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('raw')
  synthetic.generate(str(root), n=12, size=32, seed=0)   # 8 train / 2 val / 2 test
  out = str(tmp_path_factory.mktemp('shards'))
  convert.convert('segchange-default', str(root), out)
  return out


def test_evaluate_split_scores_every_prompt(shards):
  config = toy_config(batch_size=B)
  with config.unlocked():
    config.data.shards_dir = shards
    config.data.image_size = 32
    config.data.num_workers = 0
    config.data.targets = 'prompts'
  config_lib.validate_config(config)
  info = ip.prompt_table_info(config, ip.load_dataset_info(shards))
  table_index = {p: i for i, p in enumerate(info['prompts'])}
  table = jnp.asarray(np.random.default_rng(3).normal(
      size=(len(table_index), 8, 16)).astype(np.float32))
  model = SlotToy()
  mesh, state, shardings = _toy_state(config, model)
  eval_step = train_step.make_eval_step(model, config, mesh, shardings)
  result = loop.evaluate_split(eval_step, state, config, 'val', table_index, table, mesh, B)
  prompts = ip.target_prompts(config)
  # The same per-prompt counts computed here from the eval batches and the model.
  apply = jax.jit(lambda a, b, t: model.apply({'params': state.params, **state.model_state},
                                              a, b, t))
  cms = np.zeros((len(prompts), 2, 2), np.int64)
  for batch in ip.create_eval_iterator(config, 'val', table_index, B, 0, 1):
    pred = np.asarray(apply(batch['image_a'], batch['image_b'],
                            table[batch['prompt_index']])) > 0
    for k in range(len(prompts)):
      for j in np.flatnonzero(batch['mask']):
        t, p = batch['label'][j, ..., k].ravel(), pred[j, ..., k].ravel()
        np.add.at(cms[k], (t, p.astype(int)), 1)
  want = metrics.prompt_metrics(cms, prompts)
  for p in prompts:
    assert result[f'f1/{p}'] == pytest.approx(want[f'f1/{p}'])
    assert result[f'iou/{p}'] == pytest.approx(want[f'iou/{p}'])
  assert result['macro_f1'] == pytest.approx(want['macro_f1'])
  pooled = metrics.compute_metrics(cms.sum(0))
  assert result['f1'] == pytest.approx(pooled['f1']) and result['num_examples'] == 2
  assert cms.sum() == 2 * 32 * 32 * len(prompts)
  json.dumps(result)   # the metrics file takes it as it is


@pytest.mark.slow
def test_training_with_prompts_reports_per_prompt_metrics(repo_root, dataset, tmp_path):
  """configs/demo_prompts.py, tiny, 2 steps: the loop trains on prompt slots and writes the
  per-prompt scores of the test split."""
  from tests.train.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top
  shards_dir = str(dataset / 'shards')
  info = ip.load_dataset_info(shards_dir)
  names = sorted(set(info['prompts']) | set(info['target_prompts']) | {'any change'})
  npz = tmp_path / 'emb.npz'
  np.savez(npz, prompts=np.asarray(names), embeddings=np.random.default_rng(0).normal(
      size=(len(names), 8, 16)).astype(np.float32))
  config = config_lib.load_config(str(repo_root / 'configs/demo_prompts.py'), tiny_overrides(
      dataset, **{'text.embeddings': str(npz), 'train.max_steps': 2}))
  assert config.data.targets == 'prompts'
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(config, workdir)
  with open(tmp_path / 'run' / 'eval_test.json') as f:
    saved = json.load(f)
  for p in info['target_prompts']:
    assert 0.0 <= saved[f'f1/{p}'] <= 1.0 and f'iou/{p}' in saved
  assert saved['macro_f1'] == result['macro_f1'] and saved['num_examples'] == 2
