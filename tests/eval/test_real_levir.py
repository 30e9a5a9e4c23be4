"""Real LEVIR-CD samples end to end: convert (CLI), train a few steps, evaluate.

../shared/data/levir_cd_samples is a flat open-cd root (A/, B/, label/, list/demo.txt) of 12
pairs; test_113_0256.png has no label. Without a list/<split>.txt the converter makes the
whole root ONE split (here named `all`: 11 records once the unlabelled pair is skipped).
With only 11 labelled pairs there is nothing to hold out, so config.data.{train,val,test}_split
and config.eval.split all name that split: this checks the pipeline on real imagery (256 px
RGB, 0/255 labels, an empty label), not generalisation. Training uses random 128 px crops of
the 256 px records; evaluation the whole 256 px records. Prompt embeddings come from an npz
(random) so no text model is needed.

The default test scores the real pairs with a random tiny model (no training: one compile);
the slow one trains 2 steps with loop.train_and_evaluate and then evaluates that checkpoint
(about 3 CPU-minutes, mostly XLA compiles of init, train step and two eval steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.interop import checkpoints
from segchange_jax.train import evaluation
from segchange_jax.train import loop
from tests.eval import tiny

SPLIT = 'all'  # any name without a list/<name>.txt: the whole flat root
MISSING = 'test_113_0256.png'
TEXT_DIM = 16


def _convert(repo_root, root, out, *flags):
  env = {**os.environ, 'PYTHONPATH': str(repo_root)}
  return subprocess.run([sys.executable, '-m', 'data_prep.convert', '--layout', 'opencd',
                         '--root', root, '--out', out, '--splits', SPLIT, '--workers', '1',
                         *flags], cwd=repo_root, env=env, capture_output=True, text=True,
                        check=False)


@pytest.fixture(scope='module')
def levir(repo_root, shared_data, tmp_path_factory):
  """The samples converted with --nostrict (CLI result kept for the report checks)."""
  tmp = tmp_path_factory.mktemp('levir')
  root = str(shared_data / 'levir_cd_samples')
  run = _convert(repo_root, root, str(tmp / 'shards'), '--nostrict')
  return tmp, root, run


def test_convert_reports_the_unlabelled_pair(repo_root, levir):
  tmp, root, run = levir
  assert run.returncode == 0, run.stderr
  out = run.stdout + run.stderr
  assert f'skipped in {SPLIT}:{MISSING}' in out and 'missing label' in out
  assert f'{SPLIT}: 11 records from 11 pairs, 1 skipped, size [256, 256]' in out
  with open(tmp / 'shards' / 'dataset_info.json') as f:
    s = json.load(f)['splits'][SPLIT]
  assert [x['file_name'] for x in s['skipped']] == [MISSING] and s['num_skipped'] == 1
  assert s['label_values'] == [0, 255]
  strict = _convert(repo_root, root, str(tmp / 'strict'), '--strict')
  assert strict.returncode != 0 and MISSING in strict.stderr and 'strict' in strict.stderr
  assert not os.path.exists(tmp / 'strict' / 'dataset_info.json')  # nothing half-written


def _check_eval_outputs(out, root: str) -> dict:
  """metrics JSON in range, 11 rows in the CSV, 4 comparison images built from the real pairs."""
  with open(out / f'metrics_{SPLIT}.json') as f:
    saved = json.load(f)
  assert saved['num_examples'] == 11 and saved['split'] == SPLIT
  for k in ('precision', 'recall', 'f1', 'iou', 'oa'):
    assert 0.0 <= saved[k] <= 1.0 and np.isfinite(saved[k]), (k, saved[k])
  assert np.isfinite(saved['loss']) and saved['loss'] > 0
  with open(out / f'per_example_{SPLIT}.csv') as f:
    names = [line.split(',')[1] for line in f.read().splitlines()[1:]]
  assert len(names) == 11 and MISSING not in names
  images = sorted(os.listdir(out / 'images'))
  assert len(images) == 4 and {n.split('_')[0] for n in images} == {'worst', 'best'}
  for image in images:
    row = cv2.imread(str(out / 'images' / image))
    step = 256 + evaluation.GAP
    assert row.shape == (256, 4 * 256 + 3 * evaluation.GAP, 3)  # A | B | label | overlay
    # The panels are the named pair's real A, B and label (not blanks or resized copies).
    name = image.split('_', 2)[2].rsplit('_iou', 1)[0] + '.png'
    assert name in names, (image, names)
    np.testing.assert_array_equal(row[:, :256], cv2.imread(os.path.join(root, 'A', name)))
    np.testing.assert_array_equal(row[:, step:step + 256],
                                  cv2.imread(os.path.join(root, 'B', name)))
    label = cv2.imread(os.path.join(root, 'label', name), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(row[:, 2 * step:2 * step + 256, 0], (label > 0) * 255)
  return saved


def test_evaluate_real_pairs_with_a_random_model(levir):
  tmp, root, run = levir
  assert run.returncode == 0, run.stderr
  npz = tiny.write_embeddings(tmp / 'emb_tiny.npz', [tiny.tiny_config().data.prompt])
  config = tiny.tiny_config(str(tmp / 'shards'), npz)  # 64 px crops; eval on whole 256 px pairs
  result = evaluation.evaluate(config, tiny.random_variables(config), SPLIT, str(tmp / 'eval0'),
                             num_images=2)
  saved = _check_eval_outputs(tmp / 'eval0', root)
  assert saved['f1'] == pytest.approx(result['f1'])


@pytest.mark.slow
def test_train_then_evaluate_on_real_pairs(repo_root, levir, monkeypatch):
  tmp, root, run = levir
  assert run.returncode == 0, run.stderr
  prompt = 'Buildings appearing or vanishing.'  # configs/demo.py data.prompt (records have none)
  rng = np.random.default_rng(0)
  np.savez(tmp / 'emb.npz', prompts=np.asarray([prompt]),
           embeddings=rng.normal(size=(1, 8, TEXT_DIM)).astype(np.float32))
  over = {
      'data.shards_dir': str(tmp / 'shards'), 'data.source_root': '', 'data.synthetic.n': 0,
      'data.train_split': SPLIT, 'data.val_split': SPLIT, 'data.test_split': SPLIT,
      'eval.split': SPLIT, 'data.image_size': 128, 'model.img_size': 128,
      'data.augment.enabled': False, 'text.embeddings': str(tmp / 'emb.npz'),
      'text.dim': TEXT_DIM, 'train.batch_size': 8, 'train.max_steps': 2, 'train.warmup_steps': 0,
      'train.progress_bar': False, 'train.log_every_steps': 1, 'eval.batch_size': 8,
      'checkpoint.async_save': False, 'checkpoint.keep_best': False,
      'train.start_eval': 1000,  # evaluate once, after the last step (saves compile time)
  }
  config = config_lib.load_config(str(repo_root / 'configs/demo.py'),
                                  [f'{k}={v}' for k, v in over.items()])
  workdir = tmp / 'run'
  trained = loop.train_and_evaluate(config, str(workdir))
  assert trained['num_examples'] == 11

  monkeypatch.chdir(tmp)  # a relative --checkpoint path, as users type it
  config, variables = checkpoints.load_checkpoint(os.path.join('run', 'checkpoints'), config)
  evaluation.evaluate(config, variables, SPLIT, str(tmp / 'eval'), num_images=2,
                    checkpoint=str(workdir / 'checkpoints'))
  saved = _check_eval_outputs(tmp / 'eval', root)
  # The evaluator scores the trained checkpoint exactly as the trainer's final eval did.
  assert saved['f1'] == pytest.approx(trained['f1'], abs=1e-6)
  assert saved['oa'] == pytest.approx(trained['oa'], abs=1e-6)
