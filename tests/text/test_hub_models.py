"""text.model as a Hugging Face Hub id: fetched into the HF cache (only what the encoder needs),
then used offline with the same result.

The real all-MiniLM-L6-v2 files (from the pip package) are served by `tests/hub_server.FakeHub`
as `sentence-transformers/all-MiniLM-L6-v2`, next to files the encoder must not download.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

from tests.hub_server import FakeHub

REPO = pathlib.Path(__file__).resolve().parents[2]
ID = 'sentence-transformers/all-MiniLM-L6-v2'
PROMPTS = ['Buildings with changes.', 'Roads appearing.']


def _embed(spec: str, out: pathlib.Path, hf_home: pathlib.Path, endpoint: str,
           offline: bool) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HOME=str(hf_home), HF_ENDPOINT=endpoint,
             HF_HUB_OFFLINE='1' if offline else '0', HF_HUB_DISABLE_TELEMETRY='1',
             HF_HUB_DISABLE_XET='1', NO_PROXY='127.0.0.1', no_proxy='127.0.0.1',
             JAX_PLATFORMS='cpu')
  code = ('import numpy as np; from segchange_jax.text import encoder\n'
          f'enc = encoder.TextEncoder.from_pretrained({spec!r}, max_tokens=8)\n'
          f'np.save({str(out)!r}, enc.encode({PROMPTS!r}))\n'
          'print(enc.path)\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_hub_id_downloads_only_what_the_encoder_needs_then_runs_offline(minilm_dir, tmp_path):
  files = {p.name: p.read_bytes() for p in minilm_dir.iterdir() if p.is_file()}
  assert 'model.safetensors' in files and 'config.json' in files
  extra = {'pytorch_model.bin': b'x' * 1000, 'onnx/model.onnx': b'y' * 1000,
           'README.md': b'# card'}
  hf_home = tmp_path / 'hf'
  with FakeHub({ID: {**files, **extra}}) as hub:
    proc = _embed(ID, tmp_path / 'online.npy', hf_home, hub.endpoint, offline=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fetched = {f for (_, f), n in hub.gets.items() if n}
  assert 'model.safetensors' in fetched and 'config.json' in fetched
  assert not fetched & set(extra), fetched
  snapshot = pathlib.Path(proc.stdout.strip().splitlines()[-1])
  assert snapshot.parent.parent.name == 'models--sentence-transformers--all-MiniLM-L6-v2'
  # The server is gone: offline, the cached snapshot serves the same id.
  proc = _embed(ID, tmp_path / 'offline.npy', hf_home, 'http://127.0.0.1:9', offline=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The snapshot holds the package's own files byte for byte (so the encoder sees the same
  # weights and tokenizer as with text.model=<that folder>), and nothing else.
  assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == {
      k: v for k, v in files.items() if k in fetched}
  online = np.load(tmp_path / 'online.npy')
  assert online.shape == (2, 8, 384) and np.abs(online).max() > 0.1
  np.testing.assert_array_equal(np.load(tmp_path / 'offline.npy'), online)


def test_uncached_hub_id_offline_is_one_clear_error(tmp_path):
  proc = _embed('bert-base-uncased', tmp_path / 'x.npy', tmp_path / 'hf', 'http://127.0.0.1:9',
                offline=True)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-2:]
  text = '\n'.join(last)
  assert "HubError: config.text.model='bert-base-uncased'" in text, proc.stderr[-2000:]
  assert 'hf download bert-base-uncased' in text and '--config.text.model=DIR' in text, text
