"""The app's steps without a browser: samples, detect (windowed engine), render (threshold,
area, downloads), error messages, and the command's flag errors. No model is compiled here: a
pixelwise stand-in predictor exercises the plumbing; test_browser.py runs a real checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import rasterio
from rasterio.transform import from_origin

from segchange_jax import cli
from segchange_jax.app import samples
from segchange_jax.app import ui
from segchange_jax.inference import raster_io
from tests.eval import tiny


def _rgb(path: str) -> np.ndarray:
  if path.endswith('.tif'):
    with rasterio.open(path) as ds:
      return ds.read().transpose(1, 2, 0)
  return np.asarray(Image.open(path).convert('RGB'))


def test_bundled_samples_regenerate_bit_identically(tmp_path):
  samples.write_all(tmp_path)
  for s in samples.SAMPLES:
    for name, bundled in zip((s.a, s.b), s.paths):
      np.testing.assert_array_equal(_rgb(str(tmp_path / name)), _rgb(bundled))
  with rasterio.open(samples.SAMPLES[0].paths[0]) as ds:
    assert ds.crs.to_epsg() == 32618 and ds.res == (0.5, 0.5) and ds.shape == (256, 256)


def _diff(a, b):
  return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1) / 255.0


class _PixelwiseDetector:
  """ChangeDetector's surface for `detect`: probability = mean |A - B| / 255 per pixel; with
  `prompts=[...]` (one call for all) prompt i gets that times 4 ** i, clipped to 1, so each
  prompt marks a different area."""

  def __init__(self, config):
    self.config, self.checkpoint, self.prompts = config, 'stand-in', []

  def predictor(self, prompt=None, prompts=None):
    if prompts is None:
      self.prompts.append(prompt)
      return _diff
    self.prompts.append(list(prompts))
    return lambda a, b: np.stack([np.minimum(_diff(a, b) * 4 ** i, 1.0)
                                  for i in range(len(prompts))], -1)


def test_detect_runs_the_windowed_engine_and_reports_progress(tmp_path):
  config = tiny.tiny_config()  # window 64, overlap 16, batch 8
  det = _PixelwiseDetector(config)
  reports = []
  a_path, b_path = samples.SAMPLES[0].paths
  run = ui.detect(det, a_path, b_path, '  ', str(tmp_path / 'run'),
                  progress=lambda f, d: reports.append((f, d)))
  assert det.prompts == [config.data.prompt]  # a blank prompt means the config's
  assert (run.height, run.width, run.channels) == (256, 256, 1)
  probs, valid = run.arrays()
  a, b = _rgb(a_path), _rgb(b_path)
  expected = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1) / 255.0
  # Hann-weighted blending of a pixelwise function gives the function back.
  np.testing.assert_allclose(probs[..., 0], expected, atol=1e-5)
  assert valid.all()
  assert reports[-1][0] == pytest.approx(1.0) and '/' in reports[-1][1]
  assert run.a_view.shape == (256, 256, 3) and run.georeferenced


def _fake_run(tmp_path, probs: np.ndarray, valid: np.ndarray, georeferenced: bool) -> ui.Run:
  h, w = probs.shape
  run = ui.Run(workdir=str(tmp_path), height=h, width=w, channels=1,
               crs_wkt=rasterio.crs.CRS.from_epsg(32618).to_wkt() if georeferenced else None,
               transform=tuple(from_origin(500000, 4000000, 2.0, 2.0))[:6] if georeferenced
               else None, prompt='p', a_view=np.zeros((h, w, 3), np.uint8),
               b_view=np.full((h, w, 3), 200, np.uint8), tags={'PROMPT': 'p'})
  sink = ui._MemmapSink(run)  # pylint: disable=protected-access
  sink.write(0, probs[..., None], valid)
  sink.close()
  return run


def test_render_threshold_area_and_georeferenced_downloads(tmp_path):
  probs = np.zeros((40, 60), np.float32)
  probs[5:15, 10:20] = 0.9   # 100 px, above both thresholds
  probs[25:30, 30:50] = 0.6  # 100 px, only above 0.5
  valid = np.ones((40, 60), bool)
  valid[:, :5] = False       # 200 px nodata
  run = _fake_run(tmp_path, probs, valid, georeferenced=True)
  low = ui.render(run, 0.5, str(tmp_path / 'low'))
  high = ui.render(run, 0.7, str(tmp_path / 'high'))
  assert (low.changed_px, high.changed_px, low.valid_px) == (200, 100, 2200)
  # 2 m pixels: 200 px = 800 m^2 = 0.08 ha.
  assert '200 px' in low.area_text and '800.0 m²' in low.area_text and '0.0800 ha' in low.area_text
  assert [os.path.basename(f) for f in low.files] == [
      'change_mask.tif', 'change_polygons.gpkg', 'change_polygons.geojson']
  with rasterio.open(low.files[0]) as ds:
    mask = ds.read(1)
    assert ds.crs.to_epsg() == 32618 and ds.transform == from_origin(500000, 4000000, 2, 2)
    assert ds.nodata == raster_io.MASK_NODATA and ds.tags()['THRESHOLD'] == '0.5'
  np.testing.assert_array_equal(mask, np.where(valid, probs > 0.5, 255))
  with open(low.files[2]) as f:
    features = json.load(f)['features']
  assert sorted(ft['properties']['area_px'] for ft in features) == [100, 100]
  assert sum(ft['properties']['area'] for ft in features) == pytest.approx(800.0)
  # The overlay marks the changed pixels red on B's view and leaves the rest of B darkened.
  assert tuple(low.overlay[10, 15]) != tuple(low.overlay[0, 0])
  assert low.overlay[10, 15, 0] > low.overlay[10, 15, 1]


def test_render_plain_images_give_png_and_gpkg_only(tmp_path):
  probs = np.zeros((32, 32), np.float32)
  probs[:4, :8] = 1.0
  run = _fake_run(tmp_path, probs, np.ones((32, 32), bool), georeferenced=False)
  shown = ui.render(run, 0.5, str(tmp_path / 'out'))
  assert [os.path.basename(f) for f in shown.files] == ['change_mask.png',
                                                        'change_polygons.gpkg']
  assert (np.asarray(Image.open(shown.files[0])) == 255).sum() == 32
  assert shown.area_text.endswith('no georeferencing, so no map area')
  with pytest.raises(ValueError, match='threshold'):
    ui.render(run, 1.5, str(tmp_path / 'bad'))


@pytest.mark.parametrize('epsg, res, words', [
    (32618, 0.5, ['400 px', '100.0 m²', '0.0100 ha']),
    (2263, 2.0, ['400 px', '1,600 US survey foot²', 'm²']),   # NY Long Island, US feet
    (4326, 0.001, ['400 px', '0.0004 degree²', 'not an equal-area']),
])
def test_area_in_map_units(epsg, res, words):
  crs = rasterio.crs.CRS.from_epsg(epsg)
  text = ui.area_text(400, 1000, crs.to_wkt(), tuple(from_origin(0, 0, res, res))[:6])
  for w in words:
    assert w in text, text
  m2 = {32618: 100.0, 2263: 1600 * 0.3048006096 ** 2}.get(epsg)
  if m2 is not None:
    assert f'{m2:,.1f} m²' in text


def test_user_errors_are_one_clear_line(tmp_path):
  with pytest.raises(cli.UsageError, match='no image B uploaded'):
    ui.resolve_inputs(ui.UPLOAD, str(tmp_path / 'a.png'), None)
  upload = tmp_path / 'gradio' / 'abc123'
  upload.mkdir(parents=True)
  Image.new('RGB', (64, 64)).save(upload / 'a.png')
  Image.new('RGB', (32, 64)).save(upload / 'b.png')
  with pytest.raises(ValueError) as e:
    ui.open_pair(str(upload / 'a.png'), str(upload / 'b.png'))
  msg = ui.user_message(e.value, (str(upload / 'a.png'), str(upload / 'b.png')))
  assert msg == ('a.png is 64x64 px but b.png is 32x64 px; the two images must have one size')
  (upload / 'c.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
  with pytest.raises(ValueError) as e:
    ui.open_pair(str(upload / 'a.png'), str(upload / 'c.png'))
  msg = ui.user_message(e.value, (str(upload / 'c.png'),))
  assert msg.startswith('c.png: cannot read the image') and '\n' not in msg
  with pytest.raises(cli.UsageError, match='not one of each'):
    ui.open_pair(str(upload / 'a.png'), samples.SAMPLES[0].paths[1])


def test_command_flag_errors(repo_root):
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', 'segchange_jax.app', '--port', '0'],
                       cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'error: --checkpoint is required (e.g. runs/demo/checkpoints after README Quickstart '
      'command (1))']


def test_command_imports_everything_then_names_a_missing_checkpoint(repo_root, tmp_path):
  """Past the flags the command imports gradio, the page and the model code (a flag defined
  twice would stop it here), then reports the missing checkpoint in one line."""
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  missing = tmp_path / 'no_such_ckpt'
  out = subprocess.run([sys.executable, '-m', 'segchange_jax.app', '--checkpoint', str(missing)],
                       cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == f"error: checkpoint '{missing}' does not exist"
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_command_serves_the_page(repo_root, tmp_path):
  """`python -m segchange_jax.app --checkpoint DIR --port N` loads the checkpoint and serves."""
  import time  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  from tests.app import browser  # pylint: disable=g-import-not-at-top
  npz = tiny.write_embeddings(tmp_path / 'p.npz', ['Buildings appearing or vanishing.'])
  tiny.save_checkpoint(tmp_path / 'ckpt', tiny.tiny_config(embeddings=npz))
  port = browser.free_port()
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-m', 'segchange_jax.app', '--checkpoint',
                           str(tmp_path / 'ckpt'), '--port', str(port)], cwd=repo_root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline, page = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None and page is None:
      try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=5) as r:
          page = r.read().decode()
      except OSError:
        time.sleep(0.5)
    assert page is not None, proc.communicate(timeout=10)[0][-3000:] if proc.poll() else 'no page'
    assert 'segchange_jax: text-prompted change detection' in page
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_infer_only_flags_are_refused(repo_root):
  """The app takes --checkpoint, --embeddings, --config, --port, --host; infer's window
  settings come from the checkpoint config, so --window is an unknown flag: one line."""
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', 'segchange_jax.app', '--checkpoint', 'x',
                        '--window', '256'], cwd=repo_root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'window' in lines[0], lines


def test_checkpoint_path_is_shown_as_typed_inside_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  inside = os.path.join(str(tmp_path), 'runs', 'demo', 'checkpoints')
  assert ui.shown_path(inside) == os.path.join('runs', 'demo', 'checkpoints')
  outside = os.path.dirname(str(tmp_path))
  assert ui.shown_path(outside) == outside


def test_two_prompts_one_pass_two_masks_two_colours_and_a_legend(tmp_path):
  """Two prompts (one per line): ONE predictor call for both; render gives two masks (two
  bands of the COG, described by their prompts), polygons with a `prompt` attribute, an
  overlay with each prompt in its own colour and a legend of two entries whose areas are the
  masks' pixel counts."""
  import pyogrio  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config()
  det = _PixelwiseDetector(config)
  a_path, b_path = samples.SAMPLES[0].paths
  prompts = ['new buildings', 'roads <b>&</b> "tracks"']  # the legend escapes user text
  run = ui.detect(det, a_path, b_path, f'  {prompts[0]}\n{prompts[1]}  \n',
                  str(tmp_path / 'run'))
  assert det.prompts == [prompts]  # one call for all prompts
  assert run.prompts == tuple(prompts) and run.channels == 2 and run.classes == 1
  assert json.loads(run.tags['PROMPTS']) == prompts
  shown = ui.render(run, 0.3, str(tmp_path / 'out'))
  probs, valid = run.arrays()
  want = [np.count_nonzero((probs[..., i] > 0.3) & valid) for i in range(2)]
  assert want[0] < want[1]  # prompt 2 marks more (x4): the two masks differ
  assert [e.prompt for e in shown.legend] == prompts
  assert [e.changed_px for e in shown.legend] == want
  assert shown.legend[0].rgb != shown.legend[1].rgb
  assert shown.legend[0].rgb == (255, 0, 0)  # the first prompt stays red, as with one prompt
  for e in shown.legend:
    assert e.share == pytest.approx(100.0 * e.changed_px / (256 * 256))
  page = shown.legend_html
  assert page.count('class="legend-entry"') == 2
  assert html_escaped(prompts[1]) in page and prompts[1] not in page
  assert f'{shown.legend[1].share:.2f} %' in page and shown.legend[1].hex in page
  assert shown.area_text.count('Changed area') == 2 and '1. `new buildings`' in shown.area_text
  assert [os.path.basename(f) for f in shown.files] == [
      'change_mask.tif', 'change_polygons.gpkg', 'change_polygons.geojson']
  with rasterio.open(shown.files[0]) as ds:
    assert ds.count == 2 and list(ds.descriptions) == prompts
    bands = ds.read()
  for i in range(2):
    np.testing.assert_array_equal(bands[i], (probs[..., i] > 0.3).astype(np.uint8))
  assert pyogrio.read_info(shown.files[1])['fields'].tolist() == [
      'value', 'area', 'area_px', 'prompt']
  with open(shown.files[2]) as f:
    features = [ft['properties'] for ft in json.load(f)['features']]
  assert {ft['prompt'] for ft in features} == set(prompts)
  for i, p in enumerate(prompts):
    assert sum(ft['area_px'] for ft in features if ft['prompt'] == p) == want[i]
  # Overlay: pixels marked by prompt 2 only are in its colour (blue dominant), by both in
  # prompt 2's (drawn on top); unmarked pixels are B darkened.
  only2 = (bands[1] > 0) & (bands[0] == 0)
  y, x = np.argwhere(only2)[0]
  assert shown.overlay[y, x, 2] > shown.overlay[y, x, 0]
  y, x = np.argwhere(bands[0] > 0)[0]  # prompt 1's change lies inside prompt 2's here
  assert shown.overlay[y, x, 2] > shown.overlay[y, x, 0]
  # A lower threshold re-renders without the model: more marked area for both prompts.
  low = ui.render(run, 0.1, str(tmp_path / 'low'))
  assert all(lo.changed_px > hi.changed_px for lo, hi in zip(low.legend, shown.legend))


def test_two_prompts_on_plain_images_give_one_png_per_prompt(tmp_path):
  det = _PixelwiseDetector(tiny.tiny_config())
  run = ui.detect(det, *samples.SAMPLES[1].paths, 'a\nb', str(tmp_path / 'run'))
  shown = ui.render(run, 0.3, str(tmp_path / 'out'))
  assert [os.path.basename(f) for f in shown.files] == [
      'change_mask_1.png', 'change_mask_2.png', 'change_polygons.gpkg']
  for i, f in enumerate(shown.files[:2]):
    assert (np.asarray(Image.open(f)) == 255).sum() == shown.legend[i].changed_px


def test_one_prompt_behaves_as_before(tmp_path):
  """A single line: the one-prompt predictor call, tag PROMPT, one red legend entry."""
  config = tiny.tiny_config()
  det = _PixelwiseDetector(config)
  run = ui.detect(det, *samples.SAMPLES[1].paths, 'new roads\n', str(tmp_path / 'run'))
  assert det.prompts == ['new roads'] and run.tags['PROMPT'] == 'new roads'
  assert 'PROMPTS' not in run.tags and run.prompts == ('new roads',) and run.channels == 1
  shown = ui.render(run, 0.3, str(tmp_path / 'out'))
  assert shown.area_text.startswith('**Changed area:')
  assert [(e.prompt, e.rgb) for e in shown.legend] == [('new roads', (255, 0, 0))]


def html_escaped(text: str) -> str:
  import html  # pylint: disable=g-import-not-at-top
  return html.escape(text)


@pytest.mark.parametrize('text, words', [
    ('new roads\n\nnew buildings', 'prompt line 2 is empty: write one prompt per line'),
    ('new roads\nnew  roads', "prompt line 2 ('new  roads') repeats line 1: give each prompt "
                               'once'),
    ('\n'.join(f'p{i}' for i in range(ui.MAX_PROMPTS + 1)),
     f'{ui.MAX_PROMPTS + 1} prompts: the page draws at most {ui.MAX_PROMPTS}'),
])
def test_prompt_box_errors_are_one_line_before_any_work(tmp_path, text, words):
  det = _PixelwiseDetector(tiny.tiny_config())
  with pytest.raises(cli.UsageError) as e:
    ui.detect(det, *samples.SAMPLES[1].paths, text, str(tmp_path / 'run'))
  msg = ui.user_message(e.value)
  assert words in msg and '\n' not in msg
  assert det.prompts == [] and not (tmp_path / 'run').exists()


def test_blank_prompt_box_means_the_config_prompt():
  assert ui.parse_prompts('  \n ', 'Buildings.') == ['Buildings.']
  assert ui.parse_prompts(None, 'Buildings.') == ['Buildings.']
  assert ui.parse_prompts(' a \n b', 'x') == ['a', 'b']
