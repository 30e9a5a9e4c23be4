"""The app's page (gradio Blocks) and its two steps as plain functions.

`detect` runs the model once over a pair (the windowed engine of `infer`, probabilities kept
in a memory-mapped file on disk, so a large raster never sits in RAM as floats); `render`
thresholds those probabilities, draws the overlay, measures the changed area and writes the
downloads (mask: Cloud-Optimized GeoTIFF for georeferenced inputs, PNG otherwise; polygons:
GeoPackage, plus RFC 7946 GeoJSON when georeferenced). Moving the threshold slider calls only
`render`. `build` wires both to the page; user errors reach the page as one gr.Error line.

Several prompts (one per line of the prompt box, `parse_prompts`) run as ONE multi-prompt
prediction (the model's trunk once per window, the mask head for all prompts:
ChangeDetector.predictor(prompts=...)); `render` then draws each prompt's mask in its own colour
(inference/scene_outputs.PROMPT_RGB, the colours of `infer --preview`, later prompts on top) with
a legend (swatch, prompt, marked area in % of the valid pixels), and writes the downloads as
`infer` does for several prompts: one mask band per prompt in the GeoTIFF (band description =
prompt; plain images: one PNG per prompt) and one polygon layer with a `prompt` attribute.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
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
from segchange_jax.inference import scene_outputs
from segchange_jax.inference import sliding_window
from segchange_jax.inference import vectors

DISPLAY_SIDE = 768   # longest side of the images shown on the page (px)
BLOCK_ROWS = 512     # rows per pass over the probability file
UPLOAD = 'Upload A and B below'
# One distinct overlay colour per prompt: the page takes at most this many prompts.
MAX_PROMPTS = len(scene_outputs.PROMPT_RGB)
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
  prompt: str               # the first (or only) prompt
  a_view: np.ndarray        # uint8 RGB, at most DISPLAY_SIDE px
  b_view: np.ndarray
  tags: dict
  prompts: tuple[str, ...] = ()  # every prompt, in order (default: `prompt` alone)

  def __post_init__(self):
    self.prompts = tuple(self.prompts) or (self.prompt,)
    if self.channels % len(self.prompts):
      raise ValueError(f'{self.channels} probability channels do not split into '
                       f'{len(self.prompts)} prompts')

  @property
  def classes(self) -> int:
    """Probability channels per prompt (1 binary, K classes)."""
    return self.channels // len(self.prompts)

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


@dataclasses.dataclass(frozen=True)
class LegendEntry:
  """One prompt's line of the legend: its overlay colour and marked area."""
  prompt: str
  rgb: tuple[int, int, int]
  changed_px: int
  share: float               # % of the valid pixels

  @property
  def hex(self) -> str:
    return '#%02x%02x%02x' % self.rgb


@dataclasses.dataclass
class Rendered:
  """What the page shows for one threshold."""
  overlay: np.ndarray        # uint8 RGB at the display size: each prompt's change in its colour
  changed_px: int            # of the first prompt (the only one, usually)
  valid_px: int
  area_text: str             # markdown
  files: list[str]           # mask and polygon downloads
  legend: list[LegendEntry] = dataclasses.field(default_factory=list)  # one per prompt

  @property
  def legend_html(self) -> str:
    return legend_html(self.legend)


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


def parse_prompts(text: str | None, default: str) -> list[str]:
  """The prompt box -> its prompts, one per line (surrounding spaces dropped); a blank box
  means `default` (the checkpoint config's prompt). An empty line between prompts, a repeated
  prompt (after collapsing spaces) or more than MAX_PROMPTS is one cli.UsageError."""
  lines = (text or '').strip().splitlines()
  if not lines:
    return [default]
  prompts: list[str] = []
  seen: dict[str, int] = {}
  for number, line in enumerate(lines, 1):
    prompt = line.strip()
    if not prompt:
      raise cli.UsageError(f'prompt line {number} is empty: write one prompt per line, with no '
                           'blank line between them')
    key = ' '.join(prompt.split())
    if key in seen:
      raise cli.UsageError(f'prompt line {number} ({prompt!r}) repeats line {seen[key]}: give '
                           'each prompt once')
    seen[key] = number
    prompts.append(prompt)
  if len(prompts) > MAX_PROMPTS:
    raise cli.UsageError(f'{len(prompts)} prompts: the page draws at most {MAX_PROMPTS} (one '
                         'colour each); remove some, or run the others separately')
  return prompts


def display_shape(height: int, width: int) -> tuple[int, int]:
  scale = min(1.0, DISPLAY_SIDE / max(height, width))
  return max(1, round(height * scale)), max(1, round(width * scale))


def detect(detector, a: str, b: str, prompt: str | None, workdir: str, align: bool = False,
           progress: Progress | None = None) -> Run:
  """Runs `detector` over the pair A, B (paths) with the windowed engine; probabilities on disk.

  `prompt`: the prompt box's text, one prompt per line (`parse_prompts`); several prompts run
  as one multi-prompt prediction (probabilities prompt-major, K channels per prompt). Window,
  overlap and batch come from the checkpoint config (infer.*), as in `infer`.
  """
  config = detector.config
  prompts = parse_prompts(prompt, config.data.prompt)  # before any file is opened
  source = open_pair(a, b, align)
  try:
    if progress is not None:
      progress(0.0, 'encoding the prompt' if len(prompts) == 1 else
               f'encoding {len(prompts)} prompts')
    if len(prompts) == 1:
      predict = detector.predictor(prompts[0])
      prompt_tags = dict(PROMPT=prompts[0])
    else:  # one model pass per window batch for all prompts
      predict = detector.predictor(prompts=prompts)
      prompt_tags = dict(PROMPTS=json.dumps(prompts))
    window, overlap = pipeline.clamp_window(int(config.infer.window), int(config.infer.overlap),
                                         source.height, source.width, quiet=True)
    channels = 1 if config.model.num_classes == 1 else int(config.model.num_classes)
    a_view, b_view = source.overview(display_shape(source.height, source.width))
    transform = source.transform
    run = Run(workdir=workdir, height=source.height, width=source.width,
              channels=channels * len(prompts),
              crs_wkt=source.crs.to_wkt() if source.crs is not None else None,
              transform=tuple(transform)[:6] if transform is not None else None,
              prompt=prompts[0], a_view=a_view, b_view=b_view,
              tags=dict(CHECKPOINT=detector.checkpoint, **prompt_tags, WINDOW=window,
                        OVERLAP=overlap), prompts=tuple(prompts))
    os.makedirs(workdir, exist_ok=True)
    sink = _MemmapSink(run)
    windows = len(sliding_window.Grid(source.height, source.width, window, overlap).windows())
    if progress is not None:  # the first call compiles (seconds); later ones reuse it
      progress(0.0, f'model on {windows} windows of {window} px (compiling on first use)')
    sliding_window.run_scene(source, predict, sink, window=window, overlap=overlap,
                    batch_size=int(config.infer.batch_size), channels=run.channels,
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
  from affine import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top
  area = changed_px * abs(Affine(*transform[:6]).determinant)  # CRS units^2
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


def prompt_colour(index: int) -> tuple[int, int, int]:
  """Overlay colour of prompt `index` (red for the first, as with one prompt)."""
  return tuple(int(c) for c in scene_outputs.PROMPT_RGB[index % len(scene_outputs.PROMPT_RGB)])


def _overlay(b_view: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Change (any class > 0, not nodata) in semi-transparent colour over B, at B's view size:
  `masks` [H, W] in red, or [P, H, W] with prompt i in prompt_colour(i), later ones on top."""
  import cv2  # pylint: disable=g-import-not-at-top
  out = b_view.astype(np.float32) * 0.75
  for i, mask in enumerate(masks[None] if masks.ndim == 2 else masks):
    small = cv2.resize(mask, (b_view.shape[1], b_view.shape[0]),
                       interpolation=cv2.INTER_NEAREST)
    change = (small > 0) & (small != raster_io.MASK_NODATA)
    out[change] = 0.35 * out[change] + 0.65 * np.array(prompt_colour(i), np.float32)
  return np.clip(out, 0, 255).astype(np.uint8)


def legend_html(entries: list[LegendEntry]) -> str:
  """The legend under the overlay: per prompt a colour swatch, the prompt and its marked area
  (the prompt is user text: escaped)."""
  rows = ''.join(
      '<div class="legend-entry" style="display:flex;align-items:center;gap:0.6em;'
      'margin:0.25em 0;font-size:1rem">'
      f'<span class="legend-swatch" data-rgb="{e.hex}" style="display:inline-block;'
      f'width:1.2em;height:1.2em;flex:none;background:{e.hex};border:1px solid #333;'
      'border-radius:3px"></span>'
      f'<span class="legend-prompt">{html.escape(e.prompt)}</span>'
      f'<span class="legend-share" style="margin-left:auto;font-variant-numeric:tabular-nums">'
      f'{e.share:.2f} %</span></div>' for e in entries)
  return f'<div class="legend"><b>Legend</b> (marked area, % of the image){rows}</div>'


def render(run: Run, threshold: float, out_dir: str) -> Rendered:
  """Thresholds the run's probabilities; writes the mask and polygons into `out_dir`.

  One prompt: change_mask.tif (or .png) and change_polygons.*, as `infer` writes them. Several:
  one mask band per prompt in change_mask.tif (band description = prompt; plain images:
  change_mask_<i>.png per prompt, i from 1) and one polygon layer with a `prompt` attribute.
  """
  from affine import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.crs import CRS  # pylint: disable=g-import-not-at-top
  pipeline.check_settings(threshold=float(threshold))
  probs, valid = run.arrays()
  crs = CRS.from_wkt(run.crs_wkt) if run.georeferenced else None
  transform = Affine(*run.transform) if run.transform is not None else None
  os.makedirs(out_dir, exist_ok=True)
  prompts, k = run.prompts, run.classes
  several = len(prompts) > 1
  # 1 byte/px per prompt, as infer's polygon pass.
  masks = np.empty((len(prompts), run.height, run.width), np.uint8)
  if run.georeferenced:
    mask_paths = [os.path.join(out_dir, 'change_mask.tif')]
    sinks = [raster_io.GeoTiffSink(atomic.temp_name(mask_paths[0]), run.height, run.width, crs,
                                   transform, run.channels, False, float(threshold),
                                   dict(run.tags, THRESHOLD=threshold),
                                   **({'prompts': list(prompts)} if several else {}))]
  elif several:
    mask_paths = [os.path.join(out_dir, f'change_mask_{i + 1}.png') for i in range(len(prompts))]
    sinks = [raster_io.PlainSink(path, run.height, run.width, float(threshold))
             for path in mask_paths]
  else:
    mask_paths = [os.path.join(out_dir, 'change_mask.png')]
    sinks = [raster_io.PlainSink(mask_paths[0], run.height, run.width, float(threshold))]
  try:
    for r0 in range(0, run.height, BLOCK_ROWS):
      p, v = np.asarray(probs[r0:r0 + BLOCK_ROWS]), np.asarray(valid[r0:r0 + BLOCK_ROWS])
      for i in range(len(prompts)):
        masks[i, r0:r0 + p.shape[0]] = raster_io.encode(p[..., i * k:(i + 1) * k], v, False,
                                                        float(threshold))[0]
      if len(sinks) == 1:
        sinks[0].write(r0, p, v)
      else:  # one PNG per prompt
        for i, sink in enumerate(sinks):
          sink.write(r0, p[..., i * k:(i + 1) * k], v)
    for sink in sinks:
      sink.close()
    if run.georeferenced:
      raster_io.write_cog(sinks[0].path, mask_paths[0], False)
  finally:
    if run.georeferenced and os.path.exists(sinks[0].path):
      os.remove(sinks[0].path)
  files = list(mask_paths)
  vector_paths = [os.path.join(out_dir, 'change_polygons.gpkg')]
  if run.georeferenced:  # RFC 7946 GeoJSON is WGS 84: only for georeferenced inputs
    vector_paths.append(os.path.join(out_dir, 'change_polygons.geojson'))
  for path in vector_paths:
    with warnings.catch_warnings():
      # Plain images have no CRS: their GeoPackage is in pixel coordinates on purpose.
      warnings.filterwarnings('ignore', message=".*'crs' was not provided")
      writer = formats.lookup(path, formats.VECTOR, 'polygons')
      if several:
        features = itertools.chain.from_iterable(
            vectors.iter_features(m, transform, raster_io.MASK_NODATA, prompt=p)
            for m, p in zip(masks, prompts))
        writer.write(path, features, crs, prompt_field=True)
      else:
        writer.write(path, vectors.iter_features(masks[0], transform, raster_io.MASK_NODATA), crs)
    files.append(path)
  valid_px = int(np.count_nonzero(masks[0] != raster_io.MASK_NODATA))
  changed = [int(np.count_nonzero((m > 0) & (m != raster_io.MASK_NODATA))) for m in masks]
  legend = [LegendEntry(p, prompt_colour(i), c, 100.0 * c / valid_px if valid_px else 0.0)
            for i, (p, c) in enumerate(zip(prompts, changed))]
  if several:
    text = '\n'.join(f'{i + 1}. `{p.replace("`", chr(39))}`: '
                     + area_text(c, valid_px, run.crs_wkt, run.transform)
                     for i, (p, c) in enumerate(zip(prompts, changed)))
  else:
    text = area_text(changed[0], valid_px, run.crs_wkt, run.transform)
  return Rendered(overlay=_overlay(run.b_view, masks), changed_px=changed[0], valid_px=valid_px,
                  area_text=text, files=files, legend=legend)


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
            shown.area_text, shown.legend_html, shown.files)

  def rethreshold(run, threshold):
    if run is None:
      return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
      shown = render(run, threshold, tempfile.mkdtemp(prefix='out_', dir=run.workdir))
    except errors as e:
      raise gr.Error(user_message(e), print_exception=False) from None
    return shown.overlay, shown.area_text, shown.legend_html, shown.files

  names = [s.name for s in samples.SAMPLES]
  with gr.Blocks(title='segchange_jax: change detection') as page:
    gr.Markdown('## segchange_jax: text-prompted change detection\n'
                f'Checkpoint `{shown_path(detector.checkpoint)}`. Pick a sample pair or upload '
                'two dates (PNG, JPEG or GeoTIFF on one pixel grid), type what should count as '
                'change (several prompts: one per line, each drawn in its own colour), then '
                '**Detect change**. Large rasters run window by window.')
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
        prompt = gr.Textbox(value=config.data.prompt, label=f'Prompts (one per line, up to '
                            f'{MAX_PROMPTS}; all answered in one pass)', lines=3, max_lines=8,
                            elem_id='prompt')
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
          overlay = gr.Image(label='Change on B (colours: legend)', format='png',
                             interactive=False, elem_id='overlay')
        legend = gr.HTML('', elem_id='legend')
        swipe = gr.ImageSlider(label='Swipe between A and B', format='png', interactive=False,
                               elem_id='swipe')
    button.click(run_pair, [sample, file_a, file_b, prompt, threshold, align, run_state],
                 [run_state, image_a, image_b, overlay, swipe, area, legend, downloads])
    threshold.release(rethreshold, [run_state, threshold], [overlay, area, legend, downloads])
  return page


def launch(page, host: str, port: int, block: bool = True):
  """Serves `page` on host:port, offline (no share link, no analytics, no server rendering)."""
  page.queue(default_concurrency_limit=1)  # one model: runs wait in line
  return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                     prevent_thread_lock=not block, quiet=not block, footer_links=['api'],
                     show_error=True)
