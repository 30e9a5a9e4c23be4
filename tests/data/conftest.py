"""Tiny on-disk fixtures for the data tests (PNG/TIF pairs in every raw layout)."""

import os

import cv2
import numpy as np
import pytest

from configs import base
from segchange_jax.data import convert
from segchange_jax.data import synthetic


def write_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if array.ndim == 3 and array.shape[-1] == 3:
    array = array[..., ::-1]
  elif array.ndim == 3 and array.shape[-1] == 4:
    array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
  assert cv2.imwrite(path, array)


def make_pair(seed: int, size=(32, 32)):
  """Random RGB A, B and a 0/255 label whose changed pixels are where B is brighter."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  label = np.where(b[..., 0] > 128, 255, 0).astype(np.uint8)
  return a, b, label


def write_folder(base: str, names, subdirs=('A', 'B', 'label'), size=(32, 32), seed=0):
  """Writes pairs `names` under base/{subdirs}; returns {name: (a, b, label)}."""
  out = {}
  for i, name in enumerate(names):
    a, b, label = make_pair(seed + i, size)
    for sub, arr in zip(subdirs, (a, b, label)):
      write_png(os.path.join(base, sub, name), arr)
    out[name] = (a, b, label)
  return out


@pytest.fixture
def tmp(tmp_path):
  return str(tmp_path)


@pytest.fixture
def helpers():
  import types  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(write_png=write_png, make_pair=make_pair, write_folder=write_folder)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """12 synthetic 64 px scenes (with their per-prompt targets) converted into 2 shards."""
  root = tmp_path_factory.mktemp('raw')
  synthetic.generate(str(root), n=12, size=64, seed=0)   # 8 train / 2 val / 2 test
  out = str(tmp_path_factory.mktemp('shards'))
  convert.convert('segchange-default', str(root), out, num_shards=2)
  return out


def data_config(shards_dir: str, **data):
  """The base config reading `shards_dir` at 64 px, batch 4, no reader threads; `data` sets
  further config.data fields. Not validated."""
  c = base.get_config()
  with c.unlocked():
    c.data.shards_dir = shards_dir
    c.data.image_size = 64
    c.data.num_workers = 0
    c.train.batch_size = 4
    for k, v in data.items():
      setattr(c.data, k, v)
  return c
