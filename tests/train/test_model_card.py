"""Model cards: the pure builder, the comparison `evaluate --verify` makes, and where cards live
(an item of every Orbax checkpoint, a workdir file, a copy in export bundles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import segchange_jax
from segchange_jax import default_config
from segchange_jax.inference import bundle
from segchange_jax.interop import checkpoints
from segchange_jax.train import checkpointing
from segchange_jax.train import model_card

HW = {'platform': 'cpu', 'device_kind': 'cpu', 'device_count': 8, 'process_count': 1}
CODE = {'segchange_jax': '0.1.0', 'git_commit': 'a' * 40, 'git_dirty': False}


def _facts(**over):
  facts = dict(
      config={'name': 'demo', 'seed': 3, 'model': {'backbone': 'resnet18', 'img_size': 64,
                                                  'num_classes': 1}, 'text': {'model': 'x'}},
      code=CODE, shards_dir='/data/shards',
      fingerprint={'sha256': 'f' * 64, 'splits': {'test': 2, 'train': 8, 'val': 2}},
      leaks=None, metrics={}, seed=3, step=4, total_steps=8, steps_per_epoch=2,
      wall_time_s=12.34567, hardware_info=HW)
  facts.update(over)
  return facts


def test_build_card_is_a_pure_function_of_its_inputs():
  val = model_card.split_metrics({'f1': np.float32(0.5), 'iou': 0.25, 'num_examples': 2,
                                  'epoch': 2, 'checkpoint': 'x'}, 0.5, 4)
  assert val == {'f1': 0.5, 'iou': 0.25, 'num_examples': 2, 'threshold': 0.5, 'step': 4}
  facts = _facts(metrics={'val': val}, leaks={'train_test': [['a.png', 'b.png']]})
  card = model_card.build_card(**facts)
  assert card == model_card.build_card(**_facts(metrics={'val': val},
                                                leaks={'train_test': [['a.png', 'b.png']]}))
  assert card['schema'] == model_card.SCHEMA and card['version'] == model_card.VERSION
  assert card['data'] == {'shards_dir': '/data/shards', 'fingerprint': facts['fingerprint'],
                          'leaks': {'train_test': [['a.png', 'b.png']]}}
  assert card['metrics'] == {'val': val} and card['seed'] == 3
  assert card['training'] == {'step': 4, 'total_steps': 8, 'steps_per_epoch': 2,
                              'wall_time_s': 12.346}
  assert card['hardware'] == HW and card['code'] == CODE
  assert card['checkpoint'] == {'kind': None, 'step': 4}
  json.dumps(card)  # JSON as built
  # The card holds copies: changing an input afterwards does not change it.
  facts['config']['model']['img_size'] = 128
  facts['fingerprint']['sha256'] = 'changed'
  assert card['config']['model']['img_size'] == 64
  assert card['data']['fingerprint']['sha256'] == 'f' * 64
  named = model_card.for_checkpoint(card, 'best_iou', 4)
  assert named['checkpoint'] == {'kind': 'best_iou', 'step': 4}
  assert card['checkpoint']['kind'] is None
  scored = model_card.with_metrics(named, 'test', {'f1': 0.4, 'threshold': 0.5, 'step': 4})
  assert set(scored['metrics']) == {'val', 'test'} and 'test' not in named['metrics']


def test_check_card_refuses_other_files_and_versions():
  card = model_card.build_card(**_facts())
  assert model_card.check_card(card, 'x') is card
  with pytest.raises(ValueError, match='x is not a segchange_jax model card'):
    model_card.check_card({'a': 1}, 'x')
  with pytest.raises(ValueError, match='version 99'):
    model_card.check_card({**card, 'version': 99}, 'x')


def test_same_setup_names_what_differs():
  card = model_card.build_card(**_facts())
  assert model_card.same_setup(card, CODE, HW) == []
  assert 'uncommitted' in model_card.same_setup(card, {**CODE, 'git_dirty': True}, HW)[0]
  assert 'code' in model_card.same_setup(card, {**CODE, 'git_commit': 'b' * 40}, HW)[0]
  assert 'code' in model_card.same_setup(card, {**CODE, 'git_commit': None}, HW)[0]
  assert 'hardware' in model_card.same_setup(card, CODE, {**HW, 'platform': 'gpu'})[0]


def test_compare_metrics_exact_within_and_off():
  card = {'f1': 0.5, 'iou': 0.25, 'loss': 0.7, 'num_examples': 4, 'threshold': 0.5, 'step': 3}
  rows = model_card.compare_metrics(card, {'f1': 0.5, 'iou': 0.25, 'loss': 0.7,
                                           'num_examples': 4, 'threshold': 0.9})
  assert [r['metric'] for r in rows] == ['f1', 'iou', 'loss', 'num_examples']  # context left out
  assert all(r['exact'] and r['within'] for r in rows)
  rows = {r['metric']: r for r in model_card.compare_metrics(
      card, {'f1': 0.5 + 1e-9, 'iou': 0.25 + 0.01, 'num_examples': 5})}
  assert not rows['f1']['exact'] and rows['f1']['within']
  assert not rows['iou']['within']
  assert rows['loss']['now'] is None and not rows['loss']['within']
  assert not rows['num_examples']['within']  # counts never get a tolerance


def test_card_files_render_and_are_found_from_any_checkpoint_path(tmp_path):
  leaks = {'num_leaks': 1, 'counts': {'train/test': 1}, 'num_dropped': 0, 'on_leak': 'warn'}
  card = model_card.build_card(**_facts(metrics={'test': {'f1': 0.5, 'threshold': 0.5,
                                                          'step': 4}}, leaks=leaks))
  checkpoints.write_card(tmp_path, card)
  assert checkpoints.read_card(tmp_path) == card
  text = (tmp_path / checkpoints.CARD_MARKDOWN).read_text()
  for fact in ('f' * 64, 'a' * 12, 'resnet18', '| test | 0.5000 | 0.5000 |', 'seed 3',
               '1 pair(s) found across splits (train/test 1)'):
    assert fact in text, fact
  assert checkpoints.read_card(tmp_path / 'nothing_here') is None


def test_every_checkpoint_kind_saves_its_card_as_an_orbax_item(tmp_path):
  config = default_config.get_config()
  config.checkpoint.async_save = True  # the card rides the asynchronous save
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), config)
  state = {'w': np.arange(6, dtype=np.float32)}
  card = model_card.build_card(**_facts(step=2))
  assert ckpt.save(2, state, None, {'f1': 0.5, 'iou': 0.3}, card=card) == \
      ['latest', 'best_f1', 'best_iou']
  ckpt.save(3, state, None, None, card=None)  # no card given: none written
  ckpt.close()
  for kind in checkpointing.KINDS:
    step_dir = tmp_path / 'checkpoints' / kind / '2'
    saved = checkpoints.read_card(step_dir)
    assert saved == model_card.for_checkpoint(card, kind, 2)
    assert (step_dir / checkpoints.CARD_ITEM / checkpoints.CARD_MARKDOWN).is_file()
  assert checkpoints.read_card(tmp_path / 'checkpoints' / 'latest' / '3') is None
  # find_step_dir's choice (best_iou first) is the card read for a checkpoints root.
  assert checkpoints.read_card(tmp_path / 'checkpoints')['checkpoint']['kind'] == 'best_iou'
  restored = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), config).restore(
      state, step=2)
  np.testing.assert_array_equal(restored[0]['w'], state['w'])


def test_export_card_adds_the_export_settings():
  config = default_config.get_config()
  sig = {'format': 'onnx', 'file': 'model.onnx', 'raw_inputs': False, 'threshold': 0.5,
         'prompts': ['p'], 'graphs': {'model.onnx': {}, 'model_embeddings.onnx': {}},
         'inputs': {'image_a': {'shape': ['b', 64, 64, 3]}}}
  card = model_card.build_card(**_facts())
  out = bundle.export_card(card, config, sig)
  assert {k: v for k, v in out.items() if k != 'export'} == card
  assert 'export' not in card
  export = out['export']
  assert export['format'] == 'onnx' and export['size'] == 64 and export['prompts'] == ['p']
  assert export['files'] == ['model.onnx', 'model_embeddings.onnx']
  assert export['code']['segchange_jax'] == segchange_jax.__version__
  bare = bundle.export_card(None, config, sig)  # a checkpoint without a card
  assert bare['schema'] == model_card.SCHEMA and bare['data'] is None and bare['metrics'] == {}
  assert bare['config']['model']['backbone'] == config.model.backbone


def test_code_version_names_this_checkout():
  code = checkpoints.code_version()
  assert code['segchange_jax'] == segchange_jax.__version__
  repo = os.path.dirname(os.path.dirname(os.path.abspath(segchange_jax.__file__)))
  if os.path.exists(os.path.join(repo, '.git')):
    assert len(code['git_commit']) == 40 and isinstance(code['git_dirty'], bool)
  else:
    assert code['git_commit'] is None and code['git_dirty'] is None


def test_export_copies_the_checkpoint_card_into_the_bundle(tmp_path):
  """`python -m segchange_jax.export` reads --checkpoint's card and ships it with the export
  settings added (through write_bundle's `card`)."""
  from tests.eval import tiny  # pylint: disable=g-import-not-at-top
  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads'])
  config = tiny.tiny_config('', npz)
  tiny.save_checkpoint(tmp_path / 'ckpt', config)
  card = model_card.build_card(**_facts(metrics={'test': {'f1': 0.5, 'threshold': 0.5,
                                                          'step': 4}}))
  checkpoints.write_card(tmp_path / 'ckpt', card)
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
      [sys.executable, '-m', 'segchange_jax.export', '--checkpoint', str(tmp_path / 'ckpt'),
       '--out', str(tmp_path / 'bundle'), '--embeddings', npz, '--platforms', 'cpu'],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  shipped = checkpoints.read_card(tmp_path / 'bundle')
  assert {k: v for k, v in shipped.items() if k != 'export'} == card
  assert shipped['export']['format'] == 'stablehlo' and shipped['export']['size'] == tiny.SIZE
  assert shipped['export']['prompts'] == ['roads']
  assert '| test |' in (tmp_path / 'bundle' / checkpoints.CARD_MARKDOWN).read_text()
