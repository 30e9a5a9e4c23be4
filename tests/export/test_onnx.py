"""ONNX export (segchange_jax.inference.onnx_export) and the onnxruntime backend of infer.

Tolerance: ONNX Runtime must equal the JAX model to 1e-4 x max|logit|. The random-weight test
models are chaotic in float32: re-rounding their weights at 1e-7 moves JAX's own logits by up to
~1e-2 x max|logit| (GroupNorm on near-constant groups), so any other float32 implementation
differs by that much. For them the bound is max(1e-4, 10 x that JAX self-sensitivity), both
printed; a wrong lowering gives O(1) errors. The uint8 graphs return probabilities: the same
logit bound carried through sigmoid (slope <= 1/4), and their mask equals the JAX decision
wherever the JAX probability is further than that from the threshold. The trained demo model
(README command (1)) and Swin-B at 256 px are well conditioned and are held to 1e-4 outright
(slow tests).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import rasterio

onnx = pytest.importorskip('onnx', reason='pip install .[onnx]')
ort = pytest.importorskip('onnxruntime', reason='pip install .[onnx]')

from segchange_jax import atomic  # pylint: disable=g-import-not-at-top
from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
from segchange_jax.inference import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
from tests.eval import tiny  # pylint: disable=g-import-not-at-top
from tests.export import test_export  # pylint: disable=g-import-not-at-top
from tests.infer import scene_helpers as h  # pylint: disable=g-import-not-at-top
from tests.models import test_prompt_readout  # pylint: disable=g-import-not-at-top

ENV = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}


def self_sensitivity(detector, variables, a, b, text, want, eps=1e-7, seed=3) -> float:
  """max |JAX(weights * (1 + eps noise)) - JAX(weights)| / max|logit|."""
  import jax  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(seed)
  noisy = jax.tree.map(lambda x: (x * (1 + eps * rs.randn(*np.shape(x)))).astype(np.float32),
                       variables)
  got = test_export.predict_with(detector, jax.tree.map(np.asarray, noisy), a, b, text)
  return float(np.abs(got - want).max() / np.abs(want).max())


def check_close(got, want, sens) -> float:
  err = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
  assert err <= max(1e-4, 10 * sens), (err, sens)
  return err


def prob_bound(want, sens) -> float:
  """The logit bound of check_close carried through sigmoid (slope <= 1/4)."""
  return 0.25 * float(np.abs(want).max()) * max(1e-4, 10 * sens)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
  """`onnx_export.write_bundle` of the tiny demo-family model (what export --format onnx runs),
  as shipped and with --raw_inputs; uint8 images and their JAX logits."""
  root = tmp_path_factory.mktemp('onnx')
  config = tiny.tiny_config()
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  npz = tiny.write_embeddings(root / 'p.npz', ['roads', config.data.prompt])
  onnx_export.write_bundle(str(root / 'bundle'), config, variables, embeddings=npz)
  onnx_export.write_bundle(str(root / 'raw'), config, variables, embeddings=npz,
                           raw_inputs=True)
  rs = np.random.RandomState(1)
  rgb_a, rgb_b = (rs.randint(0, 256, (3, tiny.SIZE, tiny.SIZE, 3)).astype(np.uint8)
                  for _ in range(2))
  a, b = imagery.normalize(rgb_a), imagery.normalize(rgb_b)
  with np.load(npz) as z:
    text = z['embeddings'][[0, 1, 0]]
  det = predictor.ChangeDetector(config, variables)
  want = np.asarray(det.predict_logits(a, b, text))
  sens = self_sensitivity(det, variables, a, b, text, want)
  return root, config, variables, (a, b, text), want, sens, det, (rgb_a, rgb_b)


def test_bundle_files_and_signature(bundle):
  root, config, *_ = bundle
  out = root / 'bundle'
  for name in ('variables', 'config.json', 'prompts.npz', 'model.onnx', 'model_embeddings.onnx',
               'signature.json', 'README.md'):
    assert os.path.exists(out / name), name
  sig = json.loads((out / 'signature.json').read_text())
  assert sig['format'] == 'onnx' and sig['opset'] >= 16 and sig['raw_inputs'] is False
  assert sig['inputs']['image_a'] == {'shape': ['b', 64, 64, 3], 'dtype': 'uint8'}
  assert sig['inputs']['prompt'] == {'shape': ['b'], 'dtype': 'int32'}
  assert sig['outputs']['probabilities']['shape'] == ['b', 64, 64, 1]
  assert sig['outputs']['mask'] == {'shape': ['b', 64, 64], 'dtype': 'uint8'}
  assert sig['graphs']['model_embeddings.onnx']['inputs']['text_emb']['shape'] == [
      'b', 8, tiny.TEXT_DIM]
  elem = onnx.TensorProto
  for name, third, third_type in (('model.onnx', 'prompt', elem.INT32),
                                  ('model_embeddings.onnx', 'text_emb', elem.FLOAT)):
    model = onnx.load(str(out / name))
    onnx.checker.check_model(model)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types == {'image_a': elem.UINT8, 'image_b': elem.UINT8, third: third_type}, name
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['b', 64, 64, 3]
    assert [o.name for o in model.graph.output] == ['probabilities', 'mask']
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta['segchange.prompts']) == ['roads', config.data.prompt]
    assert float(meta['segchange.threshold']) == config.infer.threshold
  raw = json.loads((root / 'raw' / 'signature.json').read_text())
  assert raw['raw_inputs'] is True and list(raw['graphs']) == ['model.onnx']
  assert raw['inputs']['image_a'] == {'shape': ['b', 64, 64, 3], 'dtype': 'float32'}
  assert raw['outputs'] == {'logits': {'shape': ['b', 64, 64, 1], 'dtype': 'float32'}}
  assert not os.path.exists(root / 'raw' / 'model_embeddings.onnx')


def test_onnxruntime_equals_jax_batch_1_and_3_one_file(bundle):
  """The --raw_inputs graph: logits for normalised float images, as before."""
  root, _, _, (a, b, text), want, sens, *_ = bundle
  det = onnx_runtime.OnnxDetector(str(root / 'raw' / 'model.onnx'))
  assert det.kind == bundle_lib.RAW
  for n in (1, 3):
    got = det.predict_logits(a[:n], b[:n], text[:n])
    assert got.shape == (n, 64, 64, 1)
    err = check_close(got, want[:n], sens)
    print(f'onnxruntime vs jax (raw_inputs graph), batch {n}: {err:.2e} (jax self-sensitivity '
          f'{sens:.2e})')


def test_uint8_graphs_equal_jax_batch_1_and_3(bundle):
  """model.onnx (prompt rows [0, 1, 0]) and model_embeddings.onnx (the same rows as
  embeddings) on uint8 images: the JAX model's probabilities and decision; an index outside
  the table gives NaN."""
  root, config, _, (_, _, text), want, sens, _, (rgb_a, rgb_b) = bundle
  bound = prob_bound(want, sens)
  for name, third in (('model.onnx', np.array([0, 1, 0], np.int32)),
                      ('model_embeddings.onnx', text)):
    det = onnx_runtime.OnnxDetector(str(root / 'bundle' / name))
    for n in (1, 3):
      probs, mask = det.run(rgb_a[:n], rgb_b[:n], third[:n])
      err = test_export.check_outputs(probs, mask, want[:n], config.infer.threshold, bound)
      print(f'onnxruntime vs jax ({name}), batch {n}: probabilities {err:.2e} (bound '
            f'{bound:.2e})')
  det = onnx_runtime.OnnxDetector(str(root / 'bundle' / 'model.onnx'))
  probs, _ = det.run(rgb_a[:2], rgb_b[:2], np.array([2, -1], np.int32))
  assert np.isnan(probs).all()


def test_infer_backend_onnxruntime_equals_jax_backend(bundle, tmp_path):
  """The bundle as shipped through the windowed engine equals the JAX backend: a prompt of the
  table runs model.onnx with its index; --embeddings (any prompt) runs model_embeddings.onnx."""
  root, config, _, _, _, sens, det, _ = bundle
  pa, pb = h.pair_arrays(100, 90)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', pa), h.write_tif(tmp_path / 'b.tif', pb)
  # batch 3: the fixture's JAX detector is already compiled for it.
  kw = dict(window=64, overlap=16, batch=3, probabilities=True, progress=False)
  emb = prompts.embed_one(config, config.data.prompt, npz=str(root / 'p.npz'))
  jax_out = str(tmp_path / 'jax.tif')
  pipeline.run_inference(a_path, b_path, jax_out, None, predictor_factory=lambda: pipeline.Model(
      pipeline.detector_predictor(det, emb), config), **kw)
  with rasterio.open(jax_out) as x:
    p_jax = x.read(1)
  for name, extra in (('model.onnx', {}), ('model_embeddings.onnx',
                                           dict(embeddings=str(root / 'p.npz')))):
    ort_out = str(tmp_path / f'{name}.tif')
    # No text encoder: the prompt's index, or its embedding from the npz.
    pipeline.run_inference(a_path, b_path, ort_out, None, predictor_factory=lambda: (
        onnx_runtime.load_model(str(root / 'bundle'), None, **extra)), **kw)
    with rasterio.open(ort_out) as y:
      p_ort = y.read(1)
      assert y.tags()['BACKEND'] == 'onnxruntime' and y.tags()['CHECKPOINT'].endswith(name)
    # sigmoid' <= 1/4, and the logits of this model stay within ~2.
    err = float(np.abs(p_jax - p_ort).max())
    print(f'scene probabilities, onnxruntime ({name}) vs jax: {err:.2e}')
    assert err <= 0.25 * 2.5 * max(1e-4, 10 * sens)


def test_readme_example_runs_with_onnxruntime_numpy_and_pil_alone(bundle, tmp_path):
  """The ONNX bundle's README: its text states inputs, normalisation and decision rule; its
  python block is onnx_export.README_EXAMPLE (<= 20 lines, the project README's example,
  byte for byte), and run as written in a python where segchange_jax, flax and
  jax cannot be imported, on two PNGs, it writes the JAX model's mask."""
  root, config, _, _, want, sens, _, (rgb_a, rgb_b) = bundle
  out = root / 'bundle'
  sig = json.loads((out / 'signature.json').read_text())
  readme = (out / 'README.md').read_text()
  test_export.check_readme_text(readme, sig, 'onnxruntime', 'ort.InferenceSession')
  assert f'opset {sig["opset"]}' in readme and '--backend onnxruntime' in readme
  code = test_export.readme_code(readme)
  assert code == onnx_export.README_EXAMPLE and len(code.splitlines()) <= 20
  imports = set(re.findall(r'^(?:import|from) (\w+)', code, re.M))
  assert imports == {'numpy', 'onnxruntime', 'PIL'}, imports
  project = re.findall(r'```python\n(.*?)```', (tiny.REPO / 'README.md').read_text(), re.S)
  copies = [c for c in project if "ort.InferenceSession('model.onnx'" in c]
  assert copies == [code], 'README.md must hold onnx_export.README_EXAMPLE once, byte for byte'
  mask = test_export.run_example(out, tmp_path, rgb_a[0], rgb_b[0],
                                 forbid=('segchange_jax', 'flax', 'jax'))
  p = 1 / (1 + np.exp(-want[0, ..., 0].astype(np.float64)))
  thr = config.infer.threshold
  sure = np.abs(p - thr) > prob_bound(want, sens)
  np.testing.assert_array_equal(mask[sure], np.where(p > thr, 255, 0)[sure])
  print(f'README example (onnxruntime + PIL only): mask equals the JAX decision on '
        f'{sure.mean():.1%} of pixels (the rest within the bound of the threshold)')


def test_raw_readme_code_runs_with_onnxruntime_alone(bundle, tmp_path):
  """The --raw_inputs bundle's README: normalisation and decision rule in the text, and its
  python block, run as written from the folder with onnxruntime and numpy alone (no jax),
  gives the JAX model's logits for its images and prompt."""
  root, _, _, _, _, sens, det, _ = bundle
  out = root / 'raw'
  sig = json.loads((out / 'signature.json').read_text())
  readme = (out / 'README.md').read_text()
  test_export.check_raw_readme_text(readme, sig, 'onnxruntime', 'ort.InferenceSession')
  got = test_export.run_raw_readme_code(out, tmp_path, forbid=('segchange_jax', 'flax', 'jax'))
  want = np.asarray(det.predict_logits(imagery.normalize(got['rgb_a'][None]),
                                       imagery.normalize(got['rgb_b'][None]), got['text_emb']))
  err = check_close(got['logits'], want, sens)
  print(f'raw README code (onnxruntime only) vs jax: {err:.2e} (jax self-sensitivity '
        f'{sens:.2e})')


def test_errors(bundle, tmp_path):
  root, config, variables, *_ = bundle
  with pytest.raises(onnx_export.OnnxExportError, match='multiple of 32'):
    onnx_export.convert(config, variables, 70)
  with pytest.raises(atomic.OutputError, match='already exists; pass --overwrite'):
    onnx_export.write_bundle(str(root / 'bundle'), config, variables,
                             embeddings=str(root / 'p.npz'))
  with pytest.raises(onnx_runtime.OnnxBackendError, match='--onnx FILE'):
    onnx_runtime.find_model(str(tmp_path), None)
  with pytest.raises(onnx_runtime.OnnxBackendError,
                     match='--window 128: .* takes 64 px windows only'):
    onnx_runtime.load_model(str(root / 'bundle'), None, window=128)
  det = onnx_runtime.OnnxDetector(str(root / 'raw' / 'model.onnx'))
  with pytest.raises(onnx_runtime.OnnxBackendError, match='64 px windows'):
    det.predict_logits(np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 32, 32, 3), np.float32),
                       np.zeros((1, 8, tiny.TEXT_DIM), np.float32))
  det = onnx_runtime.OnnxDetector(str(root / 'bundle' / 'model.onnx'))
  with pytest.raises(onnx_runtime.OnnxBackendError, match='--raw_inputs'):
    det.predict_logits(np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 64, 64, 3), np.float32),
                       np.zeros((1, 8, tiny.TEXT_DIM), np.float32))
  # A prompt outside the table with no embeddings graph beside model.onnx.
  lone = tmp_path / 'lone'
  lone.mkdir()
  os.symlink(root / 'bundle' / 'model.onnx', lone / 'model.onnx')
  os.symlink(root / 'bundle' / 'config.json', lone / 'config.json')
  with pytest.raises(onnx_runtime.OnnxBackendError,
                     match="'elsewhere' is not in the prompt table .*model_embeddings.onnx"):
    onnx_runtime.load_model(str(lone), None, prompt='elsewhere')


@pytest.mark.slow
def test_export_cli_format_onnx(bundle, tmp_path):
  """python -m segchange_jax.export --format onnx writes the same graphs as write_bundle, and
  infer --backend onnxruntime runs them on the command line."""
  root, *_ = bundle
  proc = subprocess.run(
      [sys.executable, '-m', 'segchange_jax.export', '--format', 'onnx', '--checkpoint',
       str(root / 'ckpt'), '--out', str(tmp_path / 'cli'), '--embeddings', str(root / 'p.npz')],
      cwd=tiny.REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'model.onnx' in proc.stdout
  for name in ('model.onnx', 'model_embeddings.onnx'):
    got = onnx.load(str(tmp_path / 'cli' / name))
    want = onnx.load(str(root / 'bundle' / name))
    assert [n.op_type for n in got.graph.node] == [n.op_type for n in want.graph.node]
    for x, y in zip(got.graph.initializer, want.graph.initializer):
      np.testing.assert_array_equal(onnx.numpy_helper.to_array(x),
                                    onnx.numpy_helper.to_array(y))
  # infer --backend onnxruntime on the command line (flags, config and prompt from the folder).
  pa, pb = h.pair_arrays(100, 90)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', pa), h.write_tif(tmp_path / 'b.tif', pb)
  proc = subprocess.run(
      [sys.executable, '-m', 'segchange_jax.infer', '--backend', 'onnxruntime', '--checkpoint',
       str(tmp_path / 'cli'), '--a', a_path, '--b', b_path, '--out', str(tmp_path / 'm.tif'),
       '--overlap', '16', '--noprogress'],
      cwd=tiny.REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with rasterio.open(tmp_path / 'm.tif') as ds:
    assert ds.tags()['BACKEND'] == 'onnxruntime' and ds.tags()['WINDOW'] == '64'


@pytest.mark.slow
def test_swin_b_256_onnxruntime_equals_jax(tmp_path):
  """configs/dvcd.py (Swin-B, upstream widths) at 256 px, random weights; batch 1 and 3 (the
  float graph, `convert`'s default)."""
  from segchange_jax import config_lib  # pylint: disable=g-import-not-at-top
  size = 256
  config = config_lib.load_config(str(tiny.REPO / 'configs' / 'dvcd.py'),
                                  [f'model.img_size={size}'])
  variables = tiny.random_variables(config, seed=0, size=size)
  proto, _ = onnx_export.convert(config, variables, size)
  path = str(tmp_path / 'swinb.onnx')
  nbytes = onnx_export.save(proto, path)
  del proto
  rs = np.random.RandomState(1)
  a, b = (rs.randn(3, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(3, 8, int(config.text.dim)).astype(np.float32)
  want = np.asarray(predictor.ChangeDetector(config, variables).predict_logits(a, b, text))
  sess = onnx_runtime.OnnxDetector(path)
  for n in (1, 3):
    # This model is well conditioned: the plain 1e-4 bound, no allowance.
    err = check_close(sess.predict_logits(a[:n], b[:n], text[:n]), want[:n], 0.0)
    print(f'Swin-B 256 px ({nbytes / 2**20:.0f} MiB): onnxruntime vs jax, batch {n}: {err:.2e}')


@pytest.mark.slow
def test_trained_demo_model_onnxruntime_equals_jax_within_1e4(tmp_path):
  """README command (1)'s model (configs/demo.py, trained to the end), exported with
  --format onnx: ONNX Runtime equals JAX on demo test pairs, batch 1 and 3, with no allowance
  (a trained model is well conditioned): the --raw_inputs graph's logits to 1e-4 x max|logit|,
  the shipped graph's probabilities to a quarter of that."""
  import cv2  # pylint: disable=g-import-not-at-top

  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'segchange_jax.train', '--config', 'configs/demo.py', '--workdir',
       str(run), f'--config.data.source_root={tmp_path / "raw"}',
       f'--config.data.shards_dir={tmp_path / "shards"}'],
      cwd=tiny.REPO, env=ENV, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print('demo run test metrics:', (run / 'eval_test.json').read_text()[:400])
  config, variables = checkpoints.load_checkpoint(str(run / 'checkpoints'))
  onnx_export.write_bundle(str(tmp_path / 'bundle'), config, variables)
  onnx_export.write_bundle(str(tmp_path / 'raw_bundle'), config, variables, raw_inputs=True)
  names = sorted(os.listdir(tmp_path / 'raw' / 'test' / 'A'))[:3]
  read = lambda d: np.stack([cv2.imread(str(tmp_path / 'raw' / 'test' / d / n))[..., ::-1]
                             for n in names])
  rgb_a, rgb_b = read('A'), read('B')
  a, b = imagery.normalize(rgb_a), imagery.normalize(rgb_b)
  text = np.repeat(prompts.embed_one(config, config.data.prompt), 3, axis=0)
  want = np.asarray(predictor.ChangeDetector(config, variables).predict_logits(a, b, text))
  raw = onnx_runtime.OnnxDetector(str(tmp_path / 'raw_bundle' / 'model.onnx'))
  shipped = onnx_runtime.OnnxDetector(str(tmp_path / 'bundle' / 'model.onnx'))
  for n in (1, 3):
    err = check_close(raw.predict_logits(a[:n], b[:n], text[:n]), want[:n], 0.0)
    probs, mask = shipped.run(rgb_a[:n], rgb_b[:n], np.zeros(n, np.int32))
    err_p = test_export.check_outputs(probs, mask, want[:n], config.infer.threshold,
                                      prob_bound(want, 0.0))
    print(f'trained demo model: onnxruntime vs jax, batch {n}: logits {err:.2e}, '
          f'probabilities {err_p:.2e}')


@pytest.mark.slow   # 20-40 s each; the default run exports the same ops in the tiny model's bundle
@pytest.mark.parametrize('conditioning', ['film_head', 'dynamic_head'])
def test_prompt_film_and_signed_difference_export_and_match_jax(tmp_path, conditioning):
  """configs/demo_prompts.py's additions (film_head or dynamic_head, signed_difference='scales'),
  with their zero-started weights moved so that they act: the ONNX graph equals JAX."""
  import jax  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config()
  config.model.prompt_conditioning = conditioning
  config.model.signed_difference = 'scales'
  variables = jax.tree.map(np.array, tiny.save_checkpoint(tmp_path / 'ckpt', config))
  rs = np.random.RandomState(0)
  head = variables['params']['mask_head']
  moved = [head[module][layer] for module, layers in test_prompt_readout.ZERO_STARTED.items()
           if module in head for layer in layers]
  moved += variables['params']['signed_difference'].values()
  for block in moved:
    for name, value in block.items():
      block[name] = (rs.randn(*value.shape) / 3).astype(np.float32)
  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['roads', config.data.prompt])
  onnx_export.write_bundle(str(tmp_path / 'bundle'), config, variables, embeddings=npz,
                           raw_inputs=True)
  a, b = (imagery.normalize(rs.randint(0, 256, (2, tiny.SIZE, tiny.SIZE, 3)).astype(np.uint8))
          for _ in range(2))
  with np.load(npz) as z:
    text = z['embeddings'][[0, 1]]
  det = predictor.ChangeDetector(config, variables)
  want = np.asarray(det.predict_logits(a, b, text))
  zeroed = jax.tree.map(np.array, variables)
  for block in zeroed['params']['signed_difference'].values():
    block['kernel'][:] = 0
  assert np.abs(np.asarray(predictor.ChangeDetector(config, zeroed).predict_logits(
      a, b, text)) - want).max() > 1e-2   # the moved weights act
  got = onnx_runtime.OnnxDetector(str(tmp_path / 'bundle' / 'model.onnx')).predict_logits(
      a, b, text)
  check_close(got, want, self_sensitivity(det, variables, a, b, text, want))
