r"""Change detection on a pair of large rasters (or plain images) with a trained checkpoint.

  python -m segchange_jax.infer --checkpoint CKPT --a A.tif --b B.tif \
      --prompt "Buildings with changes" --out change.tif [--polygons change.geojson]
  python -m segchange_jax.infer --checkpoint CKPT --a A.tif --b B.tif \
      --prompt "new buildings" --prompt "new roads" --out change.tif --polygons change.gpkg

--checkpoint: anything segchange_jax.interop.checkpoints.load_variables reads (training
checkpoints, a convert_torch output, an export bundle; an upstream .pth with --config). Only the
model variables are read (not the optimizer state). --window, --overlap, --batch, --threshold and
--prompt default to the checkpoint config's infer.window / infer.overlap / infer.batch_size /
infer.threshold and data.prompt. A window larger than the raster is clamped (with a warning).
The prompt embedding comes from --embeddings (an .npz from segchange_jax.embed_prompts or an
export bundle's prompts.npz), else the prompt is encoded with the checkpoint config's text
settings (or --text_model).

Outputs never replace an input (refused) nor an existing file (unless --overwrite); each is
written under a temporary name beside it and renamed when the whole run succeeded
(segchange_jax.atomic). The format follows the extension (the table of
segchange_jax/inference/formats.py); other extensions are refused:
- `--out X.tif`: Cloud-Optimized GeoTIFF (256 px tiles, overviews, deflate) with A's CRS and
  transform, tags CHECKPOINT, PROMPT, TTA (jax backend), THRESHOLD, WINDOW, OVERLAP,
  SEGCHANGE_JAX_VERSION. Default a uint8 mask with a colour table: 0 no change, 1 change
  (class id for multi-class models), 255 nodata. `--probabilities`: float32 probabilities
  instead (one band per class, nodata NaN).
- `--out X.png`: 0/255 mask (nodata written as 0), only for inputs without georeferencing.
- `--probability_out P.tif`: float32 change probabilities as a second COG beside the mask.
- `--polygons V.geojson|V.gpkg|V.fgb` (repeatable): change regions (after `--postprocess`) with
  properties value, area (map units^2), area_px; GeoJSON is RFC 7946 (WGS 84), GeoPackage and
  FlatGeobuf keep the raster CRS (segchange_jax.inference.vectors).
- `--preview Q.png`: a small picture A | B | overlay (change red on a darkened B).
With --probabilities, --postprocess only shapes the polygons (the raster keeps raw probabilities).
--prompt given P > 1 times: each window batch goes through the model once for all P prompts
(backbone to neck once, the mask head for the P prompts as one batch), and the outputs hold
them all: --out and --probability_out get one band per prompt (band i = the i-th --prompt;
P x K probability bands for K classes), each band's description and band tag PROMPT set to its
prompt, the file tag PROMPTS a JSON list of them (instead of PROMPT); --polygons get every
prompt's regions in one layer with a `prompt` attribute; --postprocess filters each prompt's
mask; --preview draws prompt i in its own colour (red, blue, yellow, green, ...). Prompts must
be distinct and non-empty. A PNG --out (one mask) is refused for several prompts, and so is
--backend onnxruntime on an export that takes fewer prompts per call (export --prompt_batch P
takes up to P; segchange_jax/inference/onnx_runtime.py). One --prompt writes exactly the
single-prompt outputs above.
Inputs: a raster file or three single-band files 'R.TIF,G.TIF,B.TIF' per date; band and 16-bit
rules in segchange_jax/data/imagery.py, nodata and grid rules in
segchange_jax/inference/raster_io.py; A and B must share a pixel grid unless --align. Windowing
and blending: segchange_jax/inference/sliding_window.py.
--tta flips|d4: test-time augmentation (segchange_jax/models/tta.py): every window batch goes
through the model once as 4 (flips) or 8 (d4: flips, 90-degree rotations, transposes) flipped
or rotated copies, whose logits are averaged in the window's own frame; about 4x / 8x the model
time and memory per window (lower --batch if memory runs out). Windows are always square (a
small scene gets a clamped square window or is padded to one), so d4 works on any scene.
Example, Landsat-8 scenes of adjacent WRS rows (B stored as single-band files, 0 = fill):

  python -m segchange_jax.infer --checkpoint CKPT --a LC08_..._224078_..._RT.TIF --bands 3,2,1 \
      --b LC08_..._224077_..._B4.TIF,LC08_..._224077_..._B3.TIF,LC08_..._224077_..._B2.TIF \
      --nodata 0 --align --out change.tif
(--bands applies to every single-file date; a stack is already R,G,B.)
"""

from __future__ import annotations

import re

from absl import flags

from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax import default_config
from segchange_jax.inference import formats
from segchange_jax.inference.pipeline import check_settings
from segchange_jax.inference.pipeline import run_inference
from segchange_jax.models import tta


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly).

  The post-processing flags default to default_config's infer.*; --window, --overlap, --batch
  and --threshold to the checkpoint config's (pipeline.run_inference), and --out, --polygons
  list the formats of inference/formats.py.
  """
  d = default_config.get_config().infer
  config_lib.define_checkpoint_flags()
  flags.DEFINE_string('a', None, 'Date A: raster, "R,G,B" single-band files, or PNG/JPEG.')
  flags.DEFINE_string('b', None, 'Date B, same forms as --a.')
  flags.DEFINE_string('out', None, f'Output mask: {formats.describe(formats.RASTER)}.')
  flags.DEFINE_boolean('overwrite', False, 'Replace outputs that already exist.')
  flags.DEFINE_multi_string('prompt', None, "Text prompt (default: the checkpoint config's "
                            'data.prompt); repeat it for several prompts in one pass (one '
                            'output band and polygon `prompt` value per prompt).')
  flags.DEFINE_integer('window', None, 'Window size fed to the model (multiple of 32; '
                       'default config.infer.window).')
  flags.DEFINE_integer('overlap', None, 'Overlap between neighbouring windows (px; '
                       'default config.infer.overlap).')
  flags.DEFINE_integer('batch', None, 'Windows per model call (default '
                       'config.infer.batch_size).')
  flags.DEFINE_float('threshold', None, 'Change if probability > threshold, in (0, 1) '
                     '(default config.infer.threshold).')
  flags.DEFINE_boolean('probabilities', False, 'Write float32 probabilities to --out '
                       'instead of a mask.')
  flags.DEFINE_string('probability_out', None, 'Also write float32 change '
                      'probabilities to this .tif (COG).')
  flags.DEFINE_boolean('postprocess', d.postprocess, 'Drop components failing the shape rules.')
  flags.DEFINE_integer('min_area', d.min_area, 'Post-process: minimum component area (px).')
  flags.DEFINE_float('max_perimeter_ratio', d.max_perimeter_ratio,
                     'Post-process: max perimeter/area.')
  flags.DEFINE_float('min_convexity', d.min_convexity,
                     'Post-process: min area/convex-hull area.')
  flags.DEFINE_multi_string('polygons', None, 'Also write change polygons: '
                            f'{formats.describe(formats.VECTOR)}; repeatable.')
  flags.DEFINE_string('preview', None, 'Also write a small PNG: A | B | change overlay.')
  flags.DEFINE_boolean('align', False, "Reproject B onto A's grid (bilinear WarpedVRT).")
  flags.DEFINE_list('bands', None, '1-based bands to use as R,G,B (e.g. 1,2,3).')
  flags.DEFINE_float('nodata', None, 'Input nodata value for files that carry none (e.g. 0).')
  flags.DEFINE_string('text_model', None, 'Text encoder (Hub id, HF dir, GGUF or pkg:NAME) '
                      "for --prompt; default the checkpoint config's text.model.")
  flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (prompts, '
                      'embeddings; from segchange_jax.embed_prompts or an export '
                      'bundle) holding --prompt; skips the text encoder.')
  flags.DEFINE_enum('backend', 'jax', ['jax', 'onnxruntime'], 'jax: the checkpoint '
                    'through segchange_jax; onnxruntime: an ONNX export (--onnx, or '
                    'model.onnx in the --checkpoint folder of export --format onnx).')
  flags.DEFINE_string('onnx', None, '--backend onnxruntime: the model.onnx to run (uint8 '
                      'images in, probabilities out; a prompt outside its table runs the '
                      'model_embeddings.onnx beside it).')
  flags.DEFINE_enum('tta', 'none', list(tta.SETS), 'Test-time augmentation: none, flips '
                    '(4 views) or d4 (8 views: flips, 90-degree rotations, transposes); logits '
                    'averaged, one model call of views x batch windows.')
  flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
  flags.DEFINE_integer('gdal_cache_mb', 256, 'GDAL block cache (MB); GDAL defaults to '
                       '5% of RAM, which would dominate the memory of a big scene.')


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}; flags take the form --name=value')
  for name in ('checkpoint', 'a', 'b', 'out'):
    if name == 'checkpoint' and f.backend == 'onnxruntime' and f.onnx:
      continue
    if not f[name].value:
      raise cli.UsageError(f'--{name} is required (see --help)')
  check_settings(f.window, f.overlap, f.batch, f.threshold)
  prompt_list = _prompts(f.prompt)
  prompt = f.prompt[0] if f.prompt and prompt_list is None else None
  cli.quiet_libraries()
  config = config_lib.validate_config(f.config) if f.config is not None else None
  if f.backend == 'onnxruntime' and f.tta != 'none':
    raise cli.UsageError(f'--tta {f.tta} runs inside the JAX model; use --backend jax (or '
                         '--tta none with --backend onnxruntime)')
  if f.backend == 'onnxruntime':  # the exported file through the same engine
    from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
    several = {} if prompt_list is None else {'prompts': prompt_list}
    factory = lambda: onnx_runtime.load_model(f.checkpoint, f.onnx, config, prompt,
                                              f.embeddings, f.text_model, f.window, **several)
  else:
    factory = lambda: _load_jax_model(f.checkpoint, config, prompt, f.embeddings, f.text_model,
                                      f.tta, prompt_list)
  stats = run_inference(
      f.a, f.b, f.out, None, window=f.window, overlap=f.overlap,
      batch=f.batch, threshold=f.threshold, probabilities=f.probabilities,
      do_postprocess=f.postprocess, min_area=f.min_area, max_perimeter_ratio=f.max_perimeter_ratio,
      min_convexity=f.min_convexity, polygons_path=f.polygons,
      probs_path=f.probability_out, preview_path=f.preview, overwrite=f.overwrite,
      align=f.align, bands=_bands(f.bands), nodata=f.nodata,
      progress=f.progress, gdal_cache_mb=f.gdal_cache_mb, predictor_factory=factory,
      prompts=prompt_list)
  bands = ('' if prompt_list is None else
           ' (bands: ' + ', '.join(f'{i + 1} {p!r}' for i, p in enumerate(prompt_list)) + ')')
  print(f'wrote {f.out}{bands}: {stats.windows} windows in {stats.seconds:.1f} s')
  for name, c in stats.changed.items():
    area = '' if c['hectares'] is None else f', {c["hectares"]:.2f} ha'
    print(f'  {name!r}: {c["share"]:.2%} of the valid pixels changed ({c["pixels"]} px{area})')


def _prompts(values: list[str] | None) -> list[str] | None:
  """The --prompt list when given more than once (checked: distinct, non-empty), else None."""
  if not values or len(values) == 1:
    return None
  # The predictor module loads jax; only several prompts need its check before the model.
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  try:
    return predictor.check_prompts(values)
  except ValueError as e:  # its prompts[i] is the (i+1)-th --prompt
    raise cli.UsageError(re.sub(r'prompts\[(\d+)\]', lambda m: f'--prompt #{int(m[1]) + 1}',
                                str(e))) from e


def _load_jax_model(*args):
  # Lazy: jax, orbax and the model load only once the flags and outputs were checked.
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  return predictor.load_model(*args)


def _bands(values: list[str] | None) -> list[int] | None:
  if not values:
    return None
  try:
    return [int(x) for x in values]
  except ValueError as e:
    raise cli.UsageError(f'--bands={",".join(values)} must be 1-based integers, e.g. 1,2,3') from e


if __name__ == '__main__':
  define_flags()
  cli.run(main)
