"""`python -m segchange_jax.evaluate --verify` refuses what it cannot check in one line (exit 2,
nothing written): data whose fingerprint differs from the card's, a checkpoint without a card,
a card without test metrics. (A verify that reproduces: tests/train/test_trainer.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from segchange_jax.data import fingerprint
from segchange_jax.interop import checkpoints
from segchange_jax.train import model_card
from tests.eval import tiny


@pytest.fixture(scope='module')
def carded(tmp_path_factory):
  """A tiny variables folder with a model card scored 'on test' of a synthetic dataset."""
  root = tmp_path_factory.mktemp('verify')
  shards, npz, _ = tiny.make_dataset(root, n=12)
  config = tiny.tiny_config(shards, npz)
  tiny.save_checkpoint(root / 'ckpt', config)
  card = model_card.build_card(
      config=json.loads(config.to_json_best_effort()),
      code=checkpoints.code_version(), shards_dir=shards,
      fingerprint=fingerprint.fingerprint(shards), leaks=None,
      metrics={'test': {'f1': 0.5, 'num_examples': 2, 'threshold': 0.5, 'step': 1}}, seed=0,
      step=1, total_steps=1, steps_per_epoch=1, wall_time_s=1.0,
      hardware_info=model_card.hardware(), kind='best_iou')
  checkpoints.write_card(root / 'ckpt', card)
  return root, shards, card


def _verify(cwd, *args) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'segchange_jax.evaluate', *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_error(proc, *words) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [ln for ln in lines if ln.startswith('error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
  for w in words:
    assert w in errors[0], (w, errors[0])
  return errors[0]


def test_verify_on_changed_shards_names_both_hashes_and_writes_nothing(carded, tmp_path):
  root, shards, card = carded
  changed = tmp_path / 'shards'
  shutil.copytree(shards, changed)
  victim = sorted(n for n in os.listdir(changed) if n.startswith('test'))[0]
  with open(changed / victim, 'ab') as f:
    f.write(b'\0')  # one more byte in one test shard
  now = fingerprint.fingerprint(str(changed))['sha256']
  assert now != card['data']['fingerprint']['sha256']
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  proc = _verify(cwd, '--verify', str(root / 'ckpt'), '--config', str(tiny.REPO / 'configs'
                 / 'demo.py'), f'--config.data.shards_dir={changed}')
  _one_error(proc, now, card['data']['fingerprint']['sha256'], str(changed))
  assert proc.stdout == '' and os.listdir(cwd) == []


def test_verify_without_a_card_or_without_test_metrics_is_one_line(carded, tmp_path):
  root, _, card = carded
  bare = tmp_path / 'bare'
  shutil.copytree(root / 'ckpt', bare)
  os.remove(bare / checkpoints.CARD_FILE)
  _one_error(_verify(tmp_path, '--verify', str(bare)), 'has no model card', str(bare))
  checkpoints.write_card(bare, model_card.with_metrics({**card, 'metrics': {}}, 'val', {}))
  _one_error(_verify(tmp_path, '--verify', str(bare)), "no 'test' metrics")
  _one_error(_verify(tmp_path, '--verify', str(bare), '--out', str(tmp_path / 'o')),
             '--verify', '--out')
  assert not (tmp_path / 'o').exists()


def test_verify_of_a_card_that_does_not_hold_says_so_with_status_1(carded, tmp_path):
  """The fixture's card claims test F1 0.5 and 2 examples; the random model scores otherwise."""
  root, _, _ = carded
  proc = _verify(tmp_path, '--verify', str(root / 'ckpt'))
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith("the card's metrics do NOT reproduce"), lines
  f1 = next(ln for ln in lines if ln.startswith('f1 '))
  assert '0.5' in f1 and 'OFF' in f1, f1
  assert os.listdir(tmp_path) == []  # verify writes nothing
