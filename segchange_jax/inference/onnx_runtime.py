"""ONNX Runtime backend: runs model.onnx (segchange_jax.inference.onnx_export) on scenes.

`OnnxDetector.predict_logits(a, b, text_emb)` has ChangeDetector's signature, so
`pipeline.detector_predictor` turns it into the sliding-window engine's predict function;
`load_model` is what `infer --backend onnxruntime` calls.
"""

from __future__ import annotations

import json
import os

import numpy as np

from segchange_jax.inference import bundle
from segchange_jax.inference import onnx_export


class OnnxBackendError(ValueError):
  """The ONNX file or its settings do not fit; the message names the flag and the fix."""


def find_model(checkpoint: str | None, onnx_file: str | None) -> str:
  """--onnx FILE, else CHECKPOINT/model.onnx of an `export --format onnx` folder."""
  path = onnx_file or (os.path.join(checkpoint, onnx_export.MODEL_FILE) if checkpoint else None)
  if not path or not os.path.isfile(path):
    raise OnnxBackendError(
        f'--backend onnxruntime: ONNX model {path!r} does not exist; pass --onnx FILE or a '
        '--checkpoint folder written by python -m segchange_jax.export --format onnx')
  return path


class OnnxDetector:
  """An InferenceSession of model.onnx with ChangeDetector's predict_logits signature."""

  def __init__(self, path: str, threads: int = 0):
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)  # 0: onnxruntime's default (all cores)
    self.session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    self.path = path
    shape = self.session.get_inputs()[0].shape  # ['b', S, S, 3]
    self.size = int(shape[1])
    self.text_shape = tuple(int(d) for d in self.session.get_inputs()[2].shape[1:])

  def predict_logits(self, image_a: np.ndarray, image_b: np.ndarray,
                     text_emb: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] normalised images and [B, T, L] embeddings -> [B, S, S, K] logits."""
    if tuple(image_a.shape[1:3]) != (self.size, self.size):
      raise OnnxBackendError(
          f'{self.path} was exported for {self.size} px windows, got {image_a.shape[1:3]}; '
          f'use --window {self.size} (a scene smaller than that needs an export with a smaller '
          '--size)')
    feeds = {'image_a': np.ascontiguousarray(image_a, np.float32),
             'image_b': np.ascontiguousarray(image_b, np.float32),
             'text_emb': np.ascontiguousarray(text_emb, np.float32)}
    return self.session.run(None, feeds)[0]


def load(checkpoint: str | None, onnx_file: str | None, config=None,
         prompt: str | None = None, embeddings: str | None = None,
         text_model: str | None = None, window: int | None = None):
  """(OnnxDetector, config, embeddings .npz or None, tags) for `infer --backend onnxruntime`.

  The config (prompt, infer.* defaults) is --config or the export folder's config.json, with
  infer.window set to the exported size; the prompt's embedding is taken from the folder's
  prompts.npz when it holds that prompt (no text encoder needed).
  """
  from segchange_jax import config_lib  # pylint: disable=g-import-not-at-top
  path = find_model(checkpoint, onnx_file)
  det = OnnxDetector(path)
  if window is not None and int(window) != det.size:
    raise OnnxBackendError(f'--window {window}: {path} takes {det.size} px windows only; drop '
                           f'--window or re-export with --size {window}')
  folder = os.path.dirname(os.path.abspath(path))
  if config is None:
    cfg_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(cfg_path):
      raise OnnxBackendError(f'{cfg_path} is missing; pass --config (the model\'s configs/*.py)')
    with open(cfg_path) as f:
      config = config_lib.config_from_dict(json.load(f))
  config = config.copy_and_resolve_references()
  config.infer.window = det.size
  prompt = prompt if prompt is not None else config.data.prompt
  bundle_prompts = os.path.join(folder, bundle.PROMPTS_FILE)
  if embeddings is None and text_model is None and os.path.isfile(bundle_prompts):
    if prompt in bundle.load_prompts(folder):
      embeddings = bundle_prompts
  if (int(config.text.max_tokens), int(config.text.dim)) != det.text_shape:
    raise OnnxBackendError(f'the config\'s text shape does not fit {path}, which takes '
                           f'text_emb [b, {det.text_shape[0]}, {det.text_shape[1]}]; pass the '
                           'matching --config')
  tags = dict(CHECKPOINT=os.path.abspath(path), PROMPT=prompt, BACKEND='onnxruntime')
  return det, config, embeddings, tags


def load_model(checkpoint: str | None, onnx_file: str | None, config=None,
               prompt: str | None = None, embeddings: str | None = None,
               text_model: str | None = None, window: int | None = None):
  """`pipeline.Model` running the ONNX file (see `load`), for library callers."""
  from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
  det, config, embeddings, tags = load(checkpoint, onnx_file, config, prompt, embeddings,
                                       text_model, window)
  emb = prompts.embed_one(config, tags['PROMPT'], npz=embeddings, text_model=text_model)
  return pipeline.Model(pipeline.detector_predictor(det, emb), config, tags)
