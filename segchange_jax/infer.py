r"""Change detection on a pair of large rasters (or plain images) with a trained checkpoint.

  python -m segchange_jax.infer --checkpoint CKPT --a A.tif --b B.tif \
      --prompt "Buildings with changes" --out change.tif [--polygons change.geojson]

--checkpoint: anything segchange_jax.api.load_variables reads (training checkpoints, a
convert_torch output, an export bundle; an upstream .pth with --config). Only the model
variables are read (not the optimizer state). --window, --overlap, --batch, --threshold and
--prompt default to the checkpoint config's infer.window / infer.overlap / infer.batch_size /
infer.threshold and data.prompt. A window larger than the raster is clamped (with a warning).
The prompt embedding comes from --embeddings (an .npz from segchange_jax.embed_prompts or an
export bundle's prompts.npz), else the prompt is encoded with the checkpoint config's text
settings (or --text_model).

Outputs never replace an input (refused) nor an existing file (unless --overwrite); each is
written under a temporary name beside it and renamed when the whole run succeeded
(segchange_jax.atomic). The format follows the extension; other extensions are refused:
- `--out X.tif`: Cloud-Optimized GeoTIFF (256 px tiles, overviews, deflate) with A's CRS and
  transform, tags CHECKPOINT, PROMPT, THRESHOLD, WINDOW, OVERLAP, SEGCHANGE_JAX_VERSION. Default
  a uint8 mask with a colour table: 0 no change, 1 change (class id for multi-class models),
  255 nodata. `--probabilities`: float32 probabilities instead (one band per class, nodata NaN).
- `--out X.png`: 0/255 mask (nodata written as 0), only for inputs without georeferencing.
- `--probability_out P.tif`: float32 change probabilities as a second COG beside the mask.
- `--polygons V.geojson|V.gpkg|V.fgb` (repeatable): change regions (after `--postprocess`) with
  properties value, area (map units^2), area_px; GeoJSON is RFC 7946 (WGS 84), GeoPackage and
  FlatGeobuf keep the raster CRS (segchange_jax.vectors).
- `--preview Q.png`: a small picture A | B | overlay (change red on a darkened B).
With --probabilities, --postprocess only shapes the polygons (the raster keeps raw probabilities).
Inputs: a raster file or three single-band files 'R.TIF,G.TIF,B.TIF' per date; band and 16-bit
rules in segchange_jax/imagery.py, nodata and grid rules in segchange_jax/scene_io.py; A and B
must share a pixel grid unless --align. Windowing and blending: segchange_jax/scene.py.
Example, Landsat-8 scenes of adjacent WRS rows (B stored as single-band files, 0 = fill):

  python -m segchange_jax.infer --checkpoint CKPT --a LC08_..._224078_..._RT.TIF --bands 3,2,1 \
      --b LC08_..._224077_..._B4.TIF,LC08_..._224077_..._B3.TIF,LC08_..._224077_..._B2.TIF \
      --nodata 0 --align --out change.tif
(--bands applies to every single-file date; a stack is already R,G,B.)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags
import ml_collections
import numpy as np

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax import postprocess
from segchange_jax import scene
from segchange_jax import scene_io
from segchange_jax import scene_outputs
from segchange_jax import vectors

_CONFIG = config_lib.define_config_flag(
    help_string="configs/*.py describing the model; needed for an upstream .pth, else the "
    "checkpoint's own config is used.")
_CKPT = flags.DEFINE_string('checkpoint', None, 'Training checkpoints dir, convert_torch dir, '
                            'export bundle, or upstream .pth (with --config).')
_A = flags.DEFINE_string('a', None, 'Date A: raster, "R,G,B" single-band files, or PNG/JPEG.')
_B = flags.DEFINE_string('b', None, 'Date B, same forms as --a.')
_OUT = flags.DEFINE_string('out', None, 'Output mask: .tif (Cloud-Optimized GeoTIFF) or .png '
                           '(only for inputs without georeferencing).')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'Replace outputs that already exist.')
_PROMPT = flags.DEFINE_string('prompt', None, "Text prompt (default: the checkpoint config's "
                              'data.prompt).')
_WINDOW = flags.DEFINE_integer('window', None, 'Window size fed to the model (multiple of 32; '
                               'default config.infer.window).')
_OVERLAP = flags.DEFINE_integer('overlap', None, 'Overlap between neighbouring windows (px; '
                                'default config.infer.overlap).')
_BATCH = flags.DEFINE_integer('batch', None, 'Windows per model call (default '
                              'config.infer.batch_size).')
_THRESHOLD = flags.DEFINE_float('threshold', None, 'Change if probability > threshold, in (0, 1) '
                                '(default config.infer.threshold).')
_PROBS = flags.DEFINE_boolean('probabilities', False, 'Write float32 probabilities to --out '
                              'instead of a mask.')
_PROBS_OUT = flags.DEFINE_string('probability_out', None, 'Also write float32 change '
                                 'probabilities to this .tif (COG).')
_POST = flags.DEFINE_boolean('postprocess', False, 'Drop components failing the shape rules.')
_MIN_AREA = flags.DEFINE_integer('min_area', 2500, 'Post-process: minimum component area (px).')
_MAX_RATIO = flags.DEFINE_float('max_perimeter_ratio', 10.0, 'Post-process: max perimeter/area.')
_MIN_CONVEX = flags.DEFINE_float('min_convexity', 0.8, 'Post-process: min area/convex-hull area.')
_POLYGONS = flags.DEFINE_multi_string('polygons', None, 'Also write change polygons: .geojson '
                                      '(RFC 7946, WGS 84), .gpkg or .fgb (raster CRS); repeatable.')
_PREVIEW = flags.DEFINE_string('preview', None, 'Also write a small PNG: A | B | change overlay.')
_ALIGN = flags.DEFINE_boolean('align', False, "Reproject B onto A's grid (bilinear WarpedVRT).")
_BANDS = flags.DEFINE_list('bands', None, '1-based bands to use as R,G,B (e.g. 1,2,3).')
_NODATA = flags.DEFINE_float('nodata', None, 'Input nodata value for files that carry none (e.g. 0).')
_TEXT_MODEL = flags.DEFINE_string('text_model', None, 'Text encoder (Hub id, HF dir, GGUF or pkg:NAME) '
                                   "for --prompt; default the checkpoint config's text.model.")
_EMBEDDINGS = flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (prompts, '
                                  'embeddings; from segchange_jax.embed_prompts or an export '
                                  'bundle) holding --prompt; skips the text encoder.')
_BACKEND = flags.DEFINE_enum('backend', 'jax', ['jax', 'onnxruntime'], 'jax: the checkpoint '
                             'through segchange_jax; onnxruntime: an ONNX export (--onnx, or '
                             'model.onnx in the --checkpoint folder of export --format onnx).')
_ONNX = flags.DEFINE_string('onnx', None, '--backend onnxruntime: the model.onnx to run.')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
_GDAL_CACHE = flags.DEFINE_integer('gdal_cache_mb', 256, 'GDAL block cache (MB); GDAL defaults to '
                                   '5% of RAM, which would dominate the memory of a big scene.')

PredictFn = scene.PredictFn
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
RASTER_SUFFIXES = ('.tif', '.tiff')
DEFAULTS = dict(window=512, overlap=64, batch=8, threshold=0.5)


@dataclasses.dataclass
class Model:
  """What `predictor_factory` returns: the predictor, its config and tags for the outputs."""
  predict: PredictFn
  config: ml_collections.ConfigDict | None = None
  tags: dict = dataclasses.field(default_factory=dict)


def normalise(x: np.ndarray) -> np.ndarray:
  """uint8 NHWC -> ImageNet-normalised float32 NHWC (what the model was trained on)."""
  return (x.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def logits_to_probs(logits: np.ndarray) -> np.ndarray:
  """[B, H, W, K] logits -> [B, H, W] sigmoid (K = 1) or [B, H, W, K] softmax."""
  logits = np.asarray(logits, np.float32)
  if logits.shape[-1] == 1:
    return 1.0 / (1.0 + np.exp(-logits[..., 0]))
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def detector_predictor(detector, text_embeddings: np.ndarray) -> PredictFn:
  """Adapts a ChangeDetector-like object (predict_logits(a, b, emb)) to the engine's PredictFn."""
  emb = np.asarray(text_embeddings, np.float32)
  if emb.ndim == 2:
    emb = emb[None]

  def predict(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    batch_emb = np.broadcast_to(emb[:1], (a.shape[0],) + emb.shape[1:])
    return logits_to_probs(detector.predict_logits(normalise(a), normalise(b), batch_emb))
  return predict


def check_settings(window: int | None = None, overlap: int | None = None,
                   batch: int | None = None, threshold: float | None = None) -> None:
  """Refuses flag values the engine cannot use (None = not given)."""
  cli.positive('batch', batch)
  cli.in_open_unit_interval('threshold', threshold)
  if window is not None and (window < 32 or window % 32):
    raise cli.UsageError(f'--window={window} must be a positive multiple of 32 (the model '
                         'stride), e.g. 512')
  if overlap is not None and overlap < 0:
    raise cli.UsageError(f'--overlap={overlap} must be >= 0')
  if window is not None and overlap is not None and overlap >= window:
    raise cli.UsageError(f'--overlap={overlap} must be smaller than --window={window}')


def clamp_window(window: int, overlap: int, height: int, width: int,
                 quiet: bool = False) -> tuple[int, int]:
  """(window, overlap) fitted to a raster smaller than the window (multiple of 32, with a
  warning), so no window is padded by reflection: padding would change the prediction."""
  side = min(height, width)
  if window <= side or side < 32:
    return window, overlap
  new = side // 32 * 32
  new_overlap = min(overlap, new // 4)
  if not quiet:
    print(f'warning: --window {window} is larger than the {width}x{height} raster; using '
          f'--window {new} --overlap {new_overlap}', file=sys.stderr)
  return new, new_overlap


def _check_outputs(a: str, b: str, out: str, probabilities: bool, probs_path: str | None,
                   polygons: Sequence[str], preview: str | None, overwrite: bool) -> None:
  """Formats by extension and the never-destroy rules, before any input is opened."""
  ext = os.path.splitext(out)[1].lower()
  if ext not in RASTER_SUFFIXES + ('.png',):
    raise atomic.OutputError(f'--out {out}: unsupported output format {ext!r}; use .tif '
                             '(GeoTIFF) or .png (inputs without georeferencing only)')
  if ext == '.png' and probabilities:
    raise atomic.OutputError(f'--out {out}: probabilities need a .tif output')
  if probs_path and os.path.splitext(probs_path)[1].lower() not in RASTER_SUFFIXES:
    raise atomic.OutputError(f'--probability_out {probs_path}: use a .tif (GeoTIFF) path')
  if preview and os.path.splitext(preview)[1].lower() != '.png':
    raise atomic.OutputError(f'--preview {preview}: use a .png path')
  outputs = {'--out': out, '--probability_out': probs_path, '--preview': preview}
  for i, p in enumerate(polygons):
    outputs['--polygons' + ('' if i == 0 else f' #{i + 1}')] = p
  atomic.check_distinct(outputs)
  inputs = [p.strip() for spec in (a, b) for p in spec.split(',') if p.strip()]
  for flag, p in outputs.items():
    if p:
      atomic.check_output(p, inputs, overwrite, flag.split(' ')[0])


def run_inference(a: str, b: str, out: str, predict_probs: PredictFn | None, *,
                  channels: int = 1, window: int | None = None, overlap: int | None = None,
                  batch: int | None = None, threshold: float | None = None,
                  probabilities: bool = False, do_postprocess: bool = False,
                  min_area: int = 2500, max_perimeter_ratio: float = 10.0,
                  min_convexity: float = 0.8, polygons_path: str | Sequence[str] | None = None,
                  probs_path: str | None = None, preview_path: str | None = None,
                  overwrite: bool = False, align: bool = False, bands=None,
                  nodata: float | None = None, progress: bool = True, gdal_cache_mb: int = 256,
                  tags: dict | None = None,
                  predictor_factory: Callable[[], Model] | None = None) -> scene.SceneStats:
  """Runs the whole pipeline (module docstring); returns what the engine did.

  Settings left at None come from the factory's config (config.infer.*), else DEFAULTS.
  `predictor_factory` (if given) builds the model after the inputs and outputs were checked.
  """
  import rasterio  # pylint: disable=g-import-not-at-top
  polygons = [polygons_path] if isinstance(polygons_path, str) else list(polygons_path or [])
  check_settings(window, overlap, batch, threshold)
  _check_outputs(a, b, out, probabilities, probs_path, polygons, preview_path, overwrite)
  # Bounded GDAL block cache: windows overlap, so a few tile rows of cache avoid re-decoding,
  # but GDAL's default (5 % of RAM) would grow with the scene.
  with rasterio.Env(GDAL_CACHEMAX=int(gdal_cache_mb)):
    return _run_inference(
        a, b, out, predict_probs, channels=channels,
        settings=dict(window=window, overlap=overlap, batch=batch, threshold=threshold),
        probabilities=probabilities, do_postprocess=do_postprocess, min_area=min_area,
        max_perimeter_ratio=max_perimeter_ratio, min_convexity=min_convexity, polygons=polygons,
        probs_path=probs_path, preview_path=preview_path, align=align, bands=bands,
        nodata=nodata, progress=progress, tags=dict(tags or {}),
        predictor_factory=predictor_factory)


def _open_source(a, b, bands, nodata, align):
  if scene_io.is_plain(a) != scene_io.is_plain(b):
    raise ValueError(f'--a {a} and --b {b}: give two rasters or two plain images, not one of each')
  if scene_io.is_plain(a):
    return scene_io.ArrayPair(a, b)
  return scene_io.RasterPair(a, b, bands, nodata, align)


def _resolve(settings: dict, config) -> dict:
  """Flag values where given, else the checkpoint config's infer.*, else DEFAULTS."""
  from_config = {}
  if config is not None:
    from_config = dict(window=int(config.infer.window), overlap=int(config.infer.overlap),
                       batch=int(config.infer.batch_size),
                       threshold=float(config.infer.threshold))
  out = {k: v if v is not None else from_config.get(k, DEFAULTS[k]) for k, v in settings.items()}
  if out['overlap'] >= out['window']:
    raise cli.UsageError(f'overlap {out["overlap"]} must be smaller than window {out["window"]} '
                         '(--overlap / --window or the checkpoint config)')
  return out


def _run_inference(a, b, out, predict_probs, *, channels, settings, probabilities,
                   do_postprocess, min_area, max_perimeter_ratio, min_convexity, polygons,
                   probs_path, preview_path, align, bands, nodata, progress, tags,
                   predictor_factory):
  import tqdm  # pylint: disable=g-import-not-at-top
  plain_out = os.path.splitext(out)[1].lower() == '.png'
  source = _open_source(a, b, bands, nodata, align)
  scratch: list[str] = []
  bar = None
  try:
    if plain_out and source.georeferenced:
      raise atomic.OutputError(f'--out {out}: PNG would drop the georeferencing of the inputs; '
                               'use a .tif output')
    for p in polygons:
      vectors.check_path(p, source.georeferenced)
    # The bar starts before the slow steps (loading, compiling) so the first seconds say so.
    bar = tqdm.tqdm(total=None, desc='loading model', unit='win', disable=not progress,
                    mininterval=0.5, dynamic_ncols=True)
    config = None
    if predictor_factory is not None:
      model = predictor_factory()
      predict_probs, config = model.predict, model.config
      tags.update(model.tags)
    s = _resolve(settings, config)
    window, overlap = clamp_window(s['window'], s['overlap'], source.height, source.width)
    batch, threshold = s['batch'], s['threshold']
    tags.update(THRESHOLD=threshold, WINDOW=window, OVERLAP=overlap,
                SEGCHANGE_JAX_VERSION=_version())
    if predictor_factory is not None:
      # One call on a dummy batch compiles the model and tells the number of classes.
      bar.set_description('compiling')
      dummy = np.zeros((batch, window, window, 3), np.uint8)
      probe = np.asarray(predict_probs(dummy, dummy))
      channels = 1 if probe.ndim == 3 else probe.shape[-1]
    # reset() also restarts the clock, so the rate shown is windows/s, not load + compile.
    bar.reset(total=len(scene.Grid(source.height, source.width, window, overlap).windows()))
    sinks = []
    if plain_out:
      mask_sink = scene_io.PlainSink(None, source.height, source.width, threshold)
    else:
      scratch.append(atomic.temp_name(out))
      mask_sink = scene_io.GeoTiffSink(scratch[-1], source.height, source.width, source.crs,
                                       source.transform, channels, probabilities, threshold,
                                       tags)
    sinks.append(mask_sink)
    probs_sink = None
    if probs_path:
      scratch.append(atomic.temp_name(probs_path))
      probs_sink = scene_io.GeoTiffSink(scratch[-1], source.height, source.width, source.crs,
                                        source.transform, channels, True, threshold, tags)
      sinks.append(probs_sink)
    try:
      stats = scene.run_scene(source, predict_probs, scene_io.TeeSink(sinks), window=window,
                              overlap=overlap, batch_size=batch, channels=channels,
                              progress=progress, bar=bar)
    finally:
      for sink in sinks:
        if isinstance(sink, scene_io.GeoTiffSink):
          sink.close()
    bar.set_description('writing outputs')
    with atomic.Outputs() as outs:
      mask, nodata_value = None, None
      if do_postprocess or polygons or preview_path:
        mask, nodata_value = scene_outputs.whole_mask(mask_sink, probabilities, threshold)
        if do_postprocess:
          mask = postprocess.filter_components(mask, min_area, max_perimeter_ratio,
                                               min_convexity, nodata_value)
          if plain_out:
            mask_sink.mask = mask
          elif not probabilities:  # rewrite the scratch mask in one go
            scene_outputs.rewrite_mask(mask_sink.path, mask)
      if plain_out:
        mask_sink.path = outs.path(out)
        mask_sink.close()
      else:
        scene_io.write_cog(mask_sink.path, outs.path(out), probabilities)
      if probs_sink is not None:
        scene_io.write_cog(probs_sink.path, outs.path(probs_path), True)
      for p in polygons:
        vectors.write(outs.path(p), vectors.iter_features(mask, source.transform, nodata_value),
                      source.crs)
      if preview_path:
        scene_outputs.write_preview(outs.path(preview_path), source, mask, nodata_value)
    return stats
  finally:
    if bar is not None:
      bar.close()
    source.close()
    for p in scratch:
      if os.path.exists(p):
        os.remove(p)


def _version() -> str:
  import segchange_jax  # pylint: disable=g-import-not-at-top
  return segchange_jax.__version__


def load_model(checkpoint: str, config=None, prompt: str | None = None,
               embeddings: str | None = None, text_model: str | None = None) -> Model:
  """Loads the checkpoint (variables only, checked against its config) and embeds the prompt
  (default the config's data.prompt)."""
  from segchange_jax import evaluate  # pylint: disable=g-import-not-at-top
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  config, variables = evaluate.load_checkpoint(checkpoint, config)
  prompt = prompt if prompt is not None else config.data.prompt
  emb = prompt_embedding(config, prompt, embeddings, text_model)
  tags = dict(CHECKPOINT=os.path.abspath(checkpoint), PROMPT=prompt)
  return Model(detector_predictor(api.ChangeDetector(config, variables), emb), config, tags)


def prompt_embedding(config, prompt: str, embeddings: str | None = None,
                     text_model: str | None = None) -> np.ndarray:
  """[1, text.max_tokens, text.dim] embedding of `prompt`.

  From `embeddings` (.npz with arrays prompts, embeddings), else encoded with the config's text
  settings (text.embeddings / on-disk cache / encoder) or with `text_model` when given.
  """
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  want = (int(config.text.max_tokens), int(config.text.dim))
  if embeddings:
    if not os.path.isfile(embeddings):
      raise FileNotFoundError(f'--embeddings {embeddings} does not exist; create it with '
                              'python -m segchange_jax.embed_prompts')
    table, _ = cache.load_npz(embeddings)
    if prompt not in table:
      raise ValueError(f'--embeddings {embeddings} has no entry for --prompt {prompt!r}; it holds '
                       f'{list(table)[:5]}')
    emb = np.asarray(table[prompt], np.float32)[None]
  else:
    text_cfg = ml_collections.ConfigDict(config.text.to_dict())
    if text_model:
      text_cfg.model, text_cfg.embeddings = text_model, ''
    emb = cache.embed_prompts(text_cfg, [prompt])
  if emb.shape[1:] != want:
    raise ValueError(f'prompt embedding {emb.shape[1:]} does not fit the model, which wants '
                     f'[text.max_tokens, text.dim] = {list(want)}; use embeddings of its text model')
  return emb


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}; flags take the form --name=value')
  for name in ('checkpoint', 'a', 'b', 'out'):
    if name == 'checkpoint' and _BACKEND.value == 'onnxruntime' and _ONNX.value:
      continue
    if not flags.FLAGS[name].value:
      raise cli.UsageError(f'--{name} is required (see --help)')
  check_settings(_WINDOW.value, _OVERLAP.value, _BATCH.value, _THRESHOLD.value)
  cli.quiet_libraries()
  config = config_lib.validate_config(_CONFIG.value) if _CONFIG.value is not None else None
  factory = lambda: load_model(_CKPT.value, config, _PROMPT.value, _EMBEDDINGS.value,
                               _TEXT_MODEL.value)
  if _BACKEND.value == 'onnxruntime':
    from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
    def factory():  # the ONNX file in the same engine; the prompt embedded as for jax
      det, cfg, emb_npz, tags = onnx_runtime.load(_CKPT.value, _ONNX.value, config, _PROMPT.value,
                                                  _EMBEDDINGS.value, _TEXT_MODEL.value,
                                                  _WINDOW.value)
      emb = prompt_embedding(cfg, tags['PROMPT'], emb_npz, _TEXT_MODEL.value)
      return Model(detector_predictor(det, emb), cfg, tags)
  stats = run_inference(
      _A.value, _B.value, _OUT.value, None, window=_WINDOW.value, overlap=_OVERLAP.value,
      batch=_BATCH.value, threshold=_THRESHOLD.value, probabilities=_PROBS.value,
      do_postprocess=_POST.value, min_area=_MIN_AREA.value, max_perimeter_ratio=_MAX_RATIO.value,
      min_convexity=_MIN_CONVEX.value, polygons_path=_POLYGONS.value,
      probs_path=_PROBS_OUT.value, preview_path=_PREVIEW.value, overwrite=_OVERWRITE.value,
      align=_ALIGN.value, bands=_bands(_BANDS.value), nodata=_NODATA.value,
      progress=_PROGRESS.value, gdal_cache_mb=_GDAL_CACHE.value, predictor_factory=factory)
  print(f'wrote {_OUT.value}: {stats.windows} windows in {stats.seconds:.1f} s')


def _bands(values: list[str] | None) -> list[int] | None:
  if not values:
    return None
  try:
    return [int(x) for x in values]
  except ValueError as e:
    raise cli.UsageError(f'--bands={",".join(values)} must be 1-based integers, e.g. 1,2,3') from e


if __name__ == '__main__':
  cli.run(main)
