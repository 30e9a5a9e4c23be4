"""A tiny synthetic dataset and config overrides shared by the driver-level training tests."""

import pathlib

import numpy as np
import pytest

from data_prep import convert
from data_prep import synthetic

PROMPTS_DIM = 16


@pytest.fixture(scope='session')
def dataset(tmp_path_factory) -> pathlib.Path:
  """16 synthetic 64 px scenes converted to shards, plus a prompt-embedding npz (no text model)."""
  root = tmp_path_factory.mktemp('trainer_data')
  synthetic.generate(str(root / 'raw'), 16, 64, 0)
  info = convert.convert('segchange-default', str(root / 'raw'), str(root / 'shards'))
  prompts = sorted(set(info['prompts']) | {'Buildings appearing or vanishing.'})
  rng = np.random.default_rng(0)
  np.savez(root / 'emb.npz', prompts=np.asarray(prompts),
           embeddings=rng.normal(size=(len(prompts), 8, PROMPTS_DIM)).astype(np.float32))
  return root


def tiny_overrides(dataset: pathlib.Path, **overrides) -> list[str]:
  """`field=value` overrides turning configs/demo.py into a 64 px run on `dataset`."""
  over = {
      'data.shards_dir': str(dataset / 'shards'), 'data.source_root': '',
      'data.synthetic.n': 0, 'data.image_size': 64, 'model.img_size': 64,
      'text.embeddings': str(dataset / 'emb.npz'), 'text.dim': PROMPTS_DIM,
      'train.batch_size': 8, 'train.scheduler': 'step', 'train.epochs': 4,
      'train.progress_bar': False, 'train.log_every_steps': 1, 'eval.batch_size': 8,
      'data.augment.enabled': False, 'checkpoint.async_save': False,
  }
  over.update(overrides)
  return [f'{k}={v}' for k, v in over.items()]
