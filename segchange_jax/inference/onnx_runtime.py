"""ONNX Runtime backend: runs the model files of an ONNX bundle (inference/onnx_export.py) on
scenes, as shipped.

`OnnxDetector` wraps one file and knows its kind (`bundle.PROMPT`: uint8 images and a prompt
index; `bundle.EMBEDDINGS`: uint8 images and an embedding; `bundle.RAW`: the `--raw_inputs`
float graph); `OnnxDetector.predictor` turns it into the sliding-window engine's predict
function: the uint8 windows go into the graph unchanged and its probabilities come out (a RAW
graph is normalised and its logits turned into probabilities here, as for the JAX model).
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
  """An InferenceSession of one bundle graph (module docstring)."""

  def __init__(self, path: str, threads: int = 0):
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)  # 0: onnxruntime's default (all cores)
    self.session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    self.path = path
    inputs = {i.name: i for i in self.session.get_inputs()}
    meta = self.session.get_modelmeta().custom_metadata_map
    if 'prompt' in inputs:
      self.kind = bundle.PROMPT
    elif inputs['image_a'].type == 'tensor(uint8)':
      self.kind = bundle.EMBEDDINGS
    else:
      self.kind = bundle.RAW
    self.input_names = list(inputs)
    self.size = int(inputs['image_a'].shape[1])  # ['b', S, S, 3]
    self.text_shape = (tuple(int(d) for d in inputs['text_emb'].shape[1:])
                       if 'text_emb' in inputs else None)
    self.classes = int(self.session.get_outputs()[0].shape[3])
    self.prompts = json.loads(meta.get('segchange.prompts', '[]'))

  def _check(self, image_a: np.ndarray) -> None:
    if tuple(image_a.shape[1:3]) != (self.size, self.size):
      raise OnnxBackendError(
          f'{self.path} was exported for {self.size} px windows, got {image_a.shape[1:3]}; '
          f'use --window {self.size} (a scene smaller than that needs an export with a smaller '
          '--size)')

  def run(self, image_a: np.ndarray, image_b: np.ndarray, third: np.ndarray) -> list[np.ndarray]:
    """The graph's outputs for images [B, S, S, 3] (uint8; float32 normalised for RAW) and
    the prompt indices [B] (PROMPT) or embeddings [B, T, L]."""
    self._check(image_a)
    dtype = np.float32 if self.kind == bundle.RAW else np.uint8
    third = (np.ascontiguousarray(third, np.int32) if self.kind == bundle.PROMPT
             else np.ascontiguousarray(third, np.float32))
    feeds = dict(zip(self.input_names, (np.ascontiguousarray(image_a, dtype),
                                        np.ascontiguousarray(image_b, dtype), third)))
    return self.session.run(None, feeds)

  def predict_logits(self, image_a: np.ndarray, image_b: np.ndarray,
                     text_emb: np.ndarray) -> np.ndarray:
    """RAW graphs: [B, S, S, 3] normalised images and [B, T, L] embeddings -> [B, S, S, K]
    logits (ChangeDetector.predict_logits' signature)."""
    if self.kind != bundle.RAW:
      raise OnnxBackendError(f'{self.path} takes uint8 images and returns probabilities '
                             '(predict_logits needs an export with --raw_inputs)')
    return self.run(image_a, image_b, text_emb)[0]

  def predictor(self, prompt_index: int | None = None, text_emb: np.ndarray | None = None):
    """The engine's PredictFn (uint8 a, b -> probabilities [B, S, S], or [B, S, S, K] for K
    classes) with the prompt `prompt_index` (PROMPT graphs) or the embedding `text_emb`
    [T, L] / [1, T, L]."""
    from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
    if self.kind == bundle.RAW:
      return pipeline.detector_predictor(self, text_emb)
    if self.kind == bundle.PROMPT:
      row = np.int32(prompt_index)
      third = lambda n: np.full((n,), row, np.int32)
    else:
      emb = np.asarray(text_emb, np.float32).reshape((1, *self.text_shape))
      third = lambda n: np.broadcast_to(emb, (n, *self.text_shape))

    def predict(a: np.ndarray, b: np.ndarray) -> np.ndarray:
      probabilities = self.run(a, b, third(a.shape[0]))[0]
      return probabilities[..., 0] if self.classes == 1 else probabilities
    return predict


def load_model(checkpoint: str | None, onnx_file: str | None, config=None,
               prompt: str | None = None, embeddings: str | None = None,
               text_model: str | None = None, window: int | None = None):
  """`pipeline.Model` running an ONNX bundle as shipped, for `infer --backend onnxruntime`.

  The config (prompt, infer.* defaults) is --config or the export folder's config.json, with
  infer.window set to the exported size. A prompt in the file's prompt table (and no
  --embeddings / --text_model) runs model.onnx with its index; any other prompt runs
  model_embeddings.onnx beside it with the prompt's embedding (from --embeddings, the folder's
  prompts.npz, or the text encoder). A `--raw_inputs` model.onnx takes the embedding too.
  """
  from segchange_jax import config_lib  # pylint: disable=g-import-not-at-top
  from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
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
  explicit = embeddings is not None or text_model is not None
  if det.kind == bundle.PROMPT and not explicit and prompt in det.prompts:
    tags = dict(CHECKPOINT=os.path.abspath(path), PROMPT=prompt, BACKEND='onnxruntime')
    return pipeline.Model(det.predictor(prompt_index=det.prompts.index(prompt)), config, tags)
  if det.kind == bundle.PROMPT:
    other = os.path.join(folder, bundle.embeddings_file(os.path.basename(path)))
    if not os.path.isfile(other):
      raise OnnxBackendError(
          f'--prompt {prompt!r} is not in the prompt table of {path} ({det.prompts}) and '
          f'{other} (the graph that takes an embedding) does not exist; use one of those '
          'prompts or re-export with --prompts')
    path, det = other, OnnxDetector(other)
  bundle_prompts = os.path.join(folder, bundle.PROMPTS_FILE)
  if not explicit and os.path.isfile(bundle_prompts):
    if prompt in bundle.load_prompts(folder):
      embeddings = bundle_prompts
  if (int(config.text.max_tokens), int(config.text.dim)) != det.text_shape:
    raise OnnxBackendError(f'the config\'s text shape does not fit {path}, which takes '
                           f'text_emb [b, {det.text_shape[0]}, {det.text_shape[1]}]; pass the '
                           'matching --config')
  emb = prompts.embed_one(config, prompt, npz=embeddings, text_model=text_model)
  tags = dict(CHECKPOINT=os.path.abspath(path), PROMPT=prompt, BACKEND='onnxruntime')
  return pipeline.Model(det.predictor(text_emb=emb), config, tags)
