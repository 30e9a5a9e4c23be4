"""segchange_jax.export: bundle contents, its README run as written, StableHLO round trip
(symbolic batch), params reload."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from segchange_jax import atomic
from segchange_jax.data import imagery
from segchange_jax.inference import bundle as bundle_lib
from segchange_jax.inference import export
from segchange_jax.inference import predictor
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
  assert sorted(bundle_lib.load_prompts(str(out))) == ['buildings', 'roads']


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
      f'path = {str(out / "model.stablehlo")!r}\n'
      'exp = jax.export.deserialize(bytearray(open(path, "rb").read()))\n'
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
  with pytest.raises(atomic.OutputError, match='already exists; pass --overwrite'):
    export.write_bundle(str(out), config, variables, embeddings=str(out / 'prompts.npz'))
  bad = tiny.write_embeddings(tmp_path / 'bad.npz', ['x'], dim=16)
  with pytest.raises(prompts.PromptError, match=r'\[8, 32\]'):
    export.write_bundle(str(tmp_path / 'b'), config, variables, embeddings=bad)
  with pytest.raises(export.ExportError, match='not both'):
    export.write_bundle(str(tmp_path / 'c'), config, variables, prompts=['x'], embeddings=bad)
  with pytest.raises(FileNotFoundError, match='segchange_jax.export'):
    export.load_exported(str(tmp_path))


def readme_code(readme: str) -> str:
  """The README's python block (there must be exactly one)."""
  blocks = re.findall(r'```python\n(.*?)```', readme, re.S)
  assert len(blocks) == 1, readme
  return blocks[0]


def run_readme_code(folder, tmp_path, forbid=('segchange_jax', 'flax')) -> dict:
  """Runs the README's python block as written, from the bundle folder, in a fresh python that
  must not import segchange_jax or flax; returns its images, logits and decision."""
  code = readme_code((folder / 'README.md').read_text())
  code += (f'\nimport sys\nassert not [m for m in sys.modules if m.split(".")[0] in {forbid!r}]\n'
           f'np.savez({str(tmp_path / "readme_out.npz")!r}, rgb_a=rgb_a, rgb_b=rgb_b, '
           'text_emb=text_emb, logits=logits, change=change)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=folder, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / 'readme_out.npz') as z:
    return dict(z)


def check_readme_text(readme: str, sig: dict, runtime: str, load_words: str) -> None:
  """What a reader needs without the code: runtime and loader, input layout, normalisation,
  prompts and the decision rule with the config's threshold."""
  assert runtime in readme and load_words in readme
  size = sig['inputs']['image_a']['shape'][1]
  for words in (f'float32 [b, {size}, {size}, 3]', 'R, G, B', '1 / 255', 'ImageNet mean',
                str([0.485, 0.456, 0.406]), str([0.229, 0.224, 0.225]), 'prompts.npz',
                f"{sig['prompts'][0]!r}", 'sigmoid(logits[..., 0]) > threshold',
                f"threshold = {sig['threshold']!r}", "config's `infer.threshold`"):
    assert words in readme, words


def test_readme_says_how_to_run_the_bundle_and_its_code_runs_with_jax_alone(bundle, tmp_path):
  """The README of a bundle whose config threshold is not the usual 0.5: its text names the
  normalisation and the decision rule, and its python block, run as written from the folder
  with jax alone, gives the model's logits for its images and the prompt it picks, and the
  decision the rule states."""
  _, config, variables, ref, *_ = bundle
  config = config.copy_and_resolve_references()
  config.infer.threshold = 0.3
  out = tmp_path / 'b03'
  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads', 'buildings'])
  sig = export.write_bundle(str(out), config, variables, embeddings=npz, platforms=['cpu'])
  readme = (out / 'README.md').read_text()
  check_readme_text(readme, sig, 'jax', 'jax.export.deserialize')
  assert sig['threshold'] == 0.3 and 'THRESHOLD = 0.3' in readme
  got = run_readme_code(out, tmp_path)
  with np.load(npz) as z:
    np.testing.assert_array_equal(got['text_emb'], z['embeddings'][:1])  # 'roads', row 0
  want = ref.predict_logits(imagery.normalize(got['rgb_a'][None]),
                            imagery.normalize(got['rgb_b'][None]), got['text_emb'])
  err = _close(got['logits'], want)
  print(f'README code (jax only) vs model.apply: {err:.2e}')
  np.testing.assert_array_equal(got['change'], 1 / (1 + np.exp(-want[..., 0])) > 0.3)


def test_toy_export_format_follows_the_recipe(bundle, tmp_path):
  """/tmp recipe "Adding an export format": a BundleFormat plus a model-file writer handed to
  bundle.write give a complete bundle whose README code runs with the toy's runtime (numpy)."""
  _, config, variables, *_ = bundle
  toy = bundle_lib.BundleFormat(
      name='toy', title='Toy constant', model_file='model.npz', runtime='numpy',
      load="model = np.load('model.npz')",
      call="np.broadcast_to(model['bias'], image_a.shape[:3] + (1,))",
      notes='Toy format {format} at size {size_note}.')

  def write_model(path: str, size: int) -> dict:
    np.savez(path, bias=np.float32(-2.0))
    return {'size_note': size}

  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads'])
  sig = bundle_lib.write(str(tmp_path / 'toy'), config, variables, toy, write_model,
                         embeddings=npz)
  assert sig['format'] == 'toy' and sig['file'] == 'model.npz' and sig['size_note'] == 64
  files = sorted(os.listdir(tmp_path / 'toy'))
  assert files == ['README.md', 'config.json', 'model.npz', 'prompts.npz', 'signature.json',
                   'variables'], files
  readme = (tmp_path / 'toy' / 'README.md').read_text()
  assert 'Toy format toy at size 64.' in readme
  check_readme_text(readme, sig, 'numpy', "np.load('model.npz')")
  got = run_readme_code(tmp_path / 'toy', tmp_path, forbid=('segchange_jax', 'flax', 'jax'))
  assert got['logits'].shape == (1, 64, 64, 1) and not got['change'].any()
  with pytest.raises(bundle_lib.BundleError, match='multiple of 32'):
    bundle_lib.write(str(tmp_path / 'toy2'), config, variables, toy, write_model,
                     embeddings=npz, size=48)
  with pytest.raises(atomic.OutputError, match='already exists; pass --overwrite'):
    bundle_lib.write(str(tmp_path / 'toy'), config, variables, toy, write_model,
                     embeddings=npz)
