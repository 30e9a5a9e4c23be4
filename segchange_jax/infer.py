r"""Change detection on a pair of large rasters (or plain images) with a trained checkpoint.

  python -m segchange_jax.infer --checkpoint CKPT --a A.tif --b B.tif \
      --prompt "Buildings with changes" --out change.tif [--polygons change.geojson]

--checkpoint: anything segchange_jax.api.load_variables reads (training checkpoints, a
convert_torch output, an export bundle; an upstream .pth with --config). The prompt embedding
comes from --embeddings (an .npz from segchange_jax.embed_prompts or an export bundle's
prompts.npz), else --prompt is encoded with the checkpoint config's text settings (or
--text_model).

Outputs (written to `<out>.partial`, renamed when complete):
- `.tif`: tiled (256x256), deflate-compressed GeoTIFF with A's CRS and transform. Default a
  uint8 mask: 0 no change, 1 change (class id for multi-class models), 255 nodata.
  `--probabilities`: float32 probabilities (one band per class), nodata NaN.
- `.png`: 0/255 mask (nodata written as 0); plain-image inputs only have this or an
  ungeoreferenced `.tif`.
- `--polygons X.geojson`: change regions (after `--postprocess` when given) in the raster's CRS,
  with properties area (map units^2), area_px.
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

import json
import os
import sys
from typing import Callable

from absl import app
from absl import flags
import ml_collections
import numpy as np

from segchange_jax import config_lib
from segchange_jax import postprocess
from segchange_jax import scene
from segchange_jax import scene_io

_CONFIG = config_lib.define_config_flag(
    help_string="configs/*.py describing the model; needed for an upstream .pth, else the "
    "checkpoint's own config is used.")
_CKPT = flags.DEFINE_string('checkpoint', None, 'Training checkpoints dir, convert_torch dir, '
                            'export bundle, or upstream .pth (with --config).')
_A = flags.DEFINE_string('a', None, 'Date A: raster, "R,G,B" single-band files, or PNG/JPEG.')
_B = flags.DEFINE_string('b', None, 'Date B, same forms as --a.')
_OUT = flags.DEFINE_string('out', None, 'Output .tif (GeoTIFF) or .png.')
_PROMPT = flags.DEFINE_string('prompt', 'Buildings with changes, Mound changes.', 'Text prompt.')
_WINDOW = flags.DEFINE_integer('window', 512, 'Window size fed to the model (multiple of 32).')
_OVERLAP = flags.DEFINE_integer('overlap', 64, 'Overlap between neighbouring windows (px).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Windows per model call.')
_THRESHOLD = flags.DEFINE_float('threshold', 0.5, 'Change if probability > threshold (binary).')
_PROBS = flags.DEFINE_boolean('probabilities', False, 'Write float32 probabilities, not a mask.')
_POST = flags.DEFINE_boolean('postprocess', False, 'Drop components failing the shape rules.')
_MIN_AREA = flags.DEFINE_integer('min_area', 2500, 'Post-process: minimum component area (px).')
_MAX_RATIO = flags.DEFINE_float('max_perimeter_ratio', 10.0, 'Post-process: max perimeter/area.')
_MIN_CONVEX = flags.DEFINE_float('min_convexity', 0.8, 'Post-process: min area/convex-hull area.')
_POLYGONS = flags.DEFINE_string('polygons', None, 'Also write change polygons to this GeoJSON.')
_ALIGN = flags.DEFINE_boolean('align', False, "Reproject B onto A's grid (bilinear WarpedVRT).")
_BANDS = flags.DEFINE_list('bands', None, '1-based bands to use as R,G,B (e.g. 1,2,3).')
_NODATA = flags.DEFINE_float('nodata', None, 'Input nodata value for files that carry none (e.g. 0).')
_TEXT_MODEL = flags.DEFINE_string('text_model', None, 'Text encoder (HF dir, GGUF or pkg:NAME) '
                                   "for --prompt; default the checkpoint config's text.model.")
_EMBEDDINGS = flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (prompts, '
                                  'embeddings; from segchange_jax.embed_prompts or an export '
                                  'bundle) holding --prompt; skips the text encoder.')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
_GDAL_CACHE = flags.DEFINE_integer('gdal_cache_mb', 256, 'GDAL block cache (MB); GDAL defaults to '
                                   '5% of RAM, which would dominate the memory of a big scene.')

PredictFn = scene.PredictFn
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


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


def run_inference(a: str, b: str, out: str, predict_probs: PredictFn, *, channels: int = 1,
                  window: int = 512, overlap: int = 64, batch: int = 8, threshold: float = 0.5,
                  probabilities: bool = False, do_postprocess: bool = False, min_area: int = 2500,
                  max_perimeter_ratio: float = 10.0, min_convexity: float = 0.8,
                  polygons_path: str | None = None, align: bool = False, bands=None,
                  nodata: float | None = None, progress: bool = True, gdal_cache_mb: int = 256,
                  predictor_factory: Callable[[], PredictFn] | None = None) -> scene.SceneStats:
  """Runs the whole pipeline; `predictor_factory` (if given) builds predict_probs after inputs check."""
  import rasterio  # pylint: disable=g-import-not-at-top
  # Bounded GDAL block cache: windows overlap, so a few tile rows of cache avoid re-decoding,
  # but GDAL's default (5 % of RAM) would grow with the scene.
  with rasterio.Env(GDAL_CACHEMAX=int(gdal_cache_mb)):
    return _run_inference(a, b, out, predict_probs, channels=channels, window=window,
                          overlap=overlap, batch=batch, threshold=threshold,
                          probabilities=probabilities, do_postprocess=do_postprocess,
                          min_area=min_area, max_perimeter_ratio=max_perimeter_ratio,
                          min_convexity=min_convexity, polygons_path=polygons_path, align=align,
                          bands=bands, nodata=nodata, progress=progress,
                          predictor_factory=predictor_factory)


def _run_inference(a, b, out, predict_probs, *, channels, window, overlap, batch, threshold,
                   probabilities, do_postprocess, min_area, max_perimeter_ratio, min_convexity,
                   polygons_path, align, bands, nodata, progress, predictor_factory):
  plain_in = scene_io.is_plain(a) or scene_io.is_plain(b)
  plain_out = scene_io.is_plain(out)
  if scene_io.is_plain(a) != scene_io.is_plain(b):
    raise ValueError(f'--a {a} and --b {b}: give two rasters or two plain images, not one of each')
  if plain_out and probabilities:
    raise ValueError(f'--out {out}: probabilities need a .tif output')
  if not plain_out and os.path.splitext(out)[1].lower() not in ('.tif', '.tiff'):
    raise ValueError(f'--out {out}: use a .tif/.tiff (GeoTIFF) or .png output')
  if os.path.dirname(os.path.abspath(out)):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  source = scene_io.ArrayPair(a, b) if plain_in else scene_io.RasterPair(a, b, bands, nodata, align)
  sink = None
  partials = []
  try:
    if predictor_factory is not None:
      predict_probs = predictor_factory()
      # One call on a dummy batch compiles the model and tells the number of classes.
      dummy = np.zeros((batch, window, window, 3), np.uint8)
      probe = np.asarray(predict_probs(dummy, dummy))
      channels = 1 if probe.ndim == 3 else probe.shape[-1]
    if plain_out:
      sink = scene_io.PlainSink(out, source.height, source.width, threshold)
    else:
      sink = scene_io.GeoTiffSink(out, source.height, source.width, source.crs, source.transform,
                                  channels, probabilities, threshold)
    partials.append(sink.partial)
    stats = scene.run_scene(source, predict_probs, sink, window=window, overlap=overlap,
                            batch_size=batch, channels=channels, progress=progress)
    sink.close()
    if do_postprocess or polygons_path:
      _finish_shapes(sink, source, probabilities, threshold, do_postprocess, min_area,
                     max_perimeter_ratio, min_convexity, polygons_path, partials)
    scene_io.commit(sink.partial, out)
    if polygons_path:
      scene_io.commit(polygons_path + '.partial', polygons_path)
    return stats
  except BaseException:
    if sink is not None:
      try:
        sink.close()
      finally:
        for p in partials:
          scene_io.discard(p)
    raise
  finally:
    source.close()


def _finish_shapes(sink, source, probabilities, threshold, do_postprocess, min_area, max_ratio,
                   min_convexity, polygons_path, partials) -> None:
  """Whole-mask pass: shape filter (rewrites the mask output) and polygon export."""
  import rasterio  # pylint: disable=g-import-not-at-top
  if isinstance(sink, scene_io.PlainSink):
    mask, nodata = (sink.mask > 0).astype(np.uint8), None
  else:
    with rasterio.open(sink.partial) as ds:
      if probabilities:  # shapes come from the thresholded first band
        p = ds.read(1)
        mask = np.where(np.isnan(p), scene_io.MASK_NODATA, p > threshold).astype(np.uint8)
      else:
        mask = ds.read(1)
      profile = ds.profile
    nodata = scene_io.MASK_NODATA
  if do_postprocess:
    mask = postprocess.filter_components(mask, min_area, max_ratio, min_convexity, nodata)
    if isinstance(sink, scene_io.PlainSink):
      sink.mask = mask
      sink.saved = False
      sink.close()
    elif not probabilities:  # rewrite the mask in one go (tiles of a compressed file are written once)
      os.remove(sink.partial)
      with rasterio.open(sink.partial, 'w', **profile) as ds:
        ds.write(mask[None])
  if polygons_path:
    fc = postprocess.polygons(mask, source.transform, source.crs, nodata)
    partials.append(polygons_path + '.partial')
    with open(polygons_path + '.partial', 'w') as f:
      json.dump(fc, f)


def _model_factory() -> PredictFn:
  """Loads the checkpoint (checked against its config) and embeds --prompt."""
  from segchange_jax import evaluate  # pylint: disable=g-import-not-at-top
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  config = config_lib.validate_config(_CONFIG.value) if _CONFIG.value is not None else None
  config, variables = evaluate.load_checkpoint(_CKPT.value, config)
  emb = prompt_embedding(config, _PROMPT.value, _EMBEDDINGS.value, _TEXT_MODEL.value)
  return detector_predictor(api.ChangeDetector(config, variables), emb)


def prompt_embedding(config, prompt: str, embeddings: str | None = None,
                     text_model: str | None = None) -> np.ndarray:
  """[1, text.max_tokens, text.dim] embedding of `prompt`.

  From `embeddings` (.npz with arrays prompts, embeddings), else encoded with the config's text
  settings (text.embeddings / on-disk cache / encoder) or with `text_model` when given.
  """
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  want = (int(config.text.max_tokens), int(config.text.dim))
  if embeddings:
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
  del argv
  for name in ('checkpoint', 'a', 'b', 'out'):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  if _WINDOW.value % 32:
    raise app.UsageError(f'--window={_WINDOW.value} must be a multiple of 32 (the model stride)')
  if not 0 <= _OVERLAP.value < _WINDOW.value:
    raise app.UsageError(f'--overlap={_OVERLAP.value} must be in [0, --window)')
  try:
    stats = run_inference(
        _A.value, _B.value, _OUT.value, None, window=_WINDOW.value, overlap=_OVERLAP.value,
        batch=_BATCH.value, threshold=_THRESHOLD.value, probabilities=_PROBS.value,
        do_postprocess=_POST.value, min_area=_MIN_AREA.value, max_perimeter_ratio=_MAX_RATIO.value,
        min_convexity=_MIN_CONVEX.value, polygons_path=_POLYGONS.value, align=_ALIGN.value,
        bands=[int(x) for x in _BANDS.value] if _BANDS.value else None, nodata=_NODATA.value,
        progress=_PROGRESS.value, gdal_cache_mb=_GDAL_CACHE.value, predictor_factory=_model_factory)
  except (scene_io.GridMismatchError, ValueError, FileNotFoundError, KeyError,
          config_lib.ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {_OUT.value}: {stats.windows} windows in {stats.seconds:.1f} s')


if __name__ == '__main__':
  app.run(main)
