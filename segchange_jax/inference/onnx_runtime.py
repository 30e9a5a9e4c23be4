"""ONNX Runtime backend: runs the model files of an ONNX bundle (inference/onnx_export.py) on
scenes, as shipped.

`OnnxDetector` wraps one file and knows its kind (`bundle.PROMPT`: uint8 images and a prompt
index; `bundle.EMBEDDINGS`: uint8 images and an embedding; `bundle.RAW`: the `--raw_inputs`
float graph); `OnnxDetector.predictor` turns it into the sliding-window engine's predict
function: the uint8 windows go into the graph unchanged and its probabilities come out (a RAW
graph is normalised and its logits turned into probabilities here, as for the JAX model).
`load_model` is what `infer --backend onnxruntime` calls.

A file exported with `--prompt_batch P` (`OnnxDetector.prompt_batch`) answers P prompts per
image pair in one call; it runs any 1..P prompts: a shorter list is padded to P by repeating
its first prompt and the padding's outputs are dropped. More than P prompts, or several on a
one-prompt file, is one OnnxBackendError naming the --prompt_batch to re-export with.
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
  """An InferenceSession of one bundle graph (module docstring).

  `prompt_batch`: P of a `--prompt_batch P` export, None for a one-prompt file (it is also the
  flag pipeline.detector_predictor reads to pass [B, P, T, L] embeddings to predict_logits).
  """

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
    third = inputs['prompt' if self.kind == bundle.PROMPT else 'text_emb'].shape
    # ['b'] / ['b', T, L] take one prompt; ['b', P] / ['b', P, T, L] take P.
    multi = len(third) == (2 if self.kind == bundle.PROMPT else 4)
    self.prompt_batch = int(third[1]) if multi else None
    self.text_shape = (tuple(int(d) for d in inputs['text_emb'].shape[-2:])
                       if 'text_emb' in inputs else None)
    out = self.session.get_outputs()[0].shape  # [b, S, S, K], [b, S, S, P] or [b, S, S, P, K]
    self.classes = int(out[4]) if len(out) == 5 else 1 if multi else int(out[3])
    self.prompts = json.loads(meta.get('segchange.prompts', '[]'))

  def _check(self, image_a: np.ndarray) -> None:
    if tuple(image_a.shape[1:3]) != (self.size, self.size):
      raise OnnxBackendError(
          f'{self.path} was exported for {self.size} px windows, got {image_a.shape[1:3]}; '
          f'use --window {self.size} (a scene smaller than that needs an export with a smaller '
          '--size)')

  def check_prompt_count(self, n: int) -> None:
    """Refuses `n` prompts per pair that this file cannot answer in one call."""
    if n < 1:
      raise OnnxBackendError(f'{self.path}: no prompt given; give at least one')
    if self.prompt_batch is None and n > 1:
      raise OnnxBackendError(f'{self.path} was exported for one prompt per call, got {n}: '
                             f're-export with --prompt_batch {n}')
    if self.prompt_batch is not None and n > self.prompt_batch:
      raise OnnxBackendError(f'{self.path} was exported for {self.prompt_batch} prompts, got '
                             f'{n}: re-export with --prompt_batch {n}')

  def _pad(self, third: np.ndarray) -> tuple[np.ndarray, int]:
    """Prompt input [B, n, ...] -> ([B, P, ...], n): padded with copies of its first prompt
    (a real prompt, so the padding computes finite numbers that are then dropped)."""
    n = third.shape[1]
    self.check_prompt_count(n)
    if n < self.prompt_batch:
      fill = np.repeat(third[:, :1], self.prompt_batch - n, axis=1)
      third = np.concatenate([third, fill], axis=1)
    return third, n

  def run(self, image_a: np.ndarray, image_b: np.ndarray, third: np.ndarray) -> list[np.ndarray]:
    """The graph's outputs for images [B, S, S, 3] (uint8; float32 normalised for RAW) and
    the prompt indices [B] (PROMPT) or embeddings [B, T, L]; for a `prompt_batch` P file
    [B, P] / [B, P, T, L], the graph's outputs as they are (use `run_prompts` for fewer than P
    prompts)."""
    self._check(image_a)
    dtype = np.float32 if self.kind == bundle.RAW else np.uint8
    third = (np.ascontiguousarray(third, np.int32) if self.kind == bundle.PROMPT
             else np.ascontiguousarray(third, np.float32))
    feeds = dict(zip(self.input_names, (np.ascontiguousarray(image_a, dtype),
                                        np.ascontiguousarray(image_b, dtype), third)))
    return self.session.run(None, feeds)

  def run_prompts(self, image_a: np.ndarray, image_b: np.ndarray, third: np.ndarray
                  ) -> list[np.ndarray]:
    """`run` for n <= P prompts per pair on a `prompt_batch` P file: `third` [B, n] (PROMPT)
    or [B, n, T, L], padded to P; each output cut back to the n prompts (prompt axis 3)."""
    if self.prompt_batch is None:
      self.check_prompt_count(np.shape(third)[1])
      return self.run(image_a, image_b, np.asarray(third)[:, 0])
    padded, n = self._pad(np.asarray(third))
    return [y[:, :, :, :n] for y in self.run(image_a, image_b, padded)]

  def predict_logits(self, image_a: np.ndarray, image_b: np.ndarray,
                     text_emb: np.ndarray) -> np.ndarray:
    """RAW graphs: [B, S, S, 3] normalised images and [B, T, L] embeddings -> [B, S, S, K]
    logits (ChangeDetector.predict_logits' signature); on a `prompt_batch` P file also
    [B, n, T, L] (n <= P) -> [B, S, S, n] (K = 1) or [B, S, S, n, K]."""
    if self.kind != bundle.RAW:
      raise OnnxBackendError(f'{self.path} takes uint8 images and returns probabilities '
                             '(predict_logits needs an export with --raw_inputs)')
    text_emb = np.asarray(text_emb, np.float32)
    if text_emb.ndim == 4:
      return self.run_prompts(image_a, image_b, text_emb)[0]
    if self.prompt_batch is None:
      return self.run(image_a, image_b, text_emb)[0]
    logits = self.run_prompts(image_a, image_b, text_emb[:, None])[0]  # one prompt of P
    return logits if self.classes == 1 else logits[:, :, :, 0]

  def predictor(self, prompt_index: int | list[int] | None = None,
                text_emb: np.ndarray | None = None):
    """The engine's PredictFn (uint8 a, b -> probabilities [B, S, S], or [B, S, S, K] for K
    classes) with the prompt `prompt_index` (PROMPT graphs) or the embedding `text_emb`
    [T, L] / [1, T, L].

    Several prompts in one call (a `prompt_batch` P file, n <= P): `prompt_index` a list of n
    rows, or `text_emb` [n, T, L] / [1, n, T, L]; probabilities [B, S, S, n * K], prompt-major
    (pipeline.prompt_logits_to_probs' layout).
    """
    from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
    several = (isinstance(prompt_index, (list, tuple, np.ndarray)) if self.kind == bundle.PROMPT
               else np.ndim(text_emb) == 4 or (np.ndim(text_emb) == 3 and
                                               np.shape(text_emb)[0] > 1))
    if self.kind == bundle.PROMPT:
      rows = np.asarray(prompt_index if several else [prompt_index], np.int32)
      self.check_prompt_count(len(rows))
      third = lambda n: np.broadcast_to(rows[None], (n, len(rows)))
    else:
      emb = np.asarray(text_emb, np.float32).reshape((1, -1, *self.text_shape))
      self.check_prompt_count(emb.shape[1])
      if self.kind == bundle.RAW:
        # A one-prompt file takes [1, T, L] (its one prompt, checked above).
        batch = several and self.prompt_batch is not None
        return pipeline.detector_predictor(self, emb if batch else emb[:, 0])
      third = lambda n: np.broadcast_to(emb, (n, *emb.shape[1:]))

    def predict(a: np.ndarray, b: np.ndarray) -> np.ndarray:
      probabilities = self.run_prompts(a, b, third(a.shape[0]))[0]
      if self.prompt_batch is not None:  # [B, S, S, n] or [B, S, S, n, K]
        probabilities = probabilities.reshape(*probabilities.shape[:3], -1)
      if several:
        return probabilities
      return probabilities[..., 0] if self.classes == 1 else probabilities
    return predict


def load_model(checkpoint: str | None, onnx_file: str | None, config=None,
               prompt: str | None = None, embeddings: str | None = None,
               text_model: str | None = None, window: int | None = None,
               prompts: list[str] | None = None):
  """`pipeline.Model` running an ONNX bundle as shipped, for `infer --backend onnxruntime`.

  The config (prompt, infer.* defaults) is --config or the export folder's config.json, with
  infer.window set to the exported size. A prompt in the file's prompt table (and no
  --embeddings / --text_model) runs model.onnx with its index; any other prompt runs
  model_embeddings.onnx beside it with the prompt's embedding (from --embeddings, the folder's
  prompts.npz, or the text encoder). A `--raw_inputs` model.onnx takes the embedding too.
  `prompts` (instead of `prompt`, checked as predictor.check_prompts does): up to the file's
  `prompt_batch` P prompts in one call per window batch, probabilities prompt-major as the JAX
  model's; more prompts than P (or several on a one-prompt export) is one OnnxBackendError
  naming the --prompt_batch to re-export with.
  """
  from segchange_jax import config_lib  # pylint: disable=g-import-not-at-top
  from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  if prompts is not None:
    if prompt is not None:
      raise OnnxBackendError(f'give prompt= (one prompt) or prompts= (several), not both (got '
                             f'prompt={prompt!r} and prompts={prompts!r})')
    prompts = _check_prompts(prompts)
  path = find_model(checkpoint, onnx_file)
  det = OnnxDetector(path)
  if window is not None and int(window) != det.size:
    raise OnnxBackendError(f'--window {window}: {path} takes {det.size} px windows only; drop '
                           f'--window or re-export with --size {window}')
  if prompts is not None:  # before any text is encoded
    det.check_prompt_count(len(prompts))
  folder = os.path.dirname(os.path.abspath(path))
  if config is None:
    cfg_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(cfg_path):
      raise OnnxBackendError(f'{cfg_path} is missing; pass --config (the model\'s configs/*.py)')
    with open(cfg_path) as f:
      config = config_lib.config_from_dict(json.load(f))
  config = config.copy_and_resolve_references()
  config.infer.window = det.size
  wanted = prompts if prompts is not None else [
      prompt if prompt is not None else config.data.prompt]
  explicit = embeddings is not None or text_model is not None

  def tags(file: str) -> dict:
    if prompts is None:
      return dict(CHECKPOINT=os.path.abspath(file), PROMPT=wanted[0], BACKEND='onnxruntime')
    return dict(CHECKPOINT=os.path.abspath(file), PROMPTS=json.dumps(wanted),
                BACKEND='onnxruntime')

  if det.kind == bundle.PROMPT and not explicit and all(p in det.prompts for p in wanted):
    rows = [det.prompts.index(p) for p in wanted]
    return pipeline.Model(det.predictor(prompt_index=rows if prompts is not None else rows[0]),
                          config, tags(path))
  if det.kind == bundle.PROMPT:
    other = os.path.join(folder, bundle.embeddings_file(os.path.basename(path)))
    if not os.path.isfile(other):
      outside = [p for p in wanted if p not in det.prompts]
      raise OnnxBackendError(
          f'--prompt {outside[0]!r} is not in the prompt table of {path} ({det.prompts}) and '
          f'{other} (the graph that takes an embedding) does not exist; use one of those '
          'prompts or re-export with --prompts')
    path, det = other, OnnxDetector(other)
  bundle_prompts = os.path.join(folder, bundle.PROMPTS_FILE)
  if not explicit and os.path.isfile(bundle_prompts):
    if all(p in bundle.load_prompts(folder) for p in wanted):
      embeddings = bundle_prompts
  if (int(config.text.max_tokens), int(config.text.dim)) != det.text_shape:
    raise OnnxBackendError(f'the config\'s text shape does not fit {path}, which takes '
                           f'text_emb [b, {det.text_shape[0]}, {det.text_shape[1]}]; pass the '
                           'matching --config')
  embs = [prompts_lib.embed_one(config, p, npz=embeddings, text_model=text_model)
          for p in wanted]
  if prompts is None:
    return pipeline.Model(det.predictor(text_emb=embs[0]), config, tags(path))
  return pipeline.Model(det.predictor(text_emb=np.concatenate(embs)[None]), config, tags(path))


def _check_prompts(prompts) -> list[str]:
  """predictor.check_prompts' rules (a list of distinct, non-empty strings) as
  OnnxBackendError, without importing the JAX model code."""
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, '__iter__'):
    raise OnnxBackendError(f'prompts={prompts!r} must be a list of strings')
  prompts = list(prompts)
  if not prompts:
    raise OnnxBackendError('prompts=[] is empty: give at least one prompt')
  seen: dict[str, int] = {}
  for i, p in enumerate(prompts):
    if not isinstance(p, str) or not p.strip():
      raise OnnxBackendError(f'prompts[{i}]={p!r} is empty or not a string: every prompt must '
                             'name a change')
    key = ' '.join(p.split())
    if key in seen:
      raise OnnxBackendError(f'prompts[{i}]={p!r} repeats prompts[{seen[key]}]: give each '
                             'prompt once')
    seen[key] = i
  return prompts
