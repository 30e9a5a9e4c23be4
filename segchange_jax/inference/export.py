"""Inference bundle: Orbax params, config, prompt embeddings and a serialized StableHLO model.

The library behind `python -m segchange_jax.export` (its docstring describes the bundle and how
to run it with jax alone).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from segchange_jax import atomic

MODEL_FILE = 'model.stablehlo'
PROMPTS_FILE = 'prompts.npz'
SIGNATURE_FILE = 'signature.json'
README_FILE = 'README.md'

class ExportError(ValueError):
  """The bundle cannot be written as asked; the message names the flag and the fix."""


def export_forward(config, variables: dict, size: int,
                   platforms: Sequence[str] | None = None):
  """`jax.export.Exported` of (image_a, image_b, text_emb) -> logits, batch symbolic `b`.

  The variables are closed over (constants in the module), so the artefact needs no params.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  if size <= 0 or size % 32:
    raise ExportError(f'--size={size} must be a positive multiple of 32 (the model stride)')
  model = segchange.build_model(config)
  consts = jax.tree.map(jnp.asarray, variables)

  def forward(image_a, image_b, text_emb):
    return model.apply(consts, image_a, image_b, text_emb, train=False).astype(jnp.float32)

  (b,) = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((b, int(config.text.max_tokens), int(config.text.dim)),
                              jnp.float32)
  return jax.export.export(jax.jit(forward), platforms=platforms)(image, image, text)


def load_exported(directory: str):
  """The bundle's deserialized `jax.export.Exported`; call it with `.call(a, b, text_emb)`."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; create the bundle with '
                            'python -m segchange_jax.export --checkpoint CKPT --out DIR')
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def load_prompts(directory: str) -> dict[str, np.ndarray]:
  """{prompt: embedding [T, L]} from the bundle's prompts.npz."""
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  return cache.load_npz(os.path.join(directory, PROMPTS_FILE))[0]


def write_bundle(out: str, config, variables: dict, prompts: Sequence[str] | None = None,
                 embeddings: str | None = None, size: int | None = None,
                 platforms: Sequence[str] | None = ('cpu', 'cuda'),
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes the bundle described in the module docstring; returns the signature dict.

  The bundle is assembled in a temporary folder beside `out` and renamed when complete; an
  existing bundle is replaced only with `overwrite`.
  """
  size = int(size or config.infer.window)
  if os.path.exists(out) and not overwrite and (
      not os.path.isdir(out) or os.listdir(out)):
    raise ExportError(f'--out {out} already exists; pass --overwrite to replace it or choose '
                      'another folder')
  from segchange_jax.text import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  if prompts and embeddings:
    raise ExportError('give --prompts or --embeddings, not both')
  names, emb = prompts_lib.embed(config, prompts or None, npz=embeddings)
  exported = export_forward(config, variables, size, platforms)
  with atomic.atomic_dir(out) as tmp:
    signature = _write_files(tmp, config, variables, names, emb, exported, size)
  return signature


def _write_files(out, config, variables, names, emb, exported, size) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.save_variables(out, config, variables)
  prompts.write_npz(os.path.join(out, PROMPTS_FILE), names, emb, '', config.text.model)
  with open(os.path.join(out, MODEL_FILE), 'wb') as f:
    f.write(exported.serialize())
  t, dim = emb.shape[1:]
  k = int(config.model.num_classes)
  signature = {
      'function': 'logits = f(image_a, image_b, text_emb)',
      'inputs': {'image_a': {'shape': ['b', size, size, 3], 'dtype': 'float32'},
                 'image_b': {'shape': ['b', size, size, 3], 'dtype': 'float32'},
                 'text_emb': {'shape': ['b', int(t), int(dim)], 'dtype': 'float32'}},
      'output': {'logits': {'shape': ['b', size, size, k], 'dtype': 'float32'}},
      'image_normalisation': {'scale': 1 / 255, 'mean': [round(float(v), 6) for v in imagery.IMAGENET_MEAN],
                              'std': [round(float(v), 6) for v in imagery.IMAGENET_STD], 'channels': 'RGB'},
      'decision': ('change = sigmoid(logits[..., 0]) > threshold' if k == 1
                   else 'class = argmax(logits, -1)'),
      'threshold': float(config.infer.threshold),
      'platforms': list(exported.platforms), 'prompts': names,
      'jax_version': jax.__version__, 'text_model': config.text.model}
  with open(os.path.join(out, SIGNATURE_FILE), 'w') as f:
    json.dump(signature, f, indent=2)
  with open(os.path.join(out, README_FILE), 'w') as f:
    f.write('# SegChange inference bundle\n\n' + __doc__.split('\n\n', 1)[1] + '\n')
  return signature
