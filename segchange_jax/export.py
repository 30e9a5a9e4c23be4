r"""Inference bundle: Orbax params, config, prompt embeddings and a serialized StableHLO model.

  python -m segchange_jax.export --checkpoint CKPT --out DIR [--config configs/x.py] \
      [--prompts "Buildings with changes" --prompts "..." | --embeddings prompts.npz] \
      [--size 512] [--platforms cpu,cuda]

DIR holds:
- `variables/` + `config.json`: the model for segchange_jax (`api.ChangeDetector.from_checkpoint(DIR)`).
- `prompts.npz`: `prompts` [P] str and `embeddings` [P, T, L] float32 (the embed_prompts format),
  from --prompts (encoded with the config's text encoder), --embeddings, or config.data.prompt.
- `model.stablehlo`: `jax.export` serialization of
  `logits = f(image_a, image_b, text_emb)` with image_a, image_b float32 [b, S, S, 3]
  (RGB / 255, then ImageNet mean/std), text_emb float32 [b, T, L], logits float32 [b, S, S, K];
  `b` is symbolic (any batch size), S = --size (default config.infer.window). The weights are
  closed-over constants, so the file runs on its own: no params to pass, no model code needed
  (it is as large as the weights, and a serialized module must stay under 2 GB).
- `signature.json` (shapes, normalisation, threshold, platforms) and `README.md`.

Running the bundle with jax alone (no segchange_jax):

  import jax, numpy as np
  exp = jax.export.deserialize(open('DIR/model.stablehlo', 'rb').read())
  emb = np.load('DIR/prompts.npz')['embeddings'][:1]              # [1, T, L]
  logits = exp.call(image_a, image_b, np.repeat(emb, len(image_a), 0))
  change = jax.nn.sigmoid(logits[..., 0]) > 0.5                  # K = 1 (binary) models
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags
import numpy as np

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib

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


def prompt_embeddings(config, prompts: Sequence[str] | None, embeddings: str | None
                      ) -> tuple[list[str], np.ndarray]:
  """(prompts, [P, T, L]) from an .npz, or encoded with the config's text settings."""
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  want = (int(config.text.max_tokens), int(config.text.dim))
  if embeddings:
    if prompts:
      raise ExportError('give --prompts or --embeddings, not both')
    table, _ = cache.load_npz(embeddings)
    names = list(table)
    emb = np.stack([table[p] for p in names]) if names else np.zeros((0, *want), np.float32)
  else:
    names = list(prompts or [config.data.prompt])
    emb = cache.embed_prompts(config.text, names)
  if not names or emb.shape[1:] != want:
    raise ExportError(f'prompt embeddings {emb.shape} must be [P>0, text.max_tokens, text.dim] = '
                      f'[P, {want[0]}, {want[1]}] for this model; fix --embeddings / the text '
                      'config')
  return names, np.asarray(emb, np.float32)


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
  names, emb = prompt_embeddings(config, prompts, embeddings)
  exported = export_forward(config, variables, size, platforms)
  with atomic.atomic_dir(out) as tmp:
    signature = _write_files(tmp, config, variables, names, emb, exported, size)
  return signature


def _write_files(out, config, variables, names, emb, exported, size) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  from segchange_jax import embed_prompts  # pylint: disable=g-import-not-at-top
  api.save_variables(out, config, variables)
  embed_prompts.write_npz(os.path.join(out, PROMPTS_FILE), names, emb, '', config.text.model)
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
      'image_normalisation': {'scale': 1 / 255, 'mean': [0.485, 0.456, 0.406],
                              'std': [0.229, 0.224, 0.225], 'channels': 'RGB'},
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


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  config_lib.define_config_flag(
      help_string="configs/*.py file; needed for an upstream .pth, else the checkpoint's config.")
  flags.DEFINE_string('checkpoint', None, 'Training checkpoints dir, convert_torch dir or .pth.')
  flags.DEFINE_string('out', None, 'Bundle directory to create.')
  flags.DEFINE_multi_string('prompts', None, 'Prompt to embed into prompts.npz (repeat the flag '
                            'for more); default config.data.prompt.')
  flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (embed_prompts format) to '
                      'ship instead of encoding --prompts.')
  flags.DEFINE_integer('size', None, 'Square input size S of the exported function (multiple '
                       'of 32; default config.infer.window).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms the StableHLO is lowered for '
                    '(cpu, cuda, rocm, tpu).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out folder.')
  flags.DEFINE_enum('format', 'stablehlo', ['stablehlo', 'onnx'], 'stablehlo: model.stablehlo '
                    '(jax.export); onnx: model.onnx (opset 17, dynamic batch) for ONNX Runtime '
                    '(pip install .[onnx]; segchange_jax/inference/onnx_export.py).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name in ('checkpoint', 'out'):
    if not f[name].value:
      raise cli.UsageError(f'--{name} is required')
  atomic.check_output(f.out, [f.checkpoint], overwrite=True)  # never the checkpoint itself
  if os.path.exists(f.out) and not f.overwrite and (not os.path.isdir(f.out) or
                                                    os.listdir(f.out)):
    raise ExportError(f'--out {f.out} already exists; pass --overwrite to replace it or choose '
                      'another folder')
  if f.size is not None and (f.size <= 0 or f.size % 32):
    raise ExportError(f'--size={f.size} must be a positive multiple of 32 (the model stride)')
  cli.quiet_libraries()
  from segchange_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = config_lib.validate_config(f.config) if f.config is not None else None
  config, variables = evaluate.load_checkpoint(f.checkpoint, config)
  if f.format == 'onnx':
    from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
    sig = onnx_export.write_bundle(f.out, config, variables, f.prompts, f.embeddings, f.size,
                                   overwrite=f.overwrite)
    print(f'wrote {f.out}: {onnx_export.MODEL_FILE} ({sig["bytes"]} bytes), inputs '
          f'{json.dumps(sig["inputs"])}')
    return
  sig = write_bundle(f.out, config, variables, f.prompts, f.embeddings, f.size, f.platforms,
                     overwrite=f.overwrite)
  print(f'wrote {f.out}: {MODEL_FILE} for {sig["platforms"]}, inputs '
        f'{json.dumps(sig["inputs"])}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
