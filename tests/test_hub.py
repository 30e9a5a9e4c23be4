"""Hub ids for config.model.pretrained against a real huggingface_hub cache, offline.

huggingface_hub reads HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE when it is imported, so every
resolution runs in a fresh process with the environment a user would set. Downloads come from
`tests/hub_server.FakeHub` on 127.0.0.1 (HF_ENDPOINT), so huggingface_hub writes its own cache
layout; with HF_HUB_OFFLINE=1 the same ids then resolve from that cache alone.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save

from tests.hub_server import FakeHub

REPO = pathlib.Path(__file__).resolve().parents[1]
RESNET = 'timm/resnet50.tv_in1k'  # what 'imagenet' means for model.backbone='resnet50'


def _weights() -> bytes:
  rng = np.random.default_rng(0)
  return save({'conv1.weight': rng.normal(size=(64, 3, 7, 7)).astype(np.float32),
               'fc.bias': rng.normal(size=(10,)).astype(np.float32)})


def _resolve(spec: str, hf_home: pathlib.Path, endpoint: str, offline: bool,
             backbone: str = 'resnet50') -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HOME=str(hf_home), HF_ENDPOINT=endpoint,
             HF_HUB_OFFLINE='1' if offline else '0', HF_HUB_DISABLE_TELEMETRY='1',
             HF_HUB_DISABLE_XET='1', NO_PROXY='127.0.0.1', no_proxy='127.0.0.1')
  env.pop('HF_HUB_CACHE', None)
  env.pop('HUGGINGFACE_HUB_CACHE', None)
  code = ('import sys; from segchange_jax.interop import pretrained\n'
          'try:\n'
          f'  print(pretrained.resolve({spec!r}, {backbone!r}))\n'
          'except Exception as e:\n'
          '  print(type(e).__name__ + ": " + str(e)); sys.exit(3)\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=False)


def _path(proc: subprocess.CompletedProcess) -> pathlib.Path:
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return pathlib.Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture()
def hub():
  with FakeHub({RESNET: {'model.safetensors': _weights(), 'config.json': b'{"architecture": 1}'},
                'timm/bin-only': {'pytorch_model.bin': b'not read here'}}) as h:
    yield h


def test_imagenet_downloads_into_the_hf_cache_then_resolves_offline(hub, tmp_path):
  hf_home = tmp_path / 'hf'
  online = _path(_resolve('imagenet', hf_home, hub.endpoint, offline=False))
  # huggingface_hub's own layout: models--owner--name/snapshots/<commit>/file -> ../../blobs/<sha>
  snap = hf_home / 'hub' / 'models--timm--resnet50.tv_in1k' / 'snapshots' / hub.commits[RESNET]
  assert online == snap / 'model.safetensors'
  assert online.is_symlink() and online.resolve().parent.name == 'blobs'
  assert (hf_home / 'hub' / 'models--timm--resnet50.tv_in1k' / 'refs' / 'main').read_text() \
      == hub.commits[RESNET]
  assert hub.gets[(RESNET, 'model.safetensors')] == 1
  want = load_file(online)
  # Offline, with the endpoint pointing nowhere: the cache alone answers, nothing is fetched.
  offline = _path(_resolve(RESNET, hf_home, 'http://127.0.0.1:9', offline=True))
  assert offline == online
  assert hub.gets[(RESNET, 'model.safetensors')] == 1
  got = load_file(offline)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  # A repo without model.safetensors falls back to pytorch_model.bin.
  assert _path(_resolve('timm/bin-only', hf_home, hub.endpoint, offline=False)).name == \
      'pytorch_model.bin'


def test_offline_and_not_cached_is_one_clear_error(tmp_path):
  proc = _resolve('timm/resnet50.tv_in1k', tmp_path / 'empty', 'http://127.0.0.1:9', offline=True)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  msg = proc.stdout
  assert msg.startswith("HubError: config.model.pretrained='timm/resnet50.tv_in1k': "
                        'model.safetensors is not in the Hugging Face cache'), msg
  assert 'HF_HUB_OFFLINE=1 forbids downloading it' in msg, msg
  assert 'hf download timm/resnet50.tv_in1k model.safetensors (' in msg, msg
  assert '--config.model.pretrained=PATH' in msg and str(tmp_path / 'empty' / 'hub') in msg, msg
  assert 'Traceback' not in proc.stderr


def test_unknown_repo(hub, tmp_path):
  proc = _resolve('nobody/nothing', tmp_path / 'hf', hub.endpoint, offline=False)
  assert proc.returncode == 3 and 'no such repo on the Hub' in proc.stdout, proc.stdout


@pytest.mark.slow
def test_unreachable_hub(tmp_path):
  """~50 s: huggingface_hub retries a refused connection with backoff before giving up."""
  proc = _resolve(RESNET, tmp_path / 'hf', 'http://127.0.0.1:9', offline=False)
  assert proc.returncode == 3 and 'hf download timm/resnet50.tv_in1k' in proc.stdout, proc.stdout


def test_cut_download_is_resumed_and_verified(hub, tmp_path):
  hub.cut_once.add((RESNET, 'model.safetensors'))
  path = _path(_resolve(RESNET, tmp_path / 'hf', hub.endpoint, offline=False))
  assert hub.gets[(RESNET, 'model.safetensors')] == 2  # cut halfway, then the rest (Range)
  assert path.read_bytes() == hub.repos[RESNET]['model.safetensors']


def test_truncated_cached_blob_is_detected_and_fetched_again(hub, tmp_path):
  hf_home = tmp_path / 'hf'
  path = _path(_resolve(RESNET, hf_home, hub.endpoint, offline=False))
  blob = path.resolve()
  good = blob.read_bytes()
  blob.write_bytes(good[:len(good) // 2])  # e.g. a copy of the cache that was cut short
  # Offline it cannot be repaired: a clear error, never a half-loaded file.
  proc = _resolve(RESNET, hf_home, 'http://127.0.0.1:9', offline=True)
  assert proc.returncode == 3, proc.stdout
  assert "does not match the Hub's checksum" in proc.stdout, proc.stdout
  assert 'hf download timm/resnet50.tv_in1k model.safetensors --force-download' in proc.stdout
  # Online it is fetched again.
  assert _path(_resolve(RESNET, hf_home, hub.endpoint, offline=False)) == path
  assert hub.gets[(RESNET, 'model.safetensors')] == 2
  assert path.read_bytes() == good
