"""The app's page (gradio Blocks) and its two steps as plain functions.

`detect` runs the model once over a pair (the windowed engine of `infer`, probabilities kept
in a memory-mapped file on disk, so a large raster never sits in RAM as floats); `render`
thresholds those probabilities, draws the overlay, measures the changed area and writes the
downloads (mask: Cloud-Optimized GeoTIFF for georeferenced inputs, PNG otherwise; polygons:
GeoPackage, plus RFC 7946 GeoJSON when georeferenced). Moving the threshold slider calls only
`render`. `build` wires both to the page; user errors reach the page as one gr.Error line.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable
import warnings

import numpy as np

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax.app import samples
from segchange_jax.inference import formats
from segchange_jax.inference import pipeline
from segchange_jax.inference import raster_io
from segchange_jax.inference import sliding_window
from segchange_jax.inference import vectors

DISPLAY_SIDE = 768   # longest side of the images shown on the page (px)
BLOCK_ROWS = 512     # rows per pass over the probability file
UPLOAD = 'Upload A and B below'
Progress = Callable[[float, str], None]


@dataclasses.dataclass
class Run:
  """One `detect` result: where its probabilities live and what `render` needs."""
  workdir: str
  height: int
  width: int
  channels: int
  crs_wkt: str | None       # None: not georeferenced
  transform: tuple | None   # affine coefficients (a, b, c, d, e, f)
  prompt: str
  a_view: np.ndarray        # uint8 RGB, at most DISPLAY_SIDE px
  b_view: np.ndarray
  tags: dict

  @property
  def probs_path(self) -> str:
    return os.path.join(self.workdir, 'probs.f32')

  @property
  def valid_path(self) -> str:
    return os.path.join(self.workdir, 'valid.u8')

  @property
  def georeferenced(self) -> bool:
    return self.crs_wkt is not None

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    probs = np.memmap(self.probs_path, np.float32, 'r',
                      shape=(self.height, self.width, self.channels))
    valid = np.memmap(self.valid_path, np.bool_, 'r', shape=(self.height, self.width))
    return probs, valid


@dataclasses.dataclass
class Rendered:
  """What the page shows for one threshold."""
  overlay: np.ndarray        # uint8 RGB at the display size: change in red over B
  changed_px: int
  valid_px: int
  area_text: str             # markdown
  files: list[str]           # mask and polygon downloads


class _MemmapSink:
  """The engine's finished rows -> the run's probability and validity files."""
  block_rows = 1

  def __init__(self, run: Run):
    shape = (run.height, run.width)
    self.probs = np.memmap(run.probs_path, np.float32, 'w+', shape=shape + (run.channels,))
    self.valid = np.memmap(run.valid_path, np.bool_, 'w+', shape=shape)

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    self.probs[row0:row0 + probs.shape[0]] = probs
    self.valid[row0:row0 + probs.shape[0]] = valid

  def close(self) -> None:
    self.probs.flush()
    self.valid.flush()


class _Bar:
  """The tqdm surface sliding_window.run_scene uses, reporting to a `Progress` callback."""

  def __init__(self, total: int, report: Progress | None):
    self.total, self.n, self.desc, self.report = max(total, 1), 0, 'windows', report

  def set_description(self, desc: str) -> None:
    self.desc = desc

  def update(self, n: int) -> None:
    self.n += n
    if self.report is not None:
      self.report(self.n / self.total, f'{self.desc}: {self.n}/{self.total}')


def resolve_inputs(sample: str | None, file_a: str | None, file_b: str | None
                   ) -> tuple[str, str]:
  """The A and B paths: a bundled sample's, or the two uploads."""
  if sample and sample != UPLOAD:
    return samples.by_name(sample).paths
  if not file_a or not file_b:
    missing = ' and '.join(n for n, f in (('A', file_a), ('B', file_b)) if not f)
    raise cli.UsageError(f'no image {missing} uploaded: upload both dates (PNG, JPEG or '
                         'GeoTIFF) or pick a sample pair')
  return file_a, file_b


def open_pair(a: str, b: str, align: bool = False):
  """The engine's PairSource for two rasters or two plain images (as `infer` opens them)."""
  names = (os.path.basename(a), os.path.basename(b))
  if raster_io.is_plain(a) != raster_io.is_plain(b):
    raise cli.UsageError(f'A ({names[0]}) and B ({names[1]}): give two GeoTIFFs or two '
                         'PNG/JPEG images, not one of each')
  if raster_io.is_plain(a):
    return raster_io.ArrayPair(a, b)
  return raster_io.RasterPair(a, b, align=align)


def display_shape(height: int, width: int) -> tuple[int, int]:
  scale = min(1.0, DISPLAY_SIDE / max(height, width))
  return max(1, round(height * scale)), max(1, round(width * scale))


def detect(detector, a: str, b: str, prompt: str | None, workdir: str, align: bool = False,
           progress: Progress | None = None) -> Run:
  """Runs `detector` over the pair A, B (paths) with the windowed engine; probabilities on disk.

  Window, overlap and batch come from the checkpoint config (infer.*), as in `infer`.
  """
  config = detector.config
  prompt = (prompt or '').strip() or config.data.prompt
  source = open_pair(a, b, align)
  try:
    if progress is not None:
      progress(0.0, 'encoding the prompt')
    predict = detector.predictor(prompt)
    window, overlap = pipeline.clamp_window(int(config.infer.window), int(config.infer.overlap),
                                         source.height, source.width, quiet=True)
    channels = 1 if config.model.num_classes == 1 else int(config.model.num_classes)
    a_view, b_view = source.overview(display_shape(source.height, source.width))
    transform = source.transform
    run = Run(workdir=workdir, height=source.height, width=source.width, channels=channels,
              crs_wkt=source.crs.to_wkt() if source.crs is not None else None,
              transform=tuple(transform)[:6] if transform is not None else None,
              prompt=prompt, a_view=a_view, b_view=b_view,
              tags=dict(CHECKPOINT=detector.checkpoint, PROMPT=prompt, WINDOW=window,
                        OVERLAP=overlap))
    os.makedirs(workdir, exist_ok=True)
    sink = _MemmapSink(run)
    windows = len(sliding_window.Grid(source.height, source.width, window, overlap).windows())
    if progress is not None:  # the first call compiles (seconds); later ones reuse it
      progress(0.0, f'model on {windows} windows of {window} px (compiling on first use)')
    sliding_window.run_scene(source, predict, sink, window=window, overlap=overlap,
                    batch_size=int(config.infer.batch_size), channels=channels,
                    progress=False, bar=_Bar(windows, progress))
    sink.close()
    return run
  finally:
    source.close()


def area_text(changed_px: int, valid_px: int, crs_wkt: str | None,
              transform: tuple | None) -> str:
  """'Changed area: N px (p % of valid pixels)', plus map units for georeferenced inputs."""
  share = 100.0 * changed_px / valid_px if valid_px else 0.0
  text = f'**Changed area: {changed_px:,} px** ({share:.2f} % of {valid_px:,} valid px)'
  if crs_wkt is None or transform is None:
    return text + '; no georeferencing, so no map area'
  from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top
  a, b, _, d, e, _ = transform
  area = changed_px * abs(a * e - b * d)  # CRS units^2
  crs = CRS.from_wkt(crs_wkt)
  if crs.is_geographic:
    return text + f' = {area:.6g} degree² (geographic CRS: degrees² are not an equal-area unit)'
  try:
    unit, factor = crs.linear_units_factor
  except Exception:  # pylint: disable=broad-except  # CRS without a usable unit definition
    return text + f' = {area:,.6g} CRS units²'
  m2 = area * factor ** 2
  extra = '' if factor == 1.0 else f' = {area:,.6g} {unit}²'
  return text + f'{extra} = **{m2:,.1f} m²** ({m2 / 1e4:,.4f} ha)'


def _overlay(b_view: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Change (any class > 0, not nodata) in semi-transparent red over B, at B's view size."""
  import cv2  # pylint: disable=g-import-not-at-top
  small = cv2.resize(mask, (b_view.shape[1], b_view.shape[0]), interpolation=cv2.INTER_NEAREST)
  change = (small > 0) & (small != raster_io.MASK_NODATA)
  out = b_view.astype(np.float32) * 0.75
  out[change] = 0.35 * out[change] + 0.65 * np.array([255, 0, 0], np.float32)
  return np.clip(out, 0, 255).astype(np.uint8)


def render(run: Run, threshold: float, out_dir: str) -> Rendered:
  """Thresholds the run's probabilities; writes the mask and polygons into `out_dir`."""
  from affine import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top
  pipeline.check_settings(threshold=float(threshold))
  probs, valid = run.arrays()
  crs = CRS.from_wkt(run.crs_wkt) if run.georeferenced else None
  transform = Affine(*run.transform) if run.transform is not None else None
  os.makedirs(out_dir, exist_ok=True)
  mask = np.empty((run.height, run.width), np.uint8)  # 1 byte/px, as infer's polygon pass
  if run.georeferenced:
    mask_path = os.path.join(out_dir, 'change_mask.tif')
    sink = raster_io.GeoTiffSink(atomic.temp_name(mask_path), run.height, run.width, crs,
                                transform, run.channels, False, float(threshold),
                                dict(run.tags, THRESHOLD=threshold))
  else:
    mask_path = os.path.join(out_dir, 'change_mask.png')
    sink = raster_io.PlainSink(mask_path, run.height, run.width, float(threshold))
  try:
    for r0 in range(0, run.height, BLOCK_ROWS):
      p, v = np.asarray(probs[r0:r0 + BLOCK_ROWS]), np.asarray(valid[r0:r0 + BLOCK_ROWS])
      mask[r0:r0 + p.shape[0]] = raster_io.encode(p, v, False, float(threshold))[0]
      sink.write(r0, p, v)
    sink.close()
    if run.georeferenced:
      raster_io.write_cog(sink.path, mask_path, False)
  finally:
    if run.georeferenced and os.path.exists(sink.path):
      os.remove(sink.path)
  files = [mask_path]
  vector_paths = [os.path.join(out_dir, 'change_polygons.gpkg')]
  if run.georeferenced:  # RFC 7946 GeoJSON is WGS 84: only for georeferenced inputs
    vector_paths.append(os.path.join(out_dir, 'change_polygons.geojson'))
  for path in vector_paths:
    with warnings.catch_warnings():
      # Plain images have no CRS: their GeoPackage is in pixel coordinates on purpose.
      warnings.filterwarnings('ignore', message=".*'crs' was not provided")
      formats.lookup(path, formats.VECTOR, 'polygons').write(
          path, vectors.iter_features(mask, transform, raster_io.MASK_NODATA), crs)
    files.append(path)
  changed = int(np.count_nonzero((mask > 0) & (mask != raster_io.MASK_NODATA)))
  valid_px = int(np.count_nonzero(mask != raster_io.MASK_NODATA))
  return Rendered(overlay=_overlay(run.b_view, mask), changed_px=changed, valid_px=valid_px,
                  area_text=area_text(changed, valid_px, run.crs_wkt, run.transform),
                  files=files)


def user_message(exc: BaseException, paths: tuple[str | None, ...] = ()) -> str:
  """One line for the page: upload folders (gradio's temp dirs) cut down to file names."""
  text = cli.one_line(exc)
  for p in paths:
    if p:
      text = text.replace(os.fspath(p), os.path.basename(os.fspath(p)))
  # The engine's messages name infer's flags; on the page these are form fields.
  return (text.replace('Pass --align', 'Tick "Align B onto A"')
          .replace('--embeddings', 'the --embeddings file').replace('--prompt', 'prompt'))


# ---------------------------------------------------------------------------------- page


def shown_path(path: str) -> str:
  """`path` as the user would type it: relative to the working directory when inside it."""
  rel = os.path.relpath(path)
  return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def build(detector, workroot: str) -> Any:
  """The gradio Blocks page for `detector`; per-session runs live under `workroot`."""
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # offline: no calls home
  import gradio as gr  # pylint: disable=g-import-not-at-top

  config = detector.config
  errors = cli.USER_ERRORS
  os.makedirs(workroot, exist_ok=True)

  def run_pair(sample, file_a, file_b, prompt, threshold, align, previous,
               progress=gr.Progress()):
    if previous is not None:  # one run per session on disk: drop the last one
      shutil.rmtree(previous.workdir, ignore_errors=True)
    workdir = tempfile.mkdtemp(prefix='run_', dir=workroot)
    try:
      a, b = resolve_inputs(sample, file_a, file_b)
      run = detect(detector, a, b, prompt, workdir, bool(align),
                   progress=lambda f, d: progress(f, desc=d))
      shown = render(run, threshold, os.path.join(workdir, 'out'))
    except errors as e:
      shutil.rmtree(workdir, ignore_errors=True)
      raise gr.Error(user_message(e, (file_a, file_b)), print_exception=False) from None
    return (run, run.a_view, run.b_view, shown.overlay, (run.a_view, run.b_view),
            shown.area_text, shown.files)

  def rethreshold(run, threshold):
    if run is None:
      return gr.skip(), gr.skip(), gr.skip()
    try:
      shown = render(run, threshold, tempfile.mkdtemp(prefix='out_', dir=run.workdir))
    except errors as e:
      raise gr.Error(user_message(e), print_exception=False) from None
    return shown.overlay, shown.area_text, shown.files

  names = [s.name for s in samples.SAMPLES]
  with gr.Blocks(title='segchange_jax: change detection') as page:
    gr.Markdown('## segchange_jax: text-prompted change detection\n'
                f'Checkpoint `{shown_path(detector.checkpoint)}`. Pick a sample pair or upload '
                'two dates (PNG, JPEG or GeoTIFF on one pixel grid), type what should count as '
                'change, then **Detect change**. Large rasters run window by window.')
    run_state = gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        sample = gr.Dropdown([*names, UPLOAD], value=names[0], label='Input pair',
                             elem_id='sample')
        with gr.Row():
          file_a = gr.File(label='A (earlier)', file_types=['.png', '.jpg', '.jpeg', '.tif',
                                                            '.tiff'], type='filepath',
                           height=120, elem_id='upload_a')
          file_b = gr.File(label='B (later)', file_types=['.png', '.jpg', '.jpeg', '.tif',
                                                          '.tiff'], type='filepath',
                           height=120, elem_id='upload_b')
        prompt = gr.Textbox(value=config.data.prompt, label='Prompt', elem_id='prompt')
        threshold = gr.Slider(0.01, 0.99, value=float(config.infer.threshold), step=0.01,
                              label='Threshold (change if probability > threshold)',
                              elem_id='threshold')
        align = gr.Checkbox(False, label='Align B onto A (GeoTIFFs on different grids)')
        button = gr.Button('Detect change', variant='primary', elem_id='run')
        area = gr.Markdown('', elem_id='area')
        downloads = gr.File(label='Downloads: mask and polygons', file_count='multiple',
                            interactive=False, elem_id='downloads')
      with gr.Column(scale=3):
        with gr.Row():
          image_a = gr.Image(label='A', format='png', interactive=False, elem_id='image_a')
          image_b = gr.Image(label='B', format='png', interactive=False, elem_id='image_b')
          overlay = gr.Image(label='Change on B (red)', format='png', interactive=False,
                             elem_id='overlay')
        swipe = gr.ImageSlider(label='Swipe between A and B', format='png', interactive=False,
                               elem_id='swipe')
    button.click(run_pair, [sample, file_a, file_b, prompt, threshold, align, run_state],
                 [run_state, image_a, image_b, overlay, swipe, area, downloads])
    threshold.release(rethreshold, [run_state, threshold], [overlay, area, downloads])
  return page


def launch(page, host: str, port: int, block: bool = True):
  """Serves `page` on host:port, offline (no share link, no analytics, no server rendering)."""
  page.queue(default_concurrency_limit=1)  # one model: runs wait in line
  return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                     prevent_thread_lock=not block, quiet=not block, footer_links=['api'],
                     show_error=True)
