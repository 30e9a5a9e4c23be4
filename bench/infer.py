r"""Scene inference throughput and peak memory: our streaming engine vs an upstream-style loop.

  python -m bench.infer [--sizes 2048,8192] [--window 512] [--overlap 64] [--batch 8]

For each scene size a synthetic GeoTIFF pair (EPSG:32618, tiled, deflate) is generated in
strips, then each method runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
- engine: segchange_jax.inference.pipeline.run_inference (windowed reads, batches, strip
  accumulators).
- upstream-style: whole rasters read into RAM, one window at a time, full-size sum/count
  arrays, output written at the end (engines/inference.py's structure, float sums instead of
  its uint8 overflow, rasterio instead of cv2 for the output).
Both use the same toy predictor (3x3 box filter of |A-B| through a sigmoid). With
segchange_jax.inference.predictor on the path and --checkpoint, the real model is timed too; with
--onnx DIR/model.onnx (export --format onnx of that checkpoint), also the same engine with the
model run by ONNX Runtime (model_onnxruntime).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from scipy import ndimage

from segchange_jax import default_config
from segchange_jax.inference import pipeline as infer_lib

_INFER = default_config.get_config().infer
_SIZES = flags.DEFINE_list('sizes', ['2048', '8192'], 'Square scene sizes (px).')
_WINDOW = flags.DEFINE_integer('window', _INFER.window, 'Window side (px), as infer --window.')
_OVERLAP = flags.DEFINE_integer('overlap', _INFER.overlap, 'Window overlap (px).')
_BATCH = flags.DEFINE_integer('batch', _INFER.batch_size, 'Windows per model call.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Also time this trained model.')
_ONNX = flags.DEFINE_string('onnx', None, 'Also time this model.onnx (export --format onnx).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where scenes are written (default: a temp dir).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: method,size,a,b,out to run in this process.')


def toy_predict(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
  d = ndimage.uniform_filter(d, size=(1, 3, 3), mode='nearest')
  return 1.0 / (1.0 + np.exp(-(d - 30.0) / 8.0))


def make_scene(path: str, size: int, changed: bool) -> None:
  """Smooth synthetic imagery written 512 rows at a time (never whole in memory)."""
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
  prof = dict(driver='GTiff', height=size, width=size, count=3, dtype='uint8', crs='EPSG:32618',
              transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=256,
              blockysize=256, compress='deflate')
  with rasterio.open(path, 'w', **prof) as ds:
    for y in range(0, size, 512):
      yy, xx = np.mgrid[y:min(y + 512, size), 0:size]
      base = (128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0)).astype(np.uint8)
      arr = np.stack([base, base // 2 + 40, 255 - base])
      if changed:
        arr[:, ((yy // 700 + xx // 700) % 5 == 0)] = 250
      ds.write(arr, window=Window(0, y, size, arr.shape[1]))


def upstream_style(a_path: str, b_path: str, out: str, window: int, overlap: int, predict) -> None:
  """Whole rasters in RAM, one window per call, full-size accumulators, write at the end."""
  import rasterio  # pylint: disable=g-import-not-at-top

  from segchange_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top
  with rasterio.open(a_path) as src:
    a = src.read().transpose(1, 2, 0)
    prof = src.profile
  with rasterio.open(b_path) as src:
    b = src.read().transpose(1, 2, 0)
  h, w = a.shape[:2]
  total = np.zeros((h, w), np.float32)
  count = np.zeros((h, w), np.float32)
  for y in sliding_window.window_starts(h, window, overlap):
    for x in sliding_window.window_starts(w, window, overlap):
      p = predict(a[None, y:y + window, x:x + window], b[None, y:y + window, x:x + window])[0]
      total[y:y + window, x:x + window] += p > 0.5
      count[y:y + window, x:x + window] += 1
  mask = (total / count >= 0.5).astype(np.uint8)
  prof.update(count=1, dtype='uint8')
  with rasterio.open(out, 'w', **prof) as ds:
    ds.write(mask[None])


def _model_predictor():
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  det = predictor.ChangeDetector.from_checkpoint(_CHECKPOINT.value)
  emb = np.zeros((1, det.config.text.max_tokens, det.config.text.dim), np.float32)
  return infer_lib.detector_predictor(det, emb)


def _onnx_predictor():
  from segchange_jax.inference import onnx_runtime  # pylint: disable=g-import-not-at-top
  det = onnx_runtime.OnnxDetector(_ONNX.value)
  # The file as shipped: uint8 windows in, probabilities out (row 0 of a prompt table).
  emb = np.zeros((1, *det.text_shape), np.float32) if det.text_shape else None
  return det.predictor(prompt_index=0, text_emb=emb)


def child(spec: str) -> None:
  method, size, a, b, out = spec.split(',')
  # The model is loaded (and, on first call, compiled) before the clock starts for both loops.
  predict = toy_predict
  if method.startswith('model'):
    predict = _onnx_predictor() if method == 'model_onnxruntime' else _model_predictor()
    for n in (1, _BATCH.value):  # compile the shapes both loops use
      zeros = np.zeros((n, _WINDOW.value, _WINDOW.value, 3), np.uint8)
      predict(zeros, zeros)
  start = time.perf_counter()
  if method in ('upstream', 'model_upstream'):
    upstream_style(a, b, out, _WINDOW.value, _OVERLAP.value, predict)
  else:
    infer_lib.run_inference(a, b, out, predict, channels=1, window=_WINDOW.value,
                            overlap=_OVERLAP.value, batch=_BATCH.value, progress=False)
  seconds = time.perf_counter() - start
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  print(json.dumps({'method': method, 'size': int(size), 'seconds': seconds,
                    'mpix_per_s': int(size) ** 2 / 1e6 / seconds, 'peak_rss_mb': rss_mb}))


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    child(_CHILD.value)
    return
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='bench_infer_')
  methods = ['engine', 'upstream']
  if _CHECKPOINT.value:
    methods += ['model', 'model_upstream']
  if _ONNX.value:  # the same model exported with export --format onnx, in the same engine
    methods += ['model_onnxruntime']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': repo}
  rows = []
  for size in (int(s) for s in _SIZES.value):
    a, b = (os.path.join(workdir, f'{n}_{size}.tif') for n in ('a', 'b'))
    if not os.path.exists(b):
      make_scene(a, size, False)
      make_scene(b, size, True)
    for method in methods:
      out = os.path.join(workdir, f'{method}_{size}.tif')
      cmd = [sys.executable, '-m', 'bench.infer', f'--child={method},{size},{a},{b},{out}',
             f'--window={_WINDOW.value}', f'--overlap={_OVERLAP.value}', f'--batch={_BATCH.value}']
      if _CHECKPOINT.value:
        cmd.append(f'--checkpoint={_CHECKPOINT.value}')
      if _ONNX.value:
        cmd.append(f'--onnx={_ONNX.value}')
      r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True)
      rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
      print(f"{rows[-1]['method']:>17} {size:>6}^2: {rows[-1]['mpix_per_s']:7.2f} MP/s  "
            f"peak RSS {rows[-1]['peak_rss_mb']:8.1f} MB  ({rows[-1]['seconds']:.1f} s)",
            flush=True)
  if not _CHECKPOINT.value:
    print('model: not timed (pass --checkpoint CKPT to time a trained model in both loops)')


if __name__ == '__main__':
  app.run(main)
