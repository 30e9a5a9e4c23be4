"""Change detection on a pair of scenes: checks, model, sliding window, outputs.

The library behind `python -m segchange_jax.infer` (its docstring lists the outputs and input
forms): `run_inference` validates the settings and output paths, opens the pair
(`raster_io`), runs the windowed engine (`sliding_window`) with a predict function, and writes
the mask, probabilities, polygons and preview together (`atomic.Outputs`) in the formats the
extensions pick from `formats.FORMATS`. `predictor.load_model` turns any checkpoint into such a
predict function; settings nobody gives come from `default_config` (infer.*).

Several prompts (`prompts=[...]`, `infer --prompt A --prompt B`): the predict function answers
all P in one model call per window batch (`detector_predictor` with [1, P, T, L] embeddings),
its P x K probability channels prompt-major. The mask raster then has one band per prompt (the
probability raster P x K bands), each band's description and band tag PROMPT its prompt, and
the polygons of all prompts go into one layer with a `prompt` attribute; postprocessing runs on
each prompt's mask. A PNG `--out` holds one mask and is refused for several prompts.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
import sys
from typing import Callable, Sequence

import ml_collections
import numpy as np

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax import default_config
from segchange_jax.data import imagery
from segchange_jax.inference import formats
from segchange_jax.inference import postprocess
from segchange_jax.inference import raster_io
from segchange_jax.inference import scene_outputs
from segchange_jax.inference import sliding_window
from segchange_jax.inference import vectors
from segchange_jax.models import tta as tta_lib

PredictFn = sliding_window.PredictFn
# The settings of a run that neither the caller nor a checkpoint config gives.
DEFAULT_INFER = default_config.get_config().infer


@dataclasses.dataclass
class Model:
  """What `predictor_factory` returns: the predictor, its config and tags for the outputs."""
  predict: PredictFn
  config: ml_collections.ConfigDict | None = None
  tags: dict = dataclasses.field(default_factory=dict)


def sigmoid(logits: np.ndarray) -> np.ndarray:
  """1 / (1 + exp(-x)) written with tanh, which does not overflow: a trained model's logits
  reach -100 and beyond on pixels it is sure of, where exp(-x) overflows float32."""
  return 0.5 + 0.5 * np.tanh(0.5 * logits)


def logits_to_probs(logits: np.ndarray) -> np.ndarray:
  """[B, H, W, K] logits -> [B, H, W] sigmoid (K = 1) or [B, H, W, K] softmax."""
  logits = np.asarray(logits, np.float32)
  if logits.shape[-1] == 1:
    return sigmoid(logits[..., 0])
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def prompt_logits_to_probs(logits: np.ndarray) -> np.ndarray:
  """Logits of P prompts, [B, H, W, P] (binary) or [B, H, W, P, K], -> probabilities
  [B, H, W, P] (sigmoid) or [B, H, W, P * K] (softmax over K; channel p * K + k)."""
  logits = np.asarray(logits, np.float32)
  if logits.ndim == 4:
    return sigmoid(logits)
  probs = logits_to_probs(logits.reshape(-1, *logits.shape[-2:]))
  return probs.reshape(*logits.shape[:3], -1)


def detector_predictor(detector, text_embeddings: np.ndarray, tta: str = 'none') -> PredictFn:
  """Adapts a ChangeDetector-like object (predict_logits(a, b, emb)) to the engine's PredictFn.

  `text_embeddings` [T, L] or [1, T, L]: one prompt, probabilities [B, H, W] (or [B, H, W, K]).
  [1, P, T, L]: P prompts in ONE model call per window batch, probabilities [B, H, W, P]
  (binary) or [B, H, W, P * K] (`prompt_logits_to_probs`); only detectors whose
  `prompt_batch` attribute is true take those (the JAX ChangeDetector).
  `tta` other than 'none' (segchange_jax/models/tta.py) is passed on as predict_logits(...,
  tta=tta), which averages the logits of the transformed windows in one model call per batch;
  a detector without that argument (the ONNX backend) takes 'none' only.
  """
  tta_lib.resolve(tta)
  if tta != 'none' and 'tta' not in inspect.signature(detector.predict_logits).parameters:
    raise cli.UsageError(f'--tta {tta}: {type(detector).__name__} has no test-time '
                         'augmentation; use --backend jax or --tta none')
  extra = {} if tta == 'none' else {'tta': tta}
  emb = np.asarray(text_embeddings, np.float32)
  if emb.ndim == 2:
    emb = emb[None]
  multi = emb.ndim == 4
  if multi and not getattr(detector, 'prompt_batch', False):
    raise cli.UsageError(f'{type(detector).__name__} takes one prompt per call, got '
                         f'{emb.shape[1]} prompt embeddings {emb.shape}: use --backend jax for '
                         'several prompts in one pass')
  to_probs = prompt_logits_to_probs if multi else logits_to_probs

  def predict(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    batch_emb = np.broadcast_to(emb[:1], (a.shape[0],) + emb.shape[1:])
    return to_probs(detector.predict_logits(imagery.normalize(a), imagery.normalize(b),
                                            batch_emb, **extra))
  return predict


def check_settings(window: int | None = None, overlap: int | None = None,
                   batch: int | None = None, threshold: float | None = None) -> None:
  """Refuses flag values the engine cannot use (None = not given)."""
  cli.positive('batch', batch)
  cli.in_open_unit_interval('threshold', threshold)
  if window is not None:
    config_lib.check_stride(window, '--window', cli.UsageError, '{name}={value} must be a '
                            'positive multiple of {stride} (the model stride), e.g. 512')
  if overlap is not None and overlap < 0:
    raise cli.UsageError(f'--overlap={overlap} must be >= 0')
  if window is not None and overlap is not None and overlap >= window:
    raise cli.UsageError(f'--overlap={overlap} must be smaller than --window={window}')


def clamp_window(window: int, overlap: int, height: int, width: int,
                 quiet: bool = False) -> tuple[int, int]:
  """(window, overlap) fitted to a raster smaller than the window (a multiple of the model
  stride, with a warning), so no window is padded by reflection: padding would change the
  prediction."""
  stride = config_lib.STRIDE
  side = min(height, width)
  if window <= side or side < stride:
    return window, overlap
  new = side // stride * stride
  new_overlap = min(overlap, new // 4)
  if not quiet:
    print(f'warning: --window {window} is larger than the {width}x{height} raster; using '
          f'--window {new} --overlap {new_overlap}', file=sys.stderr)
  return new, new_overlap


def _check_outputs(a: str, b: str, out: str, probabilities: bool, probs_path: str | None,
                   polygons: Sequence[str], preview: str | None, overwrite: bool,
                   prompts: Sequence[str] | None = None) -> None:
  """Formats by extension and the never-destroy rules, before any input is opened."""
  out_format = formats.lookup(out, formats.RASTER, '--out')
  if probabilities:
    formats.check_probabilities(out_format, out, '--out')
  if prompts and len(prompts) > 1:
    formats.check_bands(out_format, out, '--out', len(prompts))
  if probs_path:
    formats.check_probabilities(formats.lookup(probs_path, formats.RASTER, '--probability_out'),
                                probs_path, '--probability_out')
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
  for p in polygons:
    formats.lookup(p, formats.VECTOR, '--polygons')


def run_inference(a: str, b: str, out: str, predict_probs: PredictFn | None, *,
                  channels: int = 1, window: int | None = None, overlap: int | None = None,
                  batch: int | None = None, threshold: float | None = None,
                  probabilities: bool = False,
                  do_postprocess: bool = DEFAULT_INFER.postprocess,
                  min_area: int = DEFAULT_INFER.min_area,
                  max_perimeter_ratio: float = DEFAULT_INFER.max_perimeter_ratio,
                  min_convexity: float = DEFAULT_INFER.min_convexity,
                  polygons_path: str | Sequence[str] | None = None,
                  probs_path: str | None = None, preview_path: str | None = None,
                  overwrite: bool = False, align: bool = False, bands=None,
                  nodata: float | None = None, progress: bool = True, gdal_cache_mb: int = 256,
                  tags: dict | None = None,
                  predictor_factory: Callable[[], Model] | None = None,
                  prompts: Sequence[str] | None = None
                  ) -> sliding_window.SceneStats:
  """Runs the whole pipeline (module docstring); returns what the engine did.

  Settings left at None come from the factory's config (config.infer.*), else DEFAULT_INFER.
  `predictor_factory` (if given) builds the model after the inputs and outputs were checked.
  `prompts`: the P prompts the predictor answers in one pass, in its channel order (module
  docstring; a list predictor.check_prompts accepts); None for one prompt (single-band
  outputs, no `prompt` attribute).
  """
  import rasterio  # pylint: disable=g-import-not-at-top
  polygons = [polygons_path] if isinstance(polygons_path, str) else list(polygons_path or [])
  if prompts is not None:
    prompts = list(prompts)
  check_settings(window, overlap, batch, threshold)
  _check_outputs(a, b, out, probabilities, probs_path, polygons, preview_path, overwrite,
                 prompts)
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
        predictor_factory=predictor_factory, prompts=prompts)


def _open_source(a, b, bands, nodata, align):
  if raster_io.is_plain(a) != raster_io.is_plain(b):
    raise ValueError(f'--a {a} and --b {b}: give two rasters or two plain images, not one of each')
  if raster_io.is_plain(a):
    return raster_io.ArrayPair(a, b)
  return raster_io.RasterPair(a, b, bands, nodata, align)


def _resolve(settings: dict, config) -> dict:
  """Flag values where given, else the checkpoint config's infer.*, else DEFAULT_INFER."""
  infer = DEFAULT_INFER if config is None else config.infer
  from_config = dict(window=int(infer.window), overlap=int(infer.overlap),
                     batch=int(infer.batch_size), threshold=float(infer.threshold))
  out = {k: v if v is not None else from_config[k] for k, v in settings.items()}
  if out['overlap'] >= out['window']:
    raise cli.UsageError(f'overlap {out["overlap"]} must be smaller than window {out["window"]} '
                         '(--overlap / --window or the checkpoint config)')
  return out


def _run_inference(a, b, out, predict_probs, *, channels, settings, probabilities,
                   do_postprocess, min_area, max_perimeter_ratio, min_convexity, polygons,
                   probs_path, preview_path, align, bands, nodata, progress, tags,
                   predictor_factory, prompts):
  import tqdm  # pylint: disable=g-import-not-at-top
  out_format = formats.lookup(out, formats.RASTER, '--out')
  vector_formats = [formats.lookup(p, formats.VECTOR, '--polygons') for p in polygons]
  source = _open_source(a, b, bands, nodata, align)
  scratch: list[str] = []
  bar = None
  try:
    formats.check_inputs(out_format, out, '--out', source.georeferenced)
    for p, fmt in zip(polygons, vector_formats):
      formats.check_inputs(fmt, p, '--polygons', source.georeferenced)
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
    groups = len(prompts) if prompts else 1
    if channels % groups:
      raise ValueError(f'the predictor returns {channels} probability channels, which do not '
                       f'split into the {groups} prompts {prompts}: give it the same prompts')
    # reset() also restarts the clock, so the rate shown is windows/s, not load + compile.
    grid = sliding_window.Grid(source.height, source.width, window, overlap)
    bar.reset(total=len(grid.windows()))
    # Every raster output streams into a scratch GeoTIFF that its format's writer copies at the end.
    scratch.append(_scratch_name(out))
    mask_sink = raster_io.GeoTiffSink(scratch[-1], source.height, source.width, source.crs,
                                      source.transform, channels, probabilities, threshold, tags,
                                      prompts)
    sinks = [mask_sink]
    probs_sink = None
    if probs_path:
      scratch.append(_scratch_name(probs_path))
      probs_sink = raster_io.GeoTiffSink(scratch[-1], source.height, source.width, source.crs,
                                        source.transform, channels, True, threshold, tags,
                                        prompts)
      sinks.append(probs_sink)
    try:
      stats = sliding_window.run_scene(source, predict_probs, raster_io.TeeSink(sinks),
                                       window=window, overlap=overlap, batch_size=batch,
                                       channels=channels, progress=progress, bar=bar)
    finally:
      for sink in sinks:
        sink.close()
    bar.set_description('writing outputs')
    with atomic.Outputs() as outs:
      mask, nodata_value = None, None
      if do_postprocess or polygons or preview_path or prompts:
        mask, nodata_value = scene_outputs.whole_mask(mask_sink, probabilities, threshold,
                                                      groups)
        if do_postprocess:  # each prompt's mask on its own
          rules = (min_area, max_perimeter_ratio, min_convexity, nodata_value)
          mask = (postprocess.filter_components(mask, *rules) if mask.ndim == 2 else
                  np.stack([postprocess.filter_components(m, *rules) for m in mask]))
          if not probabilities:  # rewrite the scratch mask in one go
            scene_outputs.rewrite_mask(mask_sink.path, mask)
      out_format.write(mask_sink.path, outs.path(out), probabilities)
      if probs_sink is not None:
        formats.lookup(probs_path, formats.RASTER, '--probability_out').write(
            probs_sink.path, outs.path(probs_path), True)
      for p, fmt in zip(polygons, vector_formats):
        if prompts is None:
          fmt.write(outs.path(p), vectors.iter_features(mask, source.transform, nodata_value),
                    source.crs)
        else:  # one layer, every feature tagged with its prompt
          per_prompt = mask if mask.ndim == 3 else mask[None]
          features = itertools.chain.from_iterable(
              vectors.iter_features(m, source.transform, nodata_value, prompt=name)
              for m, name in zip(per_prompt, prompts))
          fmt.write(outs.path(p), features, source.crs, prompt_field=True)
      if preview_path:
        scene_outputs.write_preview(outs.path(preview_path), source, mask, nodata_value)
      if prompts:
        stats.changed = dict(zip(prompts, scene_outputs.changed_shares(
            mask, nodata_value, source.transform, source.crs)))
    return stats
  finally:
    if bar is not None:
      bar.close()
    source.close()
    for p in scratch:
      if os.path.exists(p):
        os.remove(p)


def _scratch_name(path: str) -> str:
  """A temporary GeoTIFF name beside the output `path` (GDAL picks the driver by extension)."""
  return atomic.temp_name(os.path.splitext(path)[0] + '.tif')


def _version() -> str:
  import segchange_jax  # pylint: disable=g-import-not-at-top
  return segchange_jax.__version__
