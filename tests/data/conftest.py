"""Tiny on-disk fixtures for the data tests (PNG/TIF pairs in every raw layout)."""

import os

import cv2
import numpy as np
import pytest


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
