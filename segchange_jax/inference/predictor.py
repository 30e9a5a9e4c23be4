"""Inference API: load any SegChange checkpoint and predict change.

    det = ChangeDetector.from_checkpoint('runs/demo/checkpoints')
    result = det.predict(image_a, image_b, prompt='Buildings appearing or vanishing.')
    result.probabilities, result.mask        # [H, W] float32, [H, W] uint8 (any image size)
    det.predict_scene('A.tif', 'B.tif', out='change.tif', prompt='...')  # whole GeoTIFFs
    logits = det.predict_logits(a_normalised, b_normalised, text_embeddings)  # [B, H, W, K]
    det.predict(image_a, image_b, tta='flips')   # test-time augmentation (models/tta.py)
    by_prompt = det.predict(image_a, image_b, prompts=['new buildings', 'new roads'])
    by_prompt['new roads'].mask                  # one Prediction per prompt, ONE model pass

`predict` takes uint8 RGB [H, W, 3] arrays or image paths (PNG/JPEG/GeoTIFF read whole) and a
prompt string; the prompt is encoded with the checkpoint config's text encoder (or looked up in
`embeddings=`, an embed_prompts .npz) once and cached. Images of any size go through the same
windowed engine as `python -m segchange_jax.infer` (config.infer.window / overlap /
batch_size, Hann-blended overlaps); `predict_scene` is that command as a function.
`tta=` ('none', 'flips', 'd4'; segchange_jax/models/tta.py) averages the logits over flipped
and rotated copies of every window, all in the one jitted call per window batch (T x batch
windows); the engine's windows are square, so 'd4' works on images of any size.
`prompts=[...]` answers several prompts at once: each window goes through the model once, the
trunk (backbone, BEV, difference, neck) once and the mask head for all prompts as one batch
(models/segchange.py); the result is a dict prompt -> Prediction in the order given, each
equal to `predict(..., prompt=that_prompt)` up to float rounding.

Checkpoints: an upstream PyTorch `.pth` (converted on the fly; needs `config`), a directory
written by `python -m segchange_jax.convert_torch` (`variables/` + `config.json`), or a training
checkpoint directory of `segchange_jax.train` (`state/` + `config/` under a step directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segchange_jax import config_lib
from segchange_jax.interop import checkpoints
from segchange_jax.models import segchange
from segchange_jax.models import tta as tta_lib


@dataclasses.dataclass
class Prediction:
  """`predict`'s result: change probabilities [H, W] (binary; [H, W, K] softmax for K classes,
  NaN at nodata) and the mask [H, W] uint8 (0 / 1 or class id, 255 at nodata)."""
  probabilities: np.ndarray
  mask: np.ndarray


def check_prompts(prompts: Any) -> list[str]:
  """The prompts of `prompts=` as a list, or one ValueError naming the offending entry."""
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, '__iter__'):
    raise ValueError(f'prompts={prompts!r} must be a list of strings (prompt= takes one prompt)')
  prompts = list(prompts)
  if not prompts:
    raise ValueError('prompts=[] is empty: give at least one prompt')
  seen: dict[str, int] = {}
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f'prompts[{i}]={p!r} is not a string')
    if not p.strip():
      raise ValueError(f'prompts[{i}]={p!r} is empty: every prompt must name a change')
    key = ' '.join(p.split())
    if key in seen:
      raise ValueError(f'prompts[{i}]={p!r} repeats prompts[{seen[key]}]='
                       f'{prompts[seen[key]]!r}: give each prompt once')
    seen[key] = i
  return prompts


class _ArraySink:
  """Collects the engine's finished rows in memory."""
  block_rows = 1

  def __init__(self, height: int, width: int, channels: int):
    self.probs = np.zeros((height, width, channels), np.float32)
    self.valid = np.zeros((height, width), bool)

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    self.probs[row0:row0 + probs.shape[0]] = probs
    self.valid[row0:row0 + probs.shape[0]] = valid


class ChangeDetector:
  """A loaded model with a jitted forward pass (compiled once per input shape)."""
  # predict_logits takes [B, P, T, L] prompt batches (pipeline.detector_predictor checks this).
  prompt_batch = True

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               embeddings: str | None = None, checkpoint: str = ''):
    self.config = config
    self.model = segchange.build_model(config)
    self.variables = jax.tree.map(jnp.asarray, variables)
    self.embeddings = embeddings
    self.checkpoint = checkpoint
    self._prompts: dict[str, np.ndarray] = {}
    # `tta` is static: one compiled graph per set, and 'none' is the plain forward pass.
    self._forward = jax.jit(
        lambda v, a, b, t, tta: tta_lib.tta_logits(
            lambda a, b, t: self.model.apply(v, a, b, t, train=False), a, b, t, tta),
        static_argnums=4)

  @classmethod
  def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict | None = None,
                      embeddings: str | None = None) -> 'ChangeDetector':
    """Loads `path` (see interop.checkpoints.load_variables); `embeddings`: an optional
    embed_prompts .npz."""
    return cls(*checkpoints.load_variables(path, config), embeddings=embeddings,
               checkpoint=os.path.abspath(os.fspath(path)))

  def predict_logits(self, image_a: Any, image_b: Any, text_embeddings: Any,
                     tta: str = 'none') -> np.ndarray:
    """Logits [B, H, W, K] for ImageNet-normalised NHWC float images (H, W multiples of 32).

    A single image [H, W, 3] and text [T, L] are accepted too (batch of one). Text
    [B, P, T, L] (P prompts per pair, one model pass) gives [B, H, W, P] for K = 1 and
    [B, H, W, P, K] otherwise (models/segchange.py). `tta`: a set of
    segchange_jax.models.tta.SETS, averaged in one model call of T x B images ('d4' needs
    H == W).
    """
    tta_lib.resolve(tta)
    a, b = np.asarray(image_a, np.float32), np.asarray(image_b, np.float32)
    t = np.asarray(text_embeddings, np.float32)
    single = a.ndim == 3
    if single:
      a, b = a[None], b[None]
    if t.ndim == 2:
      t = np.broadcast_to(t[None], (a.shape[0], *t.shape))
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape != b.shape:
      raise ValueError(f'images must both be [B, H, W, 3] (got {a.shape} and {b.shape})')
    for side in a.shape[1:3]:
      config_lib.check_stride(side, 'image size', ValueError, f'image size {a.shape[1:3]} must '
                              'be a multiple of {stride} (pad or crop)')
    if t.ndim not in (3, 4) or t.shape[0] != a.shape[0] or t.shape[-1] != self.config.text.dim:
      raise ValueError(f'text embeddings {t.shape} must be [B={a.shape[0]}, T, '
                       f'{self.config.text.dim}] (config text.dim), or [B, P, T, '
                       f'{self.config.text.dim}] for P prompts')
    tta_lib.check_shape(tta, a.shape[1], a.shape[2])
    key = tta if isinstance(tta, str) else tuple(tta)  # a static jit argument: hashable
    out = np.asarray(self._forward(self.variables, a, b, t, key))
    return out[0] if single else out

  def embed(self, prompt: str | None = None) -> np.ndarray:
    """[1, T, L] embedding of `prompt` (default config.data.prompt), computed once per prompt."""
    from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
    prompt = self.config.data.prompt if prompt is None else prompt
    if prompt not in self._prompts:
      self._prompts[prompt] = prompts.embed_one(self.config, prompt, npz=self.embeddings)
    return self._prompts[prompt]

  def predictor(self, prompt: str | None = None, tta: str = 'none',
                prompts: list[str] | None = None):
    """(uint8 a, uint8 b) -> probabilities, the engine's PredictFn for `prompt`.

    With `prompts` (see check_prompts) one model call per window batch answers all of them:
    probabilities [B, H, W, P] (binary) or [B, H, W, P * K] (pipeline.detector_predictor).
    """
    from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
    if prompts is None:
      return pipeline.detector_predictor(self, self.embed(prompt), tta)
    if prompt is not None:
      raise ValueError(f'give prompt= (one prompt) or prompts= (several), not both (got '
                       f'prompt={prompt!r} and prompts={prompts!r})')
    prompts = check_prompts(prompts)
    emb = np.stack([self.embed(p)[0] for p in prompts])[None]  # [1, P, T, L]
    return pipeline.detector_predictor(self, emb, tta)

  def predict(self, image_a: Any, image_b: Any, prompt: str | None = None,
              threshold: float | None = None, tta: str = 'none',
              prompts: list[str] | None = None) -> Prediction | dict[str, Prediction]:
    """Change between two images of the same size (uint8 RGB [H, W, 3] arrays or paths).

    Windows, overlap, batch and threshold default to the config's infer.* values; `tta`
    ('none', 'flips', 'd4') as in predict_logits, on every window.
    `prompts=[...]` instead of `prompt=`: a dict prompt -> Prediction (in the order given),
    from one model pass per window batch for all prompts. Empty or repeated prompts (after
    collapsing whitespace) and `prompt=` with `prompts=` are a ValueError.
    """
    from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
    from segchange_jax.inference import raster_io  # pylint: disable=g-import-not-at-top
    from segchange_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top
    threshold = float(self.config.infer.threshold if threshold is None else threshold)
    pipeline.check_settings(threshold=threshold)
    tta_lib.resolve(tta)
    if prompts is not None:  # checked before any image is read
      if prompt is not None:
        raise ValueError(f'give prompt= (one prompt) or prompts= (several), not both (got '
                         f'prompt={prompt!r} and prompts={prompts!r})')
      prompts = check_prompts(prompts)
    raster = [x for x in (image_a, image_b)
              if isinstance(x, (str, os.PathLike)) and not raster_io.is_plain(os.fspath(x))]
    if raster:
      if len(raster) != 2:
        raise ValueError('give two GeoTIFF paths, or two arrays / plain image paths')
      source = raster_io.RasterPair(os.fspath(image_a), os.fspath(image_b))
    else:
      source = raster_io.ArrayPair(image_a, image_b)
    try:
      window, overlap = pipeline.clamp_window(int(self.config.infer.window),
                                           int(self.config.infer.overlap), source.height,
                                           source.width, quiet=True)
      channels = 1 if self.config.model.num_classes == 1 else int(self.config.model.num_classes)
      if prompts is not None:  # P prompts, each `channels` wide, prompt-major
        channels *= len(prompts)
      sink = _ArraySink(source.height, source.width, channels)
      # The batch of `infer` (not fewer for small images): one compiled shape, same numbers.
      predict_fn = (self.predictor(prompt, tta) if prompts is None else
                    self.predictor(tta=tta, prompts=prompts))
      sliding_window.run_scene(source, predict_fn, sink, window=window, overlap=overlap,
                      batch_size=int(self.config.infer.batch_size), channels=channels,
                      progress=False)
    finally:
      source.close()
    if prompts is None:
      mask = raster_io.encode(sink.probs, sink.valid, False, threshold)[0]
      probs = np.where(sink.valid[..., None], sink.probs, np.nan)
      return Prediction(probs[..., 0] if channels == 1 else probs, mask)
    per_prompt = sink.probs.reshape(*sink.probs.shape[:2], len(prompts), -1)
    out = {}
    for i, p in enumerate(prompts):
      probs_p = np.ascontiguousarray(per_prompt[:, :, i])
      mask = raster_io.encode(probs_p, sink.valid, False, threshold)[0]
      probs_p = np.where(sink.valid[..., None], probs_p, np.nan)
      out[p] = Prediction(probs_p[..., 0] if probs_p.shape[-1] == 1 else probs_p, mask)
    return out

  def predict_scene(self, a_path: str, b_path: str, out: str, prompt: str | None = None,
                    tta: str = 'none', prompts: list[str] | None = None, **kwargs):
    """`python -m segchange_jax.infer` as a function: whole scenes in bounded memory.

    `tta` as in predict (recorded in the GeoTIFF tag TTA). `prompts=[...]` instead of
    `prompt=`: all answered in one model pass per window batch, written as one band per prompt
    and polygons with a `prompt` attribute (pipeline's module docstring). `kwargs` are
    segchange_jax.inference.pipeline.run_inference's (window, overlap, batch, threshold,
    probs_path, polygons_path, preview_path, overwrite, align, bands, nodata, progress, ...);
    settings left out come from the config. Returns the engine's SceneStats.
    """
    from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
    tta_lib.resolve(tta)
    if prompts is not None:
      if prompt is not None:
        raise ValueError(f'give prompt= (one prompt) or prompts= (several), not both (got '
                         f'prompt={prompt!r} and prompts={prompts!r})')
      prompts = check_prompts(prompts)
      tags = dict(CHECKPOINT=self.checkpoint, PROMPTS=json.dumps(prompts), TTA=tta)
      factory = lambda: pipeline.Model(self.predictor(tta=tta, prompts=prompts), self.config,
                                       tags)
    else:
      prompt = self.config.data.prompt if prompt is None else prompt
      tags = dict(CHECKPOINT=self.checkpoint, PROMPT=prompt, TTA=tta)
      factory = lambda: pipeline.Model(self.predictor(prompt, tta), self.config, tags)
    kwargs.setdefault('progress', False)
    return pipeline.run_inference(os.fspath(a_path), os.fspath(b_path), os.fspath(out), None,
                               predictor_factory=factory, prompts=prompts, **kwargs)


def load_model(checkpoint: str, config=None, prompt: str | None = None,
               embeddings: str | None = None, text_model: str | None = None,
               tta: str = 'none', prompt_list: list[str] | None = None):
  """`pipeline.Model` of a checkpoint (variables only, checked against its config) and the
  prompt's embedding (default the config's data.prompt): what `infer --backend jax` runs, with
  test-time augmentation `tta` (models/tta.py SETS) on every window batch.

  `prompt_list` (several `infer --prompt`, see check_prompts) instead of `prompt`: one model
  call per window batch answers them all (probabilities [B, H, W, P], or P x K channels); the
  tag PROMPTS holds them as a JSON list.
  """
  from segchange_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
  config, variables = checkpoints.load_checkpoint(checkpoint, config)
  if prompt_list is not None:
    prompt_list = check_prompts(prompt_list)
    emb = np.stack([prompts.embed_one(config, p, npz=embeddings, text_model=text_model)[0]
                    for p in prompt_list])[None]  # [1, P, T, L]
    tags = dict(CHECKPOINT=os.path.abspath(checkpoint), PROMPTS=json.dumps(prompt_list),
                TTA=tta)
    return pipeline.Model(pipeline.detector_predictor(ChangeDetector(config, variables), emb,
                                                      tta), config, tags)
  prompt = prompt if prompt is not None else config.data.prompt
  emb = prompts.embed_one(config, prompt, npz=embeddings, text_model=text_model)
  tags = dict(CHECKPOINT=os.path.abspath(checkpoint), PROMPT=prompt, TTA=tta)
  return pipeline.Model(pipeline.detector_predictor(ChangeDetector(config, variables), emb, tta),
                        config, tags)
