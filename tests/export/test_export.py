"""segchange_jax.export: bundle contents, StableHLO round trip (symbolic batch), params reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from segchange_jax.inference import predictor
from segchange_jax.inference import export
from segchange_jax.text import prompts
from tests.eval import tiny

ENV = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=tiny.REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  config = tiny.tiny_config()
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  npz = tiny.write_embeddings(root / 'p.npz', ['roads', 'buildings'])
  proc = _run('-m', 'segchange_jax.export', '--checkpoint', str(root / 'ckpt'), '--out',
              str(root / 'bundle'), '--embeddings', npz)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rs = np.random.RandomState(1)
  a, b = (rs.randn(3, tiny.SIZE, tiny.SIZE, 3).astype(np.float32) for _ in range(2))
  with np.load(npz) as z:
    text = z['embeddings'][[0, 1, 0]]
  ref = predictor.ChangeDetector(config, variables)
  return root / 'bundle', config, variables, ref, (a, b, text), ref.predict_logits(a, b, text)


def _close(got, want):
  err = float(np.abs(np.asarray(got) - want).max())
  assert err <= 1e-5 * max(1.0, float(np.abs(want).max())), err
  return err


def test_bundle_files_and_signature(bundle):
  out, config, *_ = bundle
  for name in ('variables', 'config.json', 'prompts.npz', 'model.stablehlo', 'signature.json',
               'README.md'):
    assert os.path.exists(out / name), name
  with open(out / 'signature.json') as f:
    sig = json.load(f)
  assert sig['inputs']['image_a']['shape'] == ['b', 64, 64, 3]
  assert sig['inputs']['text_emb']['shape'] == ['b', 8, tiny.TEXT_DIM]
  assert sig['output']['logits']['shape'] == ['b', 64, 64, 1]
  assert sig['platforms'] == ['cpu', 'cuda'] and sig['prompts'] == ['roads', 'buildings']
  assert sorted(export.load_prompts(str(out))) == ['buildings', 'roads']


def test_exported_batch_3_equals_model_apply(bundle):
  out, _, _, _, (a, b, text), want = bundle
  exp = export.load_exported(str(out))
  assert str(exp.in_avals[0].shape[0]) == 'b'  # symbolic batch survives serialization
  err = _close(exp.call(a, b, text), want)
  print(f'exported vs model.apply, batch 3: {err:.2e}')


def test_exported_runs_with_jax_alone_batch_1(bundle, tmp_path):
  out, _, _, _, (a, b, text), want = bundle
  np.savez(tmp_path / 'in.npz', a=a[:1], b=b[:1], t=text[:1])
  script = (
      'import sys, jax, numpy as np\n'
      f'exp = jax.export.deserialize(bytearray(open({str(out / "model.stablehlo")!r}, "rb").read()))\n'
      f'z = np.load({str(tmp_path / "in.npz")!r})\n'
      'y = np.asarray(exp.call(z["a"], z["b"], z["t"]))\n'
      'assert not [m for m in sys.modules if m.startswith("segchange_jax") or m == "flax"]\n'
      f'np.save({str(tmp_path / "y.npy")!r}, y)\n')
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = _close(np.load(tmp_path / 'y.npy'), want[:1])
  print(f'exported (jax only) vs model.apply, batch 1: {err:.2e}')


def test_bundle_params_reload_through_change_detector(bundle):
  out, config, variables, ref, (a, b, text), want = bundle
  det = predictor.ChangeDetector.from_checkpoint(str(out))
  assert det.config.to_dict() == config.to_dict()
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                      det.variables, jax.tree.map(np.asarray, variables))
  assert all(jax.tree.leaves(same))
  # Same compiled forward (no recompilation) on the reloaded variables: identical logits.
  got = np.asarray(ref._forward(det.variables, a, b, text))  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, want)


def test_errors(bundle, tmp_path):
  out, config, variables, *_ = bundle
  with pytest.raises(export.ExportError, match='multiple of 32'):
    export.export_forward(config, variables, 70)
  with pytest.raises(export.ExportError, match='already exists; pass --overwrite'):
    export.write_bundle(str(out), config, variables, embeddings=str(out / 'prompts.npz'))
  bad = tiny.write_embeddings(tmp_path / 'bad.npz', ['x'], dim=16)
  with pytest.raises(prompts.PromptError, match=r'\[8, 32\]'):
    export.write_bundle(str(tmp_path / 'b'), config, variables, embeddings=bad)
  with pytest.raises(export.ExportError, match='not both'):
    export.write_bundle(str(tmp_path / 'c'), config, variables, prompts=['x'], embeddings=bad)
  with pytest.raises(FileNotFoundError, match='segchange_jax.export'):
    export.load_exported(str(tmp_path))
