"""Test set-up: CPU only, 8 simulated devices, absl flags parsed for Grain workers.

The environment must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['CUDA_VISIBLE_DEVICES'] = ''
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Grain worker processes read absl flags; pytest never parses them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  return REPO


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """../shared/data (real LEVIR-CD pairs and GeoTIFFs); skips where a clone has none."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real data folder {SHARED_DATA} is absent (only present beside the dev checkout)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def dataset(tmp_path_factory) -> pathlib.Path:
  """16 synthetic 64 px scenes converted to shards (12 train / 2 val / 2 test), plus a
  prompt-embedding npz of width 16 (no text model), shared by the trainer and multihost tests."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from segchange_jax.data import convert  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('trainer_data')
  synthetic.generate(str(root / 'raw'), 16, 64, 0)
  info = convert.convert('segchange-default', str(root / 'raw'), str(root / 'shards'))
  prompts = sorted(set(info['prompts']) | {'Buildings appearing or vanishing.'})
  rng = np.random.default_rng(0)
  np.savez(root / 'emb.npz', prompts=np.asarray(prompts),
           embeddings=rng.normal(size=(len(prompts), 8, 16)).astype(np.float32))
  return root
