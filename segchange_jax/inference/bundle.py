r"""Export bundles: the one folder layout of every export format, checked and written here.

  python -m segchange_jax.export [--format stablehlo|onnx] --checkpoint CKPT --out DIR

A bundle DIR holds:
- `variables/` + `config.json`: the model for segchange_jax
  (`inference.predictor.ChangeDetector.from_checkpoint(DIR)`).
- `prompts.npz`: `prompts` [P] str and `embeddings` [P, T, L] float32 (the embed_prompts
  format), from --prompts (encoded with the config's text encoder), --embeddings, or
  config.data.prompt.
- the format's model file (`BundleFormat.model_file`): `logits = f(image_a, image_b,
  text_emb)` with the weights inside, so the format's runtime alone runs it.
- `signature.json` (`signature`): shapes, normalisation, decision rule, threshold, prompts.
- `README.md` (`readme`): how to load and call the model file with its runtime alone (a python
  block that runs as written from DIR), the input layout and normalisation, the prompt input and
  the decision rule.

An export format is a `BundleFormat` plus a function that writes its model file; `write` does
the rest. The two there are: inference/export.py (StableHLO) and inference/onnx_export.py (ONNX);
the command picks one from `segchange_jax.export.FORMATS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from segchange_jax import atomic
from segchange_jax import config_lib

PROMPTS_FILE = 'prompts.npz'
SIGNATURE_FILE = 'signature.json'
README_FILE = 'README.md'
FUNCTION = 'logits = f(image_a, image_b, text_emb)'
INPUT_NAMES = ('image_a', 'image_b', 'text_emb')
OUTPUT_NAME = 'logits'


class BundleError(ValueError):
  """The bundle cannot be written as asked; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class BundleFormat:
  """What a bundle's signature and README say about its model file.

  `load`: python lines (run from the bundle folder) that load the model file as `model`;
  `call`: a python expression of `model`, `image_a`, `image_b`, `text_emb` (numpy arrays) that
  gives the logits as a numpy array; `notes`: a README paragraph, formatted with the signature.
  """
  name: str
  title: str
  model_file: str
  runtime: str
  load: str
  call: str
  notes: str = ''


def check_args(out: str, size: int | None, prompts: Sequence[str] | None = None,
               embeddings: str | None = None, overwrite: bool = False,
               inputs: Sequence[str] = (), error: type[Exception] = BundleError) -> None:
  """Refuses, before anything slow: `out` naming an input or an existing non-empty folder
  (without `overwrite`), a size (None: the config's) off the model stride, and both prompt
  sources."""
  atomic.check_output_dir(out, inputs, overwrite)
  if size is not None:
    config_lib.check_stride(size, '--size', error)
  if prompts and embeddings:
    raise error('give --prompts or --embeddings, not both')


def signature(config, fmt: BundleFormat, size: int, text_shape: Sequence[int],
              prompts: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
  """signature.json: the function, its inputs and output, normalisation and decision rule."""
  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  t, dim = (int(x) for x in text_shape)
  k = int(config.model.num_classes)
  image = lambda: {'shape': ['b', size, size, 3], 'dtype': 'float32'}
  return {
      'function': FUNCTION, 'format': fmt.name, 'file': fmt.model_file,
      'inputs': {'image_a': image(), 'image_b': image(),
                 'text_emb': {'shape': ['b', t, dim], 'dtype': 'float32'}},
      'output': {OUTPUT_NAME: {'shape': ['b', size, size, k], 'dtype': 'float32'}},
      'image_normalisation': {'scale': 1 / 255,
                              'mean': [round(float(v), 6) for v in imagery.IMAGENET_MEAN],
                              'std': [round(float(v), 6) for v in imagery.IMAGENET_STD],
                              'channels': 'RGB'},
      'decision': ('change = sigmoid(logits[..., 0]) > threshold' if k == 1
                   else 'class = argmax(logits, -1)'),
      'threshold': float(config.infer.threshold), 'prompts': list(prompts),
      'text_model': config.text.model, **extra}


def readme(fmt: BundleFormat, sig: dict[str, Any]) -> str:
  """README.md of a bundle with signature `sig`: what the model computes and how to run it."""
  size = sig['inputs']['image_a']['shape'][1]
  t, dim = sig['inputs']['text_emb']['shape'][1:]
  k = sig['output'][OUTPUT_NAME]['shape'][3]
  norm, thr, names = sig['image_normalisation'], sig['threshold'], sig['prompts']
  scale = '1 / 255' if norm['scale'] == 1 / 255 else repr(norm['scale'])
  if k == 1:
    rule = (f'change where `sigmoid(logits[..., 0]) > threshold`, threshold = {thr!r} (the '
            "model config's `infer.threshold`)")
    decide = ('THRESHOLD = {thr!r}  # the config\'s infer.threshold\n'
              'change = 1 / (1 + np.exp(-logits[..., 0])) > THRESHOLD  # [1, S, S] bool\n'
              ).format(thr=thr)
  else:
    rule = '`class = argmax(logits, -1)` (0: no change; class ids as in training)'
    decide = 'classes = logits.argmax(-1)  # [1, S, S] class id, 0 = no change\n'
  code = (
      'import numpy as np\n'
      f'{fmt.load.strip()}\n\n'
      f'MEAN = np.array({norm["mean"]}, np.float32)  # ImageNet, channels R, G, B\n'
      f'STD = np.array({norm["std"]}, np.float32)\n\n\n'
      'def normalise(rgb):\n'
      '  """uint8 RGB [H, W, 3] -> float32 [1, H, W, 3]."""\n'
      '  return ((rgb.astype(np.float32) * (1 / 255) - MEAN) / STD)[None]\n\n\n'
      f'# Two co-registered uint8 RGB images of {size} x {size} px (random here: use yours).\n'
      'rng = np.random.default_rng(0)\n'
      f'rgb_a = rng.integers(0, 256, ({size}, {size}, 3), dtype=np.uint8)\n'
      f'rgb_b = rng.integers(0, 256, ({size}, {size}, 3), dtype=np.uint8)\n\n'
      'prompts = np.load(\'prompts.npz\')\n'
      f'row = list(prompts[\'prompts\']).index({names[0]!r})\n'
      'text_emb = prompts[\'embeddings\'][row][None]  # [1, T, L]\n\n'
      'image_a, image_b = normalise(rgb_a), normalise(rgb_b)\n'
      f'logits = {fmt.call.strip()}  # [1, {size}, {size}, {k}]\n' + decide)
  notes = fmt.notes.format_map(sig).strip()
  return (
      f'# SegChange change detector: {fmt.title} bundle\n\n'
      f'`{fmt.model_file}` computes `{FUNCTION}`: the change between two co-registered images '
      'of one place, steered by a text prompt. The weights are inside the file, so '
      f'{fmt.runtime} and numpy alone run it (no segchange_jax, no model code).\n\n'
      '## Inputs and output\n\n'
      f'- `image_a`, `image_b`: float32 [b, {size}, {size}, 3] (NHWC; `b` is any batch size). '
      f'From uint8 images in channel order {", ".join(norm["channels"])}: multiply by {scale}, '
      f'subtract the ImageNet mean {norm["mean"]} and divide by the ImageNet std {norm["std"]}, '
      'per channel.\n'
      f'- `text_emb`: float32 [b, {t}, {dim}], the prompt: one row of `prompts.npz` (arrays '
      f'`prompts` [P] str and `embeddings` [P, {t}, {dim}] float32), repeated over the batch. '
      f'This bundle holds {", ".join(repr(n) for n in names)}; other prompts: '
      '`python -m segchange_jax.embed_prompts` with the text encoder '
      f'`{sig["text_model"]}`.\n'
      f'- `logits`: float32 [b, {size}, {size}, {k}].\n\n'
      f'Decision rule: {rule}.\n\n'
      f'## Load and call ({fmt.runtime} alone)\n\n'
      'From the bundle folder:\n\n'
      f'```python\n{code}```\n\n'
      + (f'{notes}\n\n' if notes else '') +
      '## Other files\n\n'
      '- `signature.json`: the same facts as JSON (shapes, normalisation, decision, threshold, '
      'prompts).\n'
      '- `variables/` + `config.json`: the same model for segchange_jax: '
      "`ChangeDetector.from_checkpoint('DIR')` (segchange_jax.inference.predictor); whole "
      'scenes: `python -m segchange_jax.infer --checkpoint DIR --a A.tif --b B.tif --out '
      'change.tif`.\n')


def write(out: str, config, variables: dict, fmt: BundleFormat,
          write_model: Callable[[str, int], dict[str, Any]],
          prompts: Sequence[str] | None = None, embeddings: str | None = None,
          size: int | None = None, overwrite: bool = False,
          error: type[Exception] = BundleError) -> dict[str, Any]:
  """Writes the bundle (module docstring) and returns its signature.

  `write_model(path, size)` writes the format's model file and returns the signature entries
  of its own (platforms, opset, ...). The folder is assembled under a temporary name beside
  `out` and renamed when complete; an existing bundle is replaced only with `overwrite`.
  """
  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  size = int(size or config.infer.window)
  check_args(out, size, prompts, embeddings, overwrite, error=error)
  names, emb = prompts_lib.embed(config, prompts or None, npz=embeddings)
  with atomic.atomic_dir(out) as tmp:
    checkpoints.save_variables(tmp, config, variables)
    prompts_lib.write_npz(os.path.join(tmp, PROMPTS_FILE), names, emb, '', config.text.model)
    extra = write_model(os.path.join(tmp, fmt.model_file), size)
    sig = signature(config, fmt, size, emb.shape[1:], names, extra)
    with open(os.path.join(tmp, SIGNATURE_FILE), 'w') as f:
      json.dump(sig, f, indent=2)
    with open(os.path.join(tmp, README_FILE), 'w') as f:
      f.write(readme(fmt, sig))
  return sig


def load_prompts(directory: str) -> dict[str, np.ndarray]:
  """{prompt: embedding [T, L]} from the bundle's prompts.npz."""
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  return cache.load_npz(os.path.join(directory, PROMPTS_FILE))[0]
