"""Export with a prompt batch (`--prompt_batch P`): StableHLO and ONNX graphs that answer P
prompts per image pair in one pass, [b, P, T, L] -> [b, S, S, P], equal to model.apply with the
same [B, P, T, L] text; the bundle records P; the onnxruntime backend runs 1..P prompts (pads a
shorter list, drops the padding's outputs) and refuses more with one error naming the
--prompt_batch to re-export with.

Bounds as in test_export.py (StableHLO: logits to 1e-5 x max(1, max|logit|), probabilities to a
quarter of that) and test_onnx.py (ONNX Runtime: max(1e-4, 10 x the JAX self-sensitivity) x
max|logit|, probabilities a quarter of that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segchange_jax.data import imagery
from segchange_jax.inference import bundle as bundle_lib
from segchange_jax.inference import export
from segchange_jax.inference import predictor
from tests.eval import tiny
from tests.export import test_export

P = 3
PROMPTS = ['roads', 'buildings', 'mounds']


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def check_multi(probabilities, mask, logits, threshold: float, bound: float) -> float:
  """P-prompt uint8 graph outputs ([B, S, S, P] each, K = 1) against JAX logits [B, S, S, P]:
  probabilities within `bound`, the mask equal to the JAX decision wherever that is further than
  `bound` from the threshold. Returns the max probability error."""
  want = _sigmoid(logits)
  assert probabilities.shape == logits.shape and probabilities.dtype == np.float32
  assert mask.shape == logits.shape and mask.dtype == np.uint8
  err = float(np.abs(probabilities - want).max())
  assert err <= bound, (err, bound)
  sure = np.abs(want - threshold) > bound
  np.testing.assert_array_equal(mask[sure], (want > threshold)[sure])
  return err


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The tiny model, a 3-prompt table, test_onnx.py's uint8 pairs (batch 3) and the JAX logits
  of prompt rows [[0, 1, 2], [2, 0, 1], [1, 2, 0]] with text [3, P, T, L] (one model pass)."""
  root = tmp_path_factory.mktemp('prompt_batch')
  config = tiny.tiny_config()
  variables = tiny.save_checkpoint(root / 'ckpt', config)
  npz = tiny.write_embeddings(root / 'p.npz', PROMPTS)
  with np.load(npz) as z:
    table = z['embeddings']
  rs = np.random.RandomState(1)
  rgb_a, rgb_b = (rs.randint(0, 256, (3, tiny.SIZE, tiny.SIZE, 3)).astype(np.uint8)
                  for _ in range(2))
  rows = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0]], np.int32)
  det = predictor.ChangeDetector(config, variables)
  want = np.asarray(det.predict_logits(imagery.normalize(rgb_a), imagery.normalize(rgb_b),
                                       table[rows]))
  assert want.shape == (3, tiny.SIZE, tiny.SIZE, P)
  return root, config, variables, npz, table, (rgb_a, rgb_b), rows, det, want


def test_bundle_records_the_prompt_batch(setup, tmp_path):
  """bundle.write with prompt_batch hands every format P-prompt graphs and records P in
  signature.json, the model card and the README (no model file is traced here)."""
  _, config, variables, npz, *_ = setup
  seen = []

  def write_model(path: str, graph: bundle_lib.Graph) -> dict:
    seen.append((os.path.basename(path), graph.prompt_batch,
                 {k: tuple(str(d) for d in v.shape) for k, v in graph.inputs.items()}))
    with open(path, 'wb') as f:
      f.write(b'toy')
    return {'platforms': ['cpu'], 'jax_version': 'n/a'}  # what FORMAT's README notes name

  sig = bundle_lib.write(str(tmp_path / 'toy'), config, variables, export.FORMAT, write_model,
                         embeddings=npz, prompt_batch=P)
  image = ('b', '64', '64', '3')
  assert seen == [('model.stablehlo', P, {'image_a': image, 'image_b': image,
                                          'prompt': ('b', str(P))}),
                  ('model_embeddings.stablehlo', P, {'image_a': image, 'image_b': image,
                                                     'text_emb': ('b', str(P), '8', '32')})]
  assert sig['prompt_batch'] == P and sig['prompts'] == PROMPTS
  assert sig['outputs'] == {'probabilities': {'shape': ['b', 64, 64, P], 'dtype': 'float32'},
                            'mask': {'shape': ['b', 64, 64, P], 'dtype': 'uint8'}}
  with open(tmp_path / 'toy' / 'model_card.json') as f:
    assert json.load(f)['export']['prompt_batch'] == P
  readme = (tmp_path / 'toy' / 'README.md').read_text()
  for words in (f'--prompt_batch {P}', f'int32 [b, {P}]', f'float32 [b, {P}, 8, {tiny.TEXT_DIM}]',
                f'float32 [b, 64, 64, {P}]', f'uint8 [b, 64, 64, {P}]', 'mask_<p>.png',
                'mask = probabilities > threshold'):
    assert words in readme, words


def test_stablehlo_prompt_index_graph_equals_model_apply(setup):
  """The prompt-index graph with a prompt batch (export_forward, no bundle), batch 3 x 3
  prompts: the JAX model's probabilities and decision for text [B, P, T, L]."""
  _, config, variables, _, table, (rgb_a, rgb_b), rows, _, want = setup
  exp = export.export_forward(config, variables, tiny.SIZE, ['cpu'], kind=bundle_lib.PROMPT,
                              table=table, prompt_batch=P)
  probs, mask = map(np.asarray, exp.call(rgb_a, rgb_b, rows))
  bound = 0.25 * 1e-5 * max(1.0, float(np.abs(want).max()))
  err = check_multi(probs, mask, want, config.infer.threshold, bound)
  print(f'StableHLO prompt-index graph, prompt batch {P}, vs model.apply, batch 3: probabilities '
        f'max abs error {err:.2e}')


@pytest.mark.slow
def test_stablehlo_prompt_batch_bundle_equals_model_apply(setup, tmp_path):
  """The bundle's two uint8 graphs, batch 3 x 3 prompts: the JAX model's [B, P, T, L]
  outputs; the bundle records P in signature.json, the model card and README."""
  _, config, variables, npz, table, (rgb_a, rgb_b), rows, _, want = setup
  sig = export.write_bundle(str(tmp_path / 'b'), config, variables, embeddings=npz,
                            platforms=['cpu'], prompt_batch=P)
  assert sig['prompt_batch'] == P and sig['prompts'] == PROMPTS
  assert sig['inputs']['prompt'] == {'shape': ['b', P], 'dtype': 'int32'}
  assert sig['outputs'] == {'probabilities': {'shape': ['b', 64, 64, P], 'dtype': 'float32'},
                            'mask': {'shape': ['b', 64, 64, P], 'dtype': 'uint8'}}
  emb_io = sig['graphs']['model_embeddings.stablehlo']['inputs']['text_emb']
  assert emb_io == {'shape': ['b', P, 8, tiny.TEXT_DIM], 'dtype': 'float32'}
  assert sig['decision'] == 'mask = probabilities > threshold'
  with open(tmp_path / 'b' / 'model_card.json') as f:
    assert json.load(f)['export']['prompt_batch'] == P
  readme = (tmp_path / 'b' / 'README.md').read_text()
  for words in (f'--prompt_batch {P}', f'int32 [b, {P}]', f'float32 [b, {P}, 8, {tiny.TEXT_DIM}]',
                f'float32 [b, 64, 64, {P}]', f'uint8 [b, 64, 64, {P}]', 'mask_<p>.png'):
    assert words in readme, words
  thr = config.infer.threshold
  bound = 0.25 * 1e-5 * max(1.0, float(np.abs(want).max()))
  exp = export.load_exported(str(tmp_path / 'b'))
  assert str(exp.in_avals[2].shape[0]) == 'b' and exp.in_avals[2].shape[1] == P
  probs, mask = map(np.asarray, exp.call(rgb_a, rgb_b, rows))
  err = check_multi(probs, mask, want, thr, bound)
  exp_emb = export.load_exported(str(tmp_path / 'b'), 'model_embeddings.stablehlo')
  probs_e, mask_e = map(np.asarray, exp_emb.call(rgb_a, rgb_b, table[rows]))
  err_e = check_multi(probs_e, mask_e, want, thr, bound)
  print(f'StableHLO --prompt_batch {P} vs model.apply, batch 3: max abs error probabilities '
        f'{err:.2e} (prompt index), {err_e:.2e} (embeddings)')


@pytest.mark.slow
def test_stablehlo_raw_prompt_batch_equals_model_apply(setup):
  """The --raw_inputs float graph with a prompt batch: logits [b, S, S, P]."""
  _, config, variables, _, table, (rgb_a, rgb_b), rows, _, want = setup
  raw = export.export_forward(config, variables, tiny.SIZE, ['cpu'], prompt_batch=P)
  logits = np.asarray(raw.call(imagery.normalize(rgb_a), imagery.normalize(rgb_b), table[rows]))
  err = float(np.abs(logits - want).max())
  assert err <= 1e-5 * max(1.0, float(np.abs(want).max())), err
  print(f'StableHLO --raw_inputs --prompt_batch {P} vs model.apply, batch 3: logits max abs '
        f'error {err:.2e}')


@pytest.mark.slow
def test_stablehlo_readme_code_runs_with_jax_alone(setup, tmp_path):
  """The README block of a --prompt_batch bundle, run as written with jax alone on two PNGs,
  writes one mask per prompt of the table, each the JAX model's decision for that prompt."""
  _, config, variables, npz, table, (rgb_a, rgb_b), _, det, _ = setup
  npz2 = tiny.write_embeddings(tmp_path / 'p2.npz', PROMPTS[:2])  # 2 prompts, P = 3: padded
  export.write_bundle(str(tmp_path / 'b'), config, variables, embeddings=npz2,
                      platforms=['cpu'], prompt_batch=P)
  with np.load(npz2) as z:
    text = z['embeddings'][[0, 1, 0]][None]
  want = np.asarray(det.predict_logits(imagery.normalize(rgb_a[:1]),
                                       imagery.normalize(rgb_b[:1]), text))
  work = tmp_path / 'b'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(rgb_a[0]).save(work / 'a.png')
  Image.fromarray(rgb_b[0]).save(work / 'b.png')
  code = test_export.readme_code((work / 'README.md').read_text())
  proc = subprocess.run([sys.executable, '-c', test_export._blocker(('segchange_jax', 'flax'))  # pylint: disable=protected-access
                         + code], cwd=work, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (work / 'mask_2.png').exists()  # the padding's output is not written
  thr = config.infer.threshold
  bound = 0.25 * 1e-5 * max(1.0, float(np.abs(want).max()))
  for p in range(2):
    mask = np.asarray(Image.open(work / f'mask_{p}.png'))
    prob = _sigmoid(want[0, ..., p])
    sure = np.abs(prob - thr) > bound
    np.testing.assert_array_equal(mask[sure], np.where(prob > thr, 255, 0)[sure])


def test_prompt_batch_errors(setup, tmp_path):
  _, config, variables, npz, *_ = setup
  for bad, words in ((0, 'must be >= 1'), (-2, 'must be >= 1'), (2.5, 'must be an integer')):
    with pytest.raises(export.ExportError, match=f'--prompt_batch={bad}.*{words}'):
      export.write_bundle(str(tmp_path / 'x'), config, variables, embeddings=npz,
                          prompt_batch=bad)
    assert not (tmp_path / 'x').exists()
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'segchange_jax.export', '--checkpoint',
                         str(tmp_path / 'no_ckpt'), '--out', str(tmp_path / 'o'),
                         '--prompt_batch', '0'], cwd=tiny.REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines == ['error: --prompt_batch=0 must be >= 1 (prompts per image pair; leave it out '
                   'for the one-prompt graphs)'], lines


def test_single_prompt_graph_specs_unchanged(setup):
  """Without prompt_batch the graphs and their signature are those of a one-prompt export."""
  _, config, *_ = setup
  for kind, third in ((bundle_lib.PROMPT, ('b',)), (bundle_lib.EMBEDDINGS, ('b', '8', '32')),
                      (bundle_lib.RAW, ('b', '8', '32'))):
    specs = bundle_lib.graph_specs(config, 64, kind)
    assert tuple(str(d) for d in list(specs.values())[2].shape) == third
  io = bundle_lib._graph_io(bundle_lib.PROMPT, 64, 8, 32, 1)  # pylint: disable=protected-access
  assert io['outputs'] == {'probabilities': {'shape': ['b', 64, 64, 1], 'dtype': 'float32'},
                           'mask': {'shape': ['b', 64, 64], 'dtype': 'uint8'}}


# ------------------------------------------------------------------------------ ONNX Runtime

@pytest.fixture(scope='module')
def onnx_bundle(setup, tmp_path_factory):
  """`export --format onnx --prompt_batch 3` of the tiny model (both uint8 graphs)."""
  pytest.importorskip('onnxruntime', reason='pip install .[onnx]')
  from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  _, config, variables, npz, *_ = setup
  out = tmp_path_factory.mktemp('onnx_pb') / 'bundle'
  sig = onnx_export.write_bundle(str(out), config, variables, embeddings=npz, prompt_batch=P)
  return out, sig


def _ort_bound(setup):
  """test_onnx.py's probability bound for these logits (JAX self-sensitivity allowance)."""
  from tests.export import test_onnx  # pylint: disable=g-import-not-at-top
  _, _, variables, _, table, (rgb_a, rgb_b), rows, det, want = setup
  sens = test_onnx.self_sensitivity(det, variables, imagery.normalize(rgb_a),
                                    imagery.normalize(rgb_b), table[rows], want)
  return test_onnx.prob_bound(want, sens), sens


def test_onnx_prompt_batch_equals_model_apply(setup, onnx_bundle):
  """model.onnx (rows [b, 3]) and model_embeddings.onnx ([b, 3, T, L]), batch 3: the JAX model's
  [B, P, T, L] probabilities and decision; the files say P in their inputs and metadata."""
  import onnx  # pylint: disable=g-import-not-at-top

  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  _, config, _, _, table, (rgb_a, rgb_b), rows, _, want = setup
  out, sig = onnx_bundle
  assert sig['prompt_batch'] == P and sig['inputs']['prompt']['shape'] == ['b', P]
  assert sig['outputs']['probabilities']['shape'] == ['b', 64, 64, P]
  meta = {p.key: p.value for p in onnx.load(str(out / 'model.onnx')).metadata_props}
  assert meta['segchange.prompt_batch'] == str(P)
  bound, sens = _ort_bound(setup)
  errs = []
  for name, third in (('model.onnx', rows), ('model_embeddings.onnx', table[rows])):
    det = onnx_runtime.OnnxDetector(str(out / name))
    assert det.prompt_batch == P and det.classes == 1
    probs, mask = det.run(rgb_a, rgb_b, third)
    errs.append(check_multi(probs, mask, want, config.infer.threshold, bound))
  print(f'ONNX Runtime --prompt_batch {P} vs model.apply, batch 3: max abs error probabilities '
        f'{errs[0]:.2e} (prompt index), {errs[1]:.2e} (embeddings); bound {bound:.2e} (JAX '
        f'self-sensitivity {sens:.2e})')


def test_onnxruntime_runs_fewer_prompts_padded_and_refuses_more(setup, onnx_bundle):
  """2 of P = 3 prompts (padded, padding dropped), one prompt, and `load_model(prompts=...)`
  give the JAX model's numbers for those prompts; 4 prompts is one error naming
  --prompt_batch 4, before any text is encoded."""
  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  _, config, _, npz, table, (rgb_a, rgb_b), rows, _, want = setup
  out, _ = onnx_bundle
  bound, _ = _ort_bound(setup)
  # Rows [0, 1, 2] for both pairs: pair 0 of `want`; [2, 0] are its prompt slots 2 and 0.
  p_all = _sigmoid(want[:1])
  for name, arg in (('model.onnx', dict(prompt_index=[2, 0])),
                    ('model_embeddings.onnx', dict(text_emb=table[[2, 0]]))):
    det = onnx_runtime.OnnxDetector(str(out / name))
    got = det.predictor(**arg)(rgb_a[:1], rgb_b[:1])
    assert got.shape == (1, 64, 64, 2)
    assert float(np.abs(got - p_all[..., [2, 0]]).max()) <= bound
    one = det.predictor(**{k: (v[1] if k == 'prompt_index' else v[1:2])
                           for k, v in arg.items()})(rgb_a[:1], rgb_b[:1])
    assert one.shape == (1, 64, 64)  # one prompt: the single-prompt engine layout
    assert float(np.abs(one - p_all[..., 0]).max()) <= bound
  model = onnx_runtime.load_model(str(out), None, prompts=['mounds', 'roads'])
  assert model.tags['PROMPTS'] == json.dumps(['mounds', 'roads'])
  got = model.predict(rgb_a[:1], rgb_b[:1])
  assert float(np.abs(got - p_all[..., [2, 0]]).max()) <= bound
  # Prompts outside the table: model_embeddings.onnx with embeddings from the npz.
  model = onnx_runtime.load_model(str(out), None, prompts=['roads', 'buildings'], embeddings=npz)
  assert model.tags['CHECKPOINT'].endswith('model_embeddings.onnx')
  got = model.predict(rgb_a[:1], rgb_b[:1])
  assert float(np.abs(got - p_all[..., [0, 1]]).max()) <= bound
  four = ['roads', 'buildings', 'mounds', 'lakes']
  want_msg = f'exported for {P} prompts, got 4: re-export with --prompt_batch 4'
  with pytest.raises(onnx_runtime.OnnxBackendError, match=want_msg):
    onnx_runtime.load_model(str(out), None, prompts=four)  # 'lakes' is in no table: no encoder
  det = onnx_runtime.OnnxDetector(str(out / 'model.onnx'))
  with pytest.raises(onnx_runtime.OnnxBackendError, match=want_msg):
    det.predictor(prompt_index=[0, 1, 2, 0])
  with pytest.raises(onnx_runtime.OnnxBackendError, match=want_msg):
    det.run_prompts(rgb_a[:1], rgb_b[:1], np.zeros((1, 4), np.int32))
  with pytest.raises(onnx_runtime.OnnxBackendError, match="prompts\\[1\\]='roads ' repeats"):
    onnx_runtime.load_model(str(out), None, prompts=['roads', 'roads '])


def test_scene_through_the_engine_with_two_of_three_prompts(setup, onnx_bundle, tmp_path):
  """infer's path (pipeline.run_inference with prompts=) on a 100 x 90 GeoTIFF pair:
  load_model(prompts=2 of the 3) on the P = 3 ONNX bundle gives, band for band, the JAX
  backend's probabilities for those prompts (taken from its 3-prompt run)."""
  import rasterio  # pylint: disable=g-import-not-at-top

  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  from tests.infer import scene_helpers as h  # pylint: disable=g-import-not-at-top
  _, config, _, _, table, _, _, det, _ = setup
  out, _ = onnx_bundle
  pa, pb = h.pair_arrays(100, 90)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', pa), h.write_tif(tmp_path / 'b.tif', pb)
  kw = dict(window=64, overlap=16, batch=3, probabilities=True, progress=False)
  jax_out = str(tmp_path / 'jax.tif')
  # What det.predictor(prompts=PROMPTS) runs, with the table's rows (no text encoder).
  pipeline.run_inference(a_path, b_path, jax_out, None, prompts=PROMPTS, **kw,
                         predictor_factory=lambda: pipeline.Model(
                             pipeline.detector_predictor(det, table[None]), config))
  two = ['mounds', 'roads']
  ort_out = str(tmp_path / 'ort.tif')
  pipeline.run_inference(a_path, b_path, ort_out, None, prompts=two, **kw,
                         predictor_factory=lambda: onnx_runtime.load_model(str(out), None,
                                                                           prompts=two))
  with rasterio.open(jax_out) as x, rasterio.open(ort_out) as y:
    assert y.count == 2 and list(y.descriptions) == two
    err = float(np.abs(x.read([3, 1]) - y.read()).max())
  # Probabilities: sigmoid' <= 1/4, and this model's logits stay within ~2.5 (test_onnx.py).
  print(f'scene probabilities, onnxruntime (2 of {P} prompts, padded) vs jax: {err:.2e}')
  assert err <= 0.25 * 2.5 * max(1e-4, 10 * _ort_bound(setup)[1])


@pytest.mark.slow
def test_onnx_raw_prompt_batch_and_one_prompt_file(setup, tmp_path):
  """--raw_inputs --prompt_batch: logits [b, S, S, P] equal model.apply, and fewer prompts
  through the engine's predictor; a one-prompt file given 2 prompts names --prompt_batch 2 and
  its signature has no prompt_batch (the single-prompt export as before)."""
  pytest.importorskip('onnxruntime', reason='pip install .[onnx]')
  from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  from tests.export import test_onnx  # pylint: disable=g-import-not-at-top
  _, config, variables, npz, table, (rgb_a, rgb_b), rows, det, want = setup
  a, b = imagery.normalize(rgb_a), imagery.normalize(rgb_b)
  sens = test_onnx.self_sensitivity(det, variables, a, b, table[rows], want)
  onnx_export.write_bundle(str(tmp_path / 'raw'), config, variables, embeddings=npz,
                           raw_inputs=True, prompt_batch=P)
  raw = onnx_runtime.OnnxDetector(str(tmp_path / 'raw' / 'model.onnx'))
  assert raw.kind == bundle_lib.RAW and raw.prompt_batch == P
  err = test_onnx.check_close(raw.predict_logits(a, b, table[rows]), want, sens)
  got = raw.predictor(text_emb=table[[1, 2]])(rgb_a[1:2], rgb_b[1:2])  # rows [2, 0, 1]
  assert float(np.abs(got - _sigmoid(want[1:2, ..., [2, 0]])).max()) <= test_onnx.prob_bound(
      want, sens)
  print(f'ONNX Runtime --raw_inputs --prompt_batch {P} vs model.apply, batch 3: logits '
        f'{err:.2e} x max|logit| (JAX self-sensitivity {sens:.2e})')
  sig = onnx_export.write_bundle(str(tmp_path / 'one'), config, variables, embeddings=npz,
                                 raw_inputs=True)
  assert 'prompt_batch' not in sig and sig['inputs']['text_emb']['shape'] == ['b', 8, 32]
  one = onnx_runtime.OnnxDetector(str(tmp_path / 'one' / 'model.onnx'))
  assert one.prompt_batch is None
  # The P-prompt file against the one-prompt file, prompt by prompt, both in ONNX Runtime: the
  # error above is the float32 chaos of the random model (shared by both), not the prompt axis.
  multi = raw.predict_logits(a, b, table[rows])
  gap = max(float(np.abs(one.predict_logits(a, b, table[rows[:, p]])[..., 0]
                         - multi[..., p]).max()) for p in range(P))
  print(f'ONNX Runtime, P-prompt vs one-prompt file, per prompt: logits max abs gap {gap:.2e} '
        f'(vs JAX {err * float(np.abs(want).max()):.2e})')
  assert gap <= 1e-4 * max(1.0, float(np.abs(want).max())), gap
  with pytest.raises(onnx_runtime.OnnxBackendError,
                     match='exported for one prompt per call, got 2: re-export with '
                     '--prompt_batch 2'):
    one.predictor(text_emb=table[:2])



@pytest.mark.slow
def test_export_cli_prompt_batch_onnx(setup, tmp_path):
  """python -m segchange_jax.export --format onnx --prompt_batch 2 writes P = 2 graphs that
  onnx_runtime.load_model runs for 2 prompts and refuses for 3 (naming --prompt_batch 3)."""
  pytest.importorskip('onnxruntime', reason='pip install .[onnx]')
  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  root, _, _, npz, *_ = setup
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'segchange_jax.export', '--format', 'onnx',
                         '--checkpoint', str(root / 'ckpt'), '--out', str(tmp_path / 'cli'),
                         '--embeddings', npz, '--prompt_batch', '2'], cwd=tiny.REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sig = json.loads((tmp_path / 'cli' / 'signature.json').read_text())
  assert sig['prompt_batch'] == 2 and sig['inputs']['prompt']['shape'] == ['b', 2]
  model = onnx_runtime.load_model(str(tmp_path / 'cli'), None, prompts=['roads', 'mounds'])
  rgb = np.zeros((1, 64, 64, 3), np.uint8)
  assert model.predict(rgb, rgb).shape == (1, 64, 64, 2)
  with pytest.raises(onnx_runtime.OnnxBackendError,
                     match='exported for 2 prompts, got 3: re-export with --prompt_batch 3'):
    onnx_runtime.load_model(str(tmp_path / 'cli'), None, prompts=PROMPTS)
