"""segchange_jax.export: bundle contents, its README run as written, StableHLO round trip
(symbolic batch, uint8 graphs with the prompt table or an embedding, the --raw_inputs float
graph), params reload.

Bounds: the raw graph's logits equal model.apply to 1e-5 x max(1, max|logit|); the uint8
graphs' probabilities to a quarter of that (sigmoid' <= 1/4 carries the same logit bound), and
their mask equals the JAX decision wherever the JAX probability is further than that from the
threshold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
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


def sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


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
  a, b = (rs.randint(0, 256, (3, tiny.SIZE, tiny.SIZE, 3)).astype(np.uint8) for _ in range(2))
  with np.load(npz) as z:
    text = z['embeddings'][[0, 1, 0]]
  ref = predictor.ChangeDetector(config, variables)
  want = ref.predict_logits(imagery.normalize(a), imagery.normalize(b), text)
  return root / 'bundle', config, variables, ref, (a, b, text), want


def predict_with(detector, variables, a, b, text) -> np.ndarray:
  """`detector.predict_logits` with other `variables` (its compiled forward, reused)."""
  saved, detector.variables = detector.variables, variables
  try:
    return np.asarray(detector.predict_logits(a, b, text))
  finally:
    detector.variables = saved


def _close(got, want):
  err = float(np.abs(np.asarray(got) - want).max())
  assert err <= 1e-5 * max(1.0, float(np.abs(want).max())), err
  return err


def check_outputs(probabilities, mask, logits, threshold: float, bound: float) -> float:
  """The uint8 graphs' outputs against the JAX logits (K = 1): probabilities within `bound`,
  the mask equal to the JAX decision wherever that is further than `bound` from the threshold.
  Returns the max probability error."""
  want = sigmoid(logits)
  assert probabilities.shape == logits.shape and probabilities.dtype == np.float32
  assert mask.shape == logits.shape[:3] and mask.dtype == np.uint8
  err = float(np.abs(probabilities - want).max())
  assert err <= bound, (err, bound)
  sure = np.abs(want[..., 0] - threshold) > bound
  np.testing.assert_array_equal(mask[sure], (want[..., 0] > threshold)[sure])
  assert set(np.unique(mask)) <= {0, 1}
  return err


def test_bundle_files_and_signature(bundle):
  out, config, *_ = bundle
  for name in ('variables', 'config.json', 'prompts.npz', 'model.stablehlo',
               'model_embeddings.stablehlo', 'signature.json', 'README.md', 'model_card.json',
               'MODEL_CARD.md'):
    assert os.path.exists(out / name), name
  with open(out / 'signature.json') as f:
    sig = json.load(f)
  assert sig['inputs'] == {'image_a': {'shape': ['b', 64, 64, 3], 'dtype': 'uint8'},
                           'image_b': {'shape': ['b', 64, 64, 3], 'dtype': 'uint8'},
                           'prompt': {'shape': ['b'], 'dtype': 'int32'}}
  assert sig['outputs'] == {'probabilities': {'shape': ['b', 64, 64, 1], 'dtype': 'float32'},
                            'mask': {'shape': ['b', 64, 64], 'dtype': 'uint8'}}
  emb = sig['graphs']['model_embeddings.stablehlo']
  assert emb['kind'] == 'embeddings' and emb['outputs'] == sig['outputs']
  assert emb['inputs']['text_emb'] == {'shape': ['b', 8, tiny.TEXT_DIM], 'dtype': 'float32'}
  assert sig['raw_inputs'] is False and sig['image_normalisation']['in_graph'] is True
  assert sig['decision'] == 'mask = probabilities[..., 0] > threshold'
  assert sig['threshold'] == config.infer.threshold
  assert sig['platforms'] == ['cpu', 'cuda'] and sig['prompts'] == ['roads', 'buildings']
  assert sorted(bundle_lib.load_prompts(str(out))) == ['buildings', 'roads']


def test_exported_batch_3_equals_model_apply(bundle):
  """Both uint8 graphs, batch 3: prompt rows [0, 1, 0] and the same rows as embeddings give the
  JAX model's probabilities and decision; an index outside the table gives NaN."""
  out, config, _, _, (a, b, text), want = bundle
  bound = 0.25 * 1e-5 * max(1.0, float(np.abs(want).max()))
  exp = export.load_exported(str(out))
  assert str(exp.in_avals[0].shape[0]) == 'b'  # symbolic batch survives serialization
  # Rows 0 and 1 of the table, then an index outside it (NaN): one compiled batch size.
  probs, mask = map(np.asarray, exp.call(a, b, np.array([0, 1, 2], np.int32)))
  err = check_outputs(probs[:2], mask[:2], want[:2], config.infer.threshold, bound)
  assert np.isnan(probs[2]).all()
  exp_emb = export.load_exported(str(out), 'model_embeddings.stablehlo')
  probs_e, mask_e = map(np.asarray, exp_emb.call(a, b, text))
  err_e = check_outputs(probs_e, mask_e, want, config.infer.threshold, bound)
  print(f'exported vs model.apply, batch 3, probabilities: prompt index {err:.2e}, '
        f'embeddings {err_e:.2e}')


def test_exported_runs_with_jax_alone_batch_1(bundle, tmp_path):
  out, config, _, _, (a, b, _), want = bundle
  np.savez(tmp_path / 'in.npz', a=a[:1], b=b[:1])
  script = (
      'import sys, jax, numpy as np\n'
      f'path = {str(out / "model.stablehlo")!r}\n'
      'exp = jax.export.deserialize(bytearray(open(path, "rb").read()))\n'
      f'z = np.load({str(tmp_path / "in.npz")!r})\n'
      'p, m = map(np.asarray, exp.call(z["a"], z["b"], np.array([0], np.int32)))\n'
      'assert not [m for m in sys.modules if m.startswith("segchange_jax") or m == "flax"]\n'
      f'np.savez({str(tmp_path / "y.npz")!r}, p=p, m=m)\n')
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / 'y.npz') as z:
    err = check_outputs(z['p'], z['m'], want[:1], config.infer.threshold,
                        0.25 * 1e-5 * max(1.0, float(np.abs(want).max())))
  print(f'exported (jax only) vs model.apply, batch 1, probabilities: {err:.2e}')


def test_raw_inputs_bundle_keeps_the_float_logits_graph(bundle, tmp_path):
  """--raw_inputs: one file, logits = f(image_a, image_b, text_emb) on normalised float images,
  equal to model.apply (batch 3), and its README says how to normalise."""
  out, config, variables, _, (a, b, text), want = bundle
  raw = tmp_path / 'raw'
  sig = export.write_bundle(str(raw), config, variables, embeddings=str(out / 'prompts.npz'),
                            platforms=['cpu'], raw_inputs=True)
  assert sig['raw_inputs'] is True and list(sig['graphs']) == ['model.stablehlo']
  assert not os.path.exists(raw / 'model_embeddings.stablehlo')
  assert sig['inputs']['image_a'] == {'shape': ['b', 64, 64, 3], 'dtype': 'float32'}
  assert sig['outputs'] == {'logits': {'shape': ['b', 64, 64, 1], 'dtype': 'float32'}}
  exp = export.load_exported(str(raw))
  err = _close(exp.call(imagery.normalize(a), imagery.normalize(b), text), want)
  print(f'raw_inputs export vs model.apply, batch 3: {err:.2e}')
  # Its README's code runs in the ONNX and toy tests (the same generator).
  check_raw_readme_text((raw / 'README.md').read_text(), sig, 'jax', 'jax.export.deserialize')


def test_bundle_params_reload_through_change_detector(bundle):
  out, config, variables, ref, (a, b, text), want = bundle
  det = predictor.ChangeDetector.from_checkpoint(str(out))
  assert det.config.to_dict() == config.to_dict()
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                      det.variables, jax.tree.map(np.asarray, variables))
  assert all(jax.tree.leaves(same))
  # Same compiled forward (variables are an argument of the jitted function, so no
  # recompilation) on the reloaded variables: identical logits.
  got = predict_with(ref, det.variables, imagery.normalize(a), imagery.normalize(b), text)
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


# ----------------------------------------------------------------- README helpers (and ONNX's)

def readme_code(readme: str) -> str:
  """The README's python block (there must be exactly one)."""
  blocks = re.findall(r'```python\n(.*?)```', readme, re.S)
  assert len(blocks) == 1, readme
  return blocks[0]


def _blocker(forbid) -> str:
  """Python lines that make the modules `forbid` (and their submodules) unimportable."""
  return (
      'import sys\n'
      'class _Block:\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      f'    if name.split(".")[0] in {tuple(forbid)!r}:\n'
      '      raise ImportError(f"{name} is blocked")\n'
      'sys.meta_path.insert(0, _Block())\n')


def run_example(folder, tmp_path, rgb_a, rgb_b, forbid=('segchange_jax', 'flax')) -> np.ndarray:
  """Runs the README's python block of a uint8 bundle as written, in a fresh python where
  `forbid` cannot be imported, from a folder holding the bundle's files and `rgb_a`, `rgb_b`
  as a.png, b.png; returns the mask.png it wrote."""
  code = readme_code((folder / 'README.md').read_text())
  work = tmp_path / 'example'
  work.mkdir()
  for name in os.listdir(folder):
    os.symlink(folder / name, work / name)
  Image.fromarray(rgb_a).save(work / 'a.png')
  Image.fromarray(rgb_b).save(work / 'b.png')
  proc = subprocess.run([sys.executable, '-c', _blocker(forbid) + code], cwd=work,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.asarray(Image.open(work / 'mask.png'))


def run_raw_readme_code(folder, tmp_path, forbid=('segchange_jax', 'flax')) -> dict:
  """Runs a --raw_inputs README's python block as written, from the bundle folder, in a fresh
  python where `forbid` cannot be imported; returns its images, logits and decision."""
  code = readme_code((folder / 'README.md').read_text())
  code += (f'\nnp.savez({str(tmp_path / "readme_out.npz")!r}, rgb_a=rgb_a, rgb_b=rgb_b, '
           'text_emb=text_emb, logits=logits, change=change)\n')
  proc = subprocess.run([sys.executable, '-c', _blocker(forbid) + code], cwd=folder,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / 'readme_out.npz') as z:
    return dict(z)


def check_readme_text(readme: str, sig: dict, runtime: str, load_words: str) -> None:
  """What a reader of a uint8 bundle needs without the code: runtime and loader, the inputs
  (uint8, normalised in the graph), the prompt table, outputs and the decision rule with the
  config's threshold."""
  assert runtime in readme and load_words in readme
  size = sig['inputs']['image_a']['shape'][1]
  emb_file = [f for f, g in sig['graphs'].items() if g['kind'] == 'embeddings'][0]
  for words in (f'uint8 [b, {size}, {size}, 3]', 'R, G, B', '1 / 255', 'ImageNet mean',
                str([0.485, 0.456, 0.406]), str([0.229, 0.224, 0.225]), 'int32 [b]',
                f"0 = {sig['prompts'][0]!r}", emb_file, 'text_emb', 'prompts.npz',
                f'float32 [b, {size}, {size}, 1]', f'uint8 [b, {size}, {size}]',
                'mask = probabilities[..., 0] > threshold', f"threshold = {sig['threshold']!r}",
                "config's `infer.threshold`", 'a.png', 'mask.png'):
    assert words in readme, words


def check_raw_readme_text(readme: str, sig: dict, runtime: str, load_words: str) -> None:
  """The same for a --raw_inputs bundle: float inputs, how to normalise, logits and rule."""
  assert runtime in readme and load_words in readme and '--raw_inputs' in readme
  size = sig['inputs']['image_a']['shape'][1]
  for words in (f'float32 [b, {size}, {size}, 3]', 'R, G, B', '1 / 255', 'ImageNet mean',
                str([0.485, 0.456, 0.406]), str([0.229, 0.224, 0.225]), 'prompts.npz',
                f"{sig['prompts'][0]!r}", 'sigmoid(logits[..., 0]) > threshold',
                f"threshold = {sig['threshold']!r}", "config's `infer.threshold`"):
    assert words in readme, words


def test_readme_says_how_to_run_the_bundle_and_its_code_runs_with_jax_alone(bundle, tmp_path):
  """The README of a bundle whose config threshold is not the usual 0.5: its text names the
  inputs, the normalisation in the graph and the decision rule, and its python block, run as
  written with jax alone on two PNGs, writes the JAX model's mask for prompt row 0."""
  _, config, variables, ref, (a, b, text), _ = bundle
  config = config.copy_and_resolve_references()
  config.infer.threshold = 0.3
  out = tmp_path / 'b03'
  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads', 'buildings'])
  sig = export.write_bundle(str(out), config, variables, embeddings=npz, platforms=['cpu'])
  readme = (out / 'README.md').read_text()
  check_readme_text(readme, sig, 'jax', 'jax.export.deserialize')
  assert sig['threshold'] == 0.3 and 'threshold = 0.3' in readme
  assert readme_code(readme) == bundle_lib.example_code(export.FORMAT)
  mask = run_example(out, tmp_path, a[0], b[0])
  want = ref.predict_logits(imagery.normalize(a[:1]), imagery.normalize(b[:1]), text[:1])
  p = sigmoid(want[0, ..., 0])
  sure = np.abs(p - 0.3) > 0.25 * 1e-5 * max(1.0, float(np.abs(want).max()))
  assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
  np.testing.assert_array_equal(mask[sure], np.where(p > 0.3, 255, 0)[sure])
  print(f'README example (jax only): mask equals the JAX decision on {sure.mean():.1%} of '
        'pixels (the rest within the bound of the threshold)')


def test_toy_export_format_follows_the_recipe(bundle, tmp_path):
  """CONTRIBUTING recipe "Adding an export format": a BundleFormat plus a model-file writer
  handed to bundle.write give a complete bundle whose README code runs with the toy's runtime
  (numpy) on two PNGs."""
  _, config, variables, *_ = bundle
  toy = bundle_lib.BundleFormat(
      name='toy', title='Toy constant', model_file='model.npz', runtime='numpy', imports=(),
      load="model = np.load('model.npz')",
      call=("(np.full(a.shape[:3] + (1,), model['p']), "
            "np.full(a.shape[:3], model['p'] > 0.5, np.uint8))"),
      raw_call="np.full(image_a.shape[:3] + (1,), model['logit'])",
      notes='Toy format {format} at size {size_note}.')
  seen = []

  def write_model(path: str, graph: bundle_lib.Graph) -> dict:
    seen.append((os.path.basename(path), graph.kind, tuple(graph.inputs), graph.output_names))
    np.savez(path, p=np.float32(0.9), logit=np.float32(-2.0))
    return {'size_note': int(graph.inputs['image_a'].shape[1])}

  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads'])
  sig = bundle_lib.write(str(tmp_path / 'toy'), config, variables, toy, write_model,
                         embeddings=npz)
  assert seen == [('model.npz', 'prompt', ('image_a', 'image_b', 'prompt'),
                   ('probabilities', 'mask')),
                  ('model_embeddings.npz', 'embeddings', ('image_a', 'image_b', 'text_emb'),
                   ('probabilities', 'mask'))]
  assert sig['format'] == 'toy' and sig['file'] == 'model.npz' and sig['size_note'] == 64
  files = sorted(os.listdir(tmp_path / 'toy'))
  assert files == ['MODEL_CARD.md', 'README.md', 'config.json', 'model.npz',
                   'model_card.json', 'model_embeddings.npz', 'prompts.npz', 'signature.json',
                   'variables'], files
  with open(tmp_path / 'toy' / 'model_card.json') as f:  # no checkpoint card: the export's
    card = json.load(f)
  assert card['export']['format'] == 'toy' and card['export']['size'] == 64
  assert card['config']['model']['backbone'] == config.model.backbone and card['data'] is None
  readme = (tmp_path / 'toy' / 'README.md').read_text()
  assert 'Toy format toy at size 64.' in readme
  check_readme_text(readme, sig, 'numpy', "np.load('model.npz')")
  rgb = np.zeros((64, 64, 3), np.uint8)
  mask = run_example(tmp_path / 'toy', tmp_path, rgb, rgb,
                     forbid=('segchange_jax', 'flax', 'jax'))
  assert mask.shape == (64, 64) and (mask == 255).all()
  # --raw_inputs: one graph, the float README.
  sig = bundle_lib.write(str(tmp_path / 'toyraw'), config, variables, toy, write_model,
                         embeddings=npz, raw_inputs=True)
  assert seen[-1] == ('model.npz', 'raw', ('image_a', 'image_b', 'text_emb'), ('logits',))
  check_raw_readme_text((tmp_path / 'toyraw' / 'README.md').read_text(), sig, 'numpy',
                        "np.load('model.npz')")
  got = run_raw_readme_code(tmp_path / 'toyraw', tmp_path,
                            forbid=('segchange_jax', 'flax', 'jax'))
  assert got['logits'].shape == (1, 64, 64, 1) and not got['change'].any()
  with pytest.raises(bundle_lib.BundleError, match='multiple of 32'):
    bundle_lib.write(str(tmp_path / 'toy2'), config, variables, toy, write_model,
                     embeddings=npz, size=48)
  with pytest.raises(atomic.OutputError, match='already exists; pass --overwrite'):
    bundle_lib.write(str(tmp_path / 'toy'), config, variables, toy, write_model,
                     embeddings=npz)


def test_a_size_whose_shapes_overflow_is_one_error_and_nothing_written(bundle, tmp_path):
  """A model file writer that overflows int32 shape arithmetic while tracing (the demo model
  at --size 100000) gives the format's error naming --size; no folder is left."""
  _, config, variables, *_ = bundle

  def write_model(path: str, graph: bundle_lib.Graph) -> dict:
    raise OverflowError('Python int 10000000000 too large to convert to int32')

  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads'])
  with pytest.raises(export.ExportError, match=r'--size 64 is too large to export \(Python int'):
    bundle_lib.write(str(tmp_path / 'b'), config, variables, export.FORMAT, write_model,
                     embeddings=npz, error=export.ExportError)
  assert not (tmp_path / 'b').exists()
