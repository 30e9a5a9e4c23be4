"""Several prompts over a whole scene (`infer --prompt A --prompt B`, `predict_scene(prompts=)`):
one P-band COG (band description = prompt), polygons with a `prompt` attribute, each band equal
to the single-prompt run of its prompt; bad prompt lists and combinations are one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pyogrio
import pyogrio.raw
import pytest
import rasterio

from segchange_jax import infer
from segchange_jax.inference import formats
from segchange_jax.inference import pipeline
from tests.eval import tiny
from tests.infer import scene_helpers as h

if 'checkpoint' not in flags.FLAGS:  # the command defines its flags only when run as one
  infer.define_flags()

PROMPTS = ['new buildings', 'new roads']
KW = dict(window=64, overlap=16, batch=4, progress=False)


class _Meta:
  """What a test checks of an output raster, read while it is open."""

  def __init__(self, ds):
    self.crs, self.transform, self.count, self.nodata = ds.crs, ds.transform, ds.count, ds.nodata
    self.dtypes, self.descriptions = ds.dtypes, ds.descriptions
    self.layout = ds.tags(ns='IMAGE_STRUCTURE').get('LAYOUT')
    self.file_tags = ds.tags()
    self.band_tags = [ds.tags(i) for i in ds.indexes]
    self.colour_1 = ds.colormap(1)[1] if ds.dtypes[0] == 'uint8' else None


def _read(path):
  with rasterio.open(path) as ds:
    return ds.read(), _Meta(ds)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp('multi_prompt_infer')
  return (root, *tiny.prompt_detector(root, PROMPTS))


@pytest.fixture
def pair(tmp_path):
  a, b = h.pair_arrays(70, 90, seed=4)
  return h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)


def test_two_prompts_are_two_bands_equal_to_single_prompt_runs(model, pair, tmp_path):
  _, _, det = model
  a_path, b_path = pair
  calls = []
  forward = det._forward  # pylint: disable=protected-access
  det._forward = lambda v, a, b, t, tta: calls.append(t.shape) or forward(v, a, b, t, tta)
  try:
    out, probs = tmp_path / 'multi.tif', tmp_path / 'multi_p.tif'
    gpkg, gj = tmp_path / 'v.gpkg', tmp_path / 'v.geojson'
    stats = det.predict_scene(a_path, b_path, out, prompts=PROMPTS, probs_path=str(probs),
                              polygons_path=[str(gpkg), str(gj)], do_postprocess=False)
    multi_calls = len(calls)
    singles = {}
    for i, p in enumerate(PROMPTS):
      det.predict_scene(a_path, b_path, tmp_path / f'm{i}.tif', prompt=p,
                        probs_path=str(tmp_path / f'p{i}.tif'), do_postprocess=False)
      singles[p] = _read(tmp_path / f'm{i}.tif')[0][0], _read(tmp_path / f'p{i}.tif')[0][0]
  finally:
    del det._forward
  # Each window batch went through the model once for both prompts (+1: the compile probe).
  assert multi_calls == len(calls) // 3 and all(s[1] == 2 for s in calls[:multi_calls]), calls
  mask, ds = _read(out)
  with rasterio.open(a_path) as src:
    assert (ds.crs, ds.transform) == (src.crs, src.transform)
  assert ds.layout == 'COG'
  assert (ds.count, ds.dtypes[0], ds.nodata) == (2, 'uint8', 255)
  assert ds.descriptions == tuple(PROMPTS)
  assert [t['PROMPT'] for t in ds.band_tags] == PROMPTS
  assert json.loads(ds.file_tags['PROMPTS']) == PROMPTS and 'PROMPT' not in ds.file_tags
  p, pds = _read(probs)
  assert (pds.count, pds.dtypes[0]) == (2, 'float32') and pds.descriptions == tuple(PROMPTS)
  assert (pds.crs, pds.transform) == (ds.crs, ds.transform)
  for i, prompt in enumerate(PROMPTS):
    want_mask, want_p = singles[prompt]
    # Float rounding only: the head's output convs see a batch of B x P maps (see
    # test_multi_prompt_predict).
    np.testing.assert_allclose(p[i], want_p, atol=1e-4, rtol=0, err_msg=prompt)
    clear = np.abs(want_p - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[i][clear], want_mask[clear], err_msg=prompt)
  assert not np.array_equal(mask[0], mask[1])  # the prompts steer this random model
  # The run's summary: per prompt, changed pixels, share and hectares (a metric projected CRS).
  pixel_ha = abs(ds.transform.a * ds.transform.e) / 1e4
  assert list(stats.changed) == PROMPTS
  for i, prompt in enumerate(PROMPTS):
    changed = int((mask[i] == 1).sum())
    assert stats.changed[prompt] == pytest.approx(
        {'pixels': changed, 'share': changed / mask[i].size, 'hectares': changed * pixel_ha})
  # Polygons: one layer, every feature tagged with its prompt; areas add up to each band.
  _, _, _, fields = pyogrio.raw.read(gpkg)
  assert list(pyogrio.read_info(gpkg)['fields']) == ['value', 'area', 'area_px', 'prompt']
  assert set(fields[3]) == set(PROMPTS)
  with open(gj) as f:
    features = json.load(f)['features']
  for i, prompt in enumerate(PROMPTS):
    assert fields[2][fields[3] == prompt].sum() == (mask[i] == 1).sum()
    assert sum(f['properties']['area_px'] for f in features
               if f['properties']['prompt'] == prompt) == (mask[i] == 1).sum()


def _two_channel(x, y):
  """Toy predictor of two prompts: the box change, and its complement."""
  p = h.box_change(x, y)
  return np.stack([p, 1.0 - p], axis=-1)


def test_three_prompts_with_postprocess_have_no_colour_table(pair, tmp_path):
  # GDAL keeps no colour table in a GeoTIFF of 3+ samples: the mask is written without one
  # (and the postprocess rewrite does not fail reading it).
  three = lambda x, y: np.concatenate([_two_channel(x, y), _two_channel(x, y)[..., :1]], -1)
  out = tmp_path / 'o3.tif'
  pipeline.run_inference(pair[0], pair[1], str(out), three, channels=3,
                         prompts=[*PROMPTS[:2], 'new mounds'], do_postprocess=True, min_area=30,
                         **KW)
  with rasterio.open(out) as ds:
    assert ds.count == 3 and ds.descriptions == (*PROMPTS[:2], 'new mounds')
    with pytest.raises(ValueError):
      ds.colormap(1)
    assert ds.read(1).sum() > 0


def test_postprocess_preview_and_single_prompt_layout(pair, tmp_path):
  a_path, b_path = pair
  out, prev, gj = tmp_path / 'o.tif', tmp_path / 'p.png', tmp_path / 'v.geojson'
  pipeline.run_inference(a_path, b_path, str(out), _two_channel, channels=2, prompts=PROMPTS,
                         do_postprocess=True, min_area=30, preview_path=str(prev),
                         polygons_path=str(gj), **KW)
  mask, ds = _read(out)
  assert ds.descriptions == tuple(PROMPTS) and [t['PROMPT'] for t in ds.band_tags] == PROMPTS
  assert ds.colour_1 == (255, 0, 0, 255)
  # Each band filtered on its own: the changed square kept in band 1, the complement in band 2.
  assert mask[0].sum() > 0 and mask[1].sum() > 0 and not (mask[0] & mask[1]).any()
  overlay = np.asarray(Image.open(prev))[:, -90:]
  assert (overlay[mask[0] == 1] == (255, 0, 0)).all()
  assert (overlay[mask[1] == 1] == (0, 160, 255)).all()
  with open(gj) as f:
    props = [ft['properties'] for ft in json.load(f)['features']]
  assert {p['prompt'] for p in props} == set(PROMPTS)
  # One prompt, no list: the single-band layout without a `prompt` attribute.
  out1, gj1 = tmp_path / 'o1.tif', tmp_path / 'v1.geojson'
  pipeline.run_inference(a_path, b_path, str(out1), h.box_change, polygons_path=str(gj1),
                         do_postprocess=True, min_area=30, **KW)
  m1, ds1 = _read(out1)
  assert ds1.count == 1 and ds1.descriptions == (None,) and 'PROMPT' not in ds1.band_tags[0]
  np.testing.assert_array_equal(m1[0], mask[0])
  with open(gj1) as f:
    assert all('prompt' not in ft['properties'] for ft in json.load(f)['features'])


def test_several_prompts_of_a_multi_class_model(pair, tmp_path):
  """P = 2 prompts x K = 3 classes: a class-id band per prompt, P x K probability bands."""
  a_path, b_path = pair

  def classes(x, y):  # prompt 0: class 1 where changed; prompt 1: class 2 there
    p = h.box_change(x, y)
    rest = (1.0 - p) / 2
    return np.stack([rest, p, rest, rest, rest, p], axis=-1)

  out, probs, gj = tmp_path / 'o.tif', tmp_path / 'p.tif', tmp_path / 'v.geojson'
  pipeline.run_inference(a_path, b_path, str(out), classes, channels=6, prompts=PROMPTS,
                         probs_path=str(probs), polygons_path=str(gj), do_postprocess=False,
                         **KW)
  mask, ds = _read(out)
  assert ds.count == 2 and ds.descriptions == tuple(PROMPTS)
  changed = mask[0] == 1
  assert changed.any() and set(np.unique(mask[0])) == {0, 1}
  np.testing.assert_array_equal(mask[1], np.where(changed, 2, 0))
  p, pds = _read(probs)
  assert pds.count == 6 and pds.descriptions == tuple(
      f'{q} (class {k})' for q in PROMPTS for k in range(3))
  assert [t['PROMPT'] for t in pds.band_tags] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  np.testing.assert_allclose(p[1], p[5])
  with open(gj) as f:
    props = [ft['properties'] for ft in json.load(f)['features']]
  assert {(q['prompt'], q['value']) for q in props} == {(PROMPTS[0], 1), (PROMPTS[1], 2)}


_run_infer = h.run_infer_cli


@pytest.mark.parametrize('extra, words', [
    (['--prompt', 'new roads', '--prompt', 'new buildings', '--prompt', ' new  roads'],
     ["--prompt #3=' new  roads' repeats --prompt #1='new roads'"]),
    (['--prompt', 'new roads', '--prompt', ''], ["--prompt #2='' is empty"]),
])
def test_bad_prompt_flags_are_one_error(capsys, pair, tmp_path, extra, words):
  err = _run_infer(capsys, '--a', pair[0], '--b', pair[1], '--out', str(tmp_path / 'o.tif'),
                   *extra)
  errors = [ln for ln in err.splitlines() if ln.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in err, err
  for w in words:
    assert w in errors[0], (w, errors[0])
  assert not (tmp_path / 'o.tif').exists()


def test_onnx_backend_gets_the_prompt_list(capsys, pair, tmp_path, monkeypatch):
  """--backend onnxruntime hands all prompts to onnx_runtime.load_model, whose refusal (an
  export with fewer prompts per call) is the one error line."""
  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  seen = []

  def load_model(*args, **kwargs):
    seen.append(kwargs.get('prompts'))
    raise onnx_runtime.OnnxBackendError('model.onnx was exported for one prompt per call, got '
                                        '2: re-export with --prompt_batch 2')
  monkeypatch.setattr(onnx_runtime, 'load_model', load_model)
  err = _run_infer(capsys, '--a', pair[0], '--b', pair[1], '--out', str(tmp_path / 'o.tif'),
                   '--backend', 'onnxruntime', '--prompt', PROMPTS[0], '--prompt', PROMPTS[1])
  assert seen == [PROMPTS]
  errors = [ln for ln in err.splitlines() if ln.startswith('error: ')]
  assert len(errors) == 1 and '--prompt_batch 2' in errors[0], err
  assert not (tmp_path / 'o.tif').exists()


def test_png_out_refused_for_several_prompts(tmp_path):
  a, b = h.pair_arrays(64, 64)
  for name, arr in (('a.png', a), ('b.png', b)):
    Image.fromarray(arr.transpose(1, 2, 0)).save(tmp_path / name)
  with pytest.raises(formats.OutputFormatError, match=r'--out .*o\.png: PNG mask holds one '
                     r'mask, but 2 prompts were given; use a \.tif'):
    pipeline.run_inference(str(tmp_path / 'a.png'), str(tmp_path / 'b.png'),
                           str(tmp_path / 'o.png'), _two_channel, channels=2, prompts=PROMPTS,
                           **KW)
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'b.png']


@pytest.mark.slow
def test_cli_two_prompts(model, pair, tmp_path):
  """`python -m segchange_jax.infer --prompt A --prompt B --tta flips` (predictor.load_model's
  prompt list; the flipped views of all prompts in one model call)."""
  root, npz, _ = model
  out, gpkg = tmp_path / 'o.tif', tmp_path / 'v.gpkg'
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
      [sys.executable, '-m', 'segchange_jax.infer', '--checkpoint', str(root / 'ckpt'),
       '--embeddings', npz, '--noprogress', '--a', pair[0], '--b', pair[1], '--out', str(out),
       '--polygons', str(gpkg), '--prompt', PROMPTS[0], '--prompt', PROMPTS[1], '--tta',
       'flips'],
      cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(bands: 1 'new buildings', 2 'new roads')" in proc.stdout
  mask, ds = _read(out)
  for i, prompt in enumerate(PROMPTS):
    changed = int((mask[i] == 1).sum())
    assert (f'{prompt!r}: {changed / mask[i].size:.2%} of the valid pixels changed ({changed} px, '
            in proc.stdout), proc.stdout
  assert ds.count == 2 and ds.descriptions == tuple(PROMPTS)
  assert json.loads(ds.file_tags['PROMPTS']) == PROMPTS and ds.file_tags['TTA'] == 'flips'
  _, _, _, fields = pyogrio.raw.read(gpkg)
  for i, prompt in enumerate(PROMPTS):
    assert fields[2][fields[3] == prompt].sum() == (mask[i] == 1).sum()


def test_changed_shares_in_metres_feet_degrees_and_without_a_crs():
  from affine import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top

  from segchange_jax.inference import scene_outputs  # pylint: disable=g-import-not-at-top
  mask = np.zeros((2, 4, 4), np.uint8)
  mask[0, 0, :2] = 1
  mask[:, 3] = 255                     # nodata: 12 valid pixels
  ten = Affine(10, 0, 0, 0, -10, 0)
  hectares = {crs: [c['hectares'] for c in scene_outputs.changed_shares(
      mask, 255, ten, CRS.from_string(crs) if crs else None)] for crs in
      ('EPSG:32618', 'EPSG:2263', 'EPSG:4326', None)}
  assert hectares['EPSG:32618'] == pytest.approx([0.02, 0.0])               # 2 px of 100 m²
  assert hectares['EPSG:2263'] == pytest.approx([200 * (1200 / 3937) ** 2 / 1e4, 0.0])  # US ft
  assert hectares['EPSG:4326'] == hectares[None] == [None, None]
  first = scene_outputs.changed_shares(mask, 255, ten, None)[0]
  assert (first['pixels'], first['share']) == (2, 2 / 12)
