"""Drives the app in headless Chromium (Debian's package, through Playwright); used by
test_browser.py and to take docs/images/app.png:

    python -m tests.app.browser --checkpoint runs/demo/checkpoints --out docs/images/app.png

Playwright's own browser downloads are never used: Chromium is /usr/bin/chromium
(`apt-get install chromium`; .ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile

CHROMIUM_PATHS = ('/usr/bin/chromium', '/usr/lib/chromium/chromium')


def chromium() -> str | None:
  """Debian's Chromium executable, or None where it is not installed."""
  found = shutil.which('chromium')
  return found or next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def serve(detector, workroot: str) -> tuple[str, object]:
  """Starts the app for `detector` on a free localhost port; (url, page). page.close() stops."""
  from segchange_jax.app import ui  # pylint: disable=g-import-not-at-top
  page = ui.build(detector, workroot)
  port = free_port()
  ui.launch(page, '127.0.0.1', port, block=False)
  return f'http://127.0.0.1:{port}/', page


def run_sample(url: str, screenshot: str | None = None, timeout_s: float = 300,
               check_error: bool = False, threshold: float | None = None,
               expect_after_threshold: str = 'Changed area',
               prompts: list[str] | None = None, bad_prompts: str | None = None) -> dict:
  """Loads the page, runs the default sample pair, waits for the result; what arrived.

  Returns the area text, the overlay image's natural size (0 if it did not load) and its
  pixels (`overlay`, uint8 RGB as served), the legend's entries (prompt, share text and the
  swatch's computed colour), the download list's text, error toasts and the URLs requested
  from anywhere but the app; with `prompts`, they are typed into the prompt box (one per line)
  first; with `threshold`, also the area after moving the slider there (waiting up to a minute
  for `expect_after_threshold` to show); with `bad_prompts`, the message shown when the box
  holds that text; with `check_error`, the message shown when "Upload" is run without files.
  """
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  from segchange_jax.app import ui  # pylint: disable=g-import-not-at-top
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                args=['--no-sandbox', '--disable-dev-shm-usage'])
    try:
      tab = browser.new_page(viewport={'width': 1400, 'height': 900})
      origin = url.rstrip('/')
      external = []  # requests leaving the app's server: an offline page makes none
      tab.on('request', lambda r: external.append(r.url)
             if not r.url.startswith((origin, 'data:', 'blob:')) else None)
      tab.goto(url, wait_until='load', timeout=60_000)
      tab.wait_for_selector('#run', timeout=60_000)
      if prompts:
        tab.fill('#prompt textarea', '\n'.join(prompts))
      tab.click('#run', timeout=60_000)
      tab.wait_for_function(  # the result, or an error message (then fail at once)
          "() => (document.querySelector('#area')?.innerText || '').includes('Changed area')"
          " || document.querySelector('.toast-body')", timeout=timeout_s * 1000)
      if tab.query_selector('.toast-body'):
        raise AssertionError('the page shows an error: ' + tab.inner_text('.toast-body'))
      tab.wait_for_function(
          "() => { const i = document.querySelector('#overlay img');"
          " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
      tab.wait_for_function(
          "() => (document.querySelector('#downloads')?.innerText || '').includes('change_mask')",
          timeout=60_000)
      got = dict(area=tab.inner_text('#area'),
                 overlay_size=tab.evaluate("() => { const i = document.querySelector("
                                           "'#overlay img'); return [i.naturalWidth, "
                                           "i.naturalHeight]; }"),
                 downloads=tab.inner_text('#downloads'),
                 overlay=_image_pixels(tab.get_attribute('#overlay img', 'src'), origin),
                 legend=tab.evaluate(
                     "() => Array.from(document.querySelectorAll('#legend .legend-entry'))"
                     ".map(e => ({prompt: e.querySelector('.legend-prompt').innerText,"
                     " share: e.querySelector('.legend-share').innerText,"
                     " colour: getComputedStyle(e.querySelector('.legend-swatch'))"
                     ".backgroundColor}))"),
                 errors=tab.evaluate("() => Array.from(document.querySelectorAll("
                                     "'.toast-body')).map(e => e.innerText)"),
                 external_requests=external)
      if screenshot:
        tab.wait_for_timeout(500)  # let the progress bar fade
        tab.screenshot(path=screenshot, full_page=True)
      if threshold is not None:  # move the slider: the area follows without a new run
        slider = tab.locator('#threshold input[type=range]')
        slider.fill(str(threshold))
        slider.dispatch_event('pointerup')
        try:  # each slider event re-renders; wait for the one at `threshold`
          tab.wait_for_function(
              "want => (document.querySelector('#area')?.innerText || '').includes(want)",
              arg=expect_after_threshold, timeout=60_000)
        except Exception:  # pylint: disable=broad-except  # the caller asserts on the text
          pass
        got['area_after_threshold'] = tab.inner_text('#area')
      if bad_prompts is not None:  # e.g. a repeated prompt: one message on the page
        tab.fill('#prompt textarea', bad_prompts)
        tab.click('#run')
        tab.wait_for_selector('.toast-body', timeout=60_000)
        got['prompt_error_toast'] = tab.inner_text('.toast-body')
        for close in tab.query_selector_all('.toast-close'):
          close.click()
        tab.wait_for_function("() => !document.querySelector('.toast-body')", timeout=30_000)
      if check_error:  # "Upload" chosen with nothing uploaded: one message on the page
        tab.click('#sample input')
        tab.get_by_role('option', name=ui.UPLOAD).click(timeout=30_000)
        tab.click('#run')
        tab.wait_for_selector('.toast-body', timeout=60_000)
        got['error_toast'] = tab.inner_text('.toast-body')
      return got
    finally:
      browser.close()


def _image_pixels(src: str | None, origin: str):
  """uint8 RGB array of an <img> src served by the app (a URL under `origin` or a data: URL)."""
  import base64  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not src:
    return None
  if src.startswith('data:'):
    data = base64.b64decode(src.split(',', 1)[1])
  else:
    if src.startswith('/'):
      src = origin + src
    with urllib.request.urlopen(src, timeout=30) as r:
      data = r.read()
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert('RGB'))


def main() -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--embeddings', default=None)
  parser.add_argument('--out', required=True, help='screenshot PNG')
  parser.add_argument('--prompt', action='append', default=None,
                      help='a prompt to type (repeat for several: one colour each)')
  args = parser.parse_args()
  if chromium() is None:
    sys.exit('error: Chromium is not installed: apt-get install -y chromium')
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  detector = predictor.ChangeDetector.from_checkpoint(args.checkpoint, embeddings=args.embeddings)
  with tempfile.TemporaryDirectory() as workroot:
    url, page = serve(detector, workroot)
    try:
      got = run_sample(url, screenshot=args.out, prompts=args.prompt)
    finally:
      page.close()
  # 256 colours keep the picture for docs/ at about a third of the size.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(args.out) as im:
    small = im.convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT,
                                       dither=Image.Dither.NONE)
  small.save(args.out, optimize=True)
  print({k: v for k, v in got.items() if k != 'overlay'})


if __name__ == '__main__':
  main()
