"""The app in a real browser: headless Debian Chromium loads the page, runs the default sample
pair (the bundled GeoTIFF) on a tiny checkpoint, and the overlay, area and downloads arrive with
the numbers the app's own functions give; with two prompts typed in the box, one colour per
prompt and a legend, and a repeated prompt is one message on the page."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from segchange_jax.app import samples
from segchange_jax.app import ui
from segchange_jax.inference import predictor
from tests.app import browser
from tests.eval import tiny

PROMPT = 'Buildings appearing or vanishing.'
PROMPT2 = 'New roads.'


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
  root = tmp_path_factory.mktemp('app')
  npz = tiny.write_embeddings(root / 'p.npz', [PROMPT, PROMPT2])
  config = tiny.tiny_config(embeddings=npz)
  config.infer.batch_size = 1  # one compiled shape of batch 1 compiles fastest
  # Random variables handed over directly (checkpoint loading is tested in tests/infer).
  return predictor.ChangeDetector(config, tiny.random_variables(config), checkpoint='tiny-random')


def test_sample_pair_in_chromium(detector, tmp_path):
  if browser.chromium() is None:
    pytest.skip('Chromium is not installed (apt-get install -y chromium chromium-driver; '
                '.ci/run installs it)')
  # The pair through the app's own functions first (this compiles the model, once for both):
  # the page must show their figures.
  run = ui.detect(detector, *samples.SAMPLES[0].paths, PROMPT, str(tmp_path / 'ref'))
  ref = ui.render(run, 0.5, str(tmp_path / 'ref' / 'out'))
  low = ui.render(run, 0.3, str(tmp_path / 'ref' / 'low'))
  assert low.changed_px != ref.changed_px
  want_low = f'Changed area: {low.changed_px:,} px'
  url, page = browser.serve(detector, str(tmp_path / 'served'))
  try:
    got = browser.run_sample(url, screenshot=str(tmp_path / 'app.png'), check_error=True,
                             threshold=0.3, expect_after_threshold=want_low)
  finally:
    page.close()
  assert not got['errors'], got['errors']
  assert not got['external_requests'], got['external_requests']  # works offline
  assert 'no image A and B uploaded' in got['error_toast'], got['error_toast']
  assert 'Traceback' not in got['error_toast']
  assert got['overlay_size'] == [256, 256]  # the GeoTIFF sample, shown at full size
  px = int(re.search(r'Changed area: ([\d,]+) px', got['area']).group(1).replace(',', ''))
  assert px == ref.changed_px
  m2 = float(re.search(r'([\d,.]+) m²', got['area']).group(1).replace(',', ''))
  assert m2 == pytest.approx(ref.changed_px * samples.GEO_PIXEL ** 2, abs=0.05)
  assert want_low in got['area_after_threshold'], got['area_after_threshold']
  listed = ''.join(got['downloads'].split())  # the page breaks names before the extension
  for name in ('change_mask.tif', 'change_polygons.gpkg', 'change_polygons.geojson'):
    assert name in listed, got['downloads']
  assert (tmp_path / 'app.png').stat().st_size > 10_000


def test_two_prompts_in_chromium(detector, tmp_path):
  """Two prompts typed one per line: one multi-prompt run; the page's overlay is the app's own
  (pixel for pixel: each prompt in its colour), the legend lists both prompts with their
  shares and swatches in the overlay colours; a repeated prompt is one message, no traceback.
  The screenshot is kept as app_two_prompts.png beside the test's tmp folder for a look."""
  if browser.chromium() is None:
    pytest.skip('Chromium is not installed (apt-get install -y chromium; .ci/run installs it)')
  prompts = [PROMPT, PROMPT2]
  run = ui.detect(detector, *samples.SAMPLES[0].paths, '\n'.join(prompts),
                  str(tmp_path / 'ref'))
  ref = ui.render(run, 0.5, str(tmp_path / 'ref' / 'out'))
  url, page = browser.serve(detector, str(tmp_path / 'served'))
  shot = tmp_path / 'app_two_prompts.png'
  try:
    got = browser.run_sample(url, screenshot=str(shot), prompts=prompts,
                             bad_prompts=f'{PROMPT}\n{PROMPT}')
  finally:
    page.close()
  shutil.copy(shot, tmp_path.parent / 'app_two_prompts.png')
  assert not got['errors'], got['errors']
  assert not got['external_requests'], got['external_requests']
  assert [e['prompt'] for e in got['legend']] == prompts
  assert [e['share'] for e in got['legend']] == [f'{e.share:.2f} %' for e in ref.legend]
  assert [e['colour'] for e in got['legend']] == [f'rgb({r}, {g}, {b})'
                                                  for r, g, b in (e.rgb for e in ref.legend)]
  assert ref.legend[0].rgb != ref.legend[1].rgb
  np.testing.assert_array_equal(got['overlay'], ref.overlay)
  assert got['area'].count('Changed area') == 2
  msg = got['prompt_error_toast']
  assert "prompt line 2 ('Buildings appearing or vanishing.') repeats line 1" in msg, msg
  assert 'Traceback' not in msg
  listed = ''.join(got['downloads'].split())
  for name in ('change_mask.tif', 'change_polygons.gpkg', 'change_polygons.geojson'):
    assert name in listed, got['downloads']
  print('two prompts in Chromium: legend', got['legend'], 'marked px',
        [e.changed_px for e in ref.legend])
