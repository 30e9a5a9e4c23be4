r"""Inference bundle: Orbax params, config, prompt embeddings and a serialized StableHLO model.

  python -m segchange_jax.export --checkpoint CKPT --out DIR [--config configs/x.py] \
      [--prompts "Buildings with changes" --prompts "..." | --embeddings prompts.npz] \
      [--size 512] [--platforms cpu,cuda]

DIR holds:
- `variables/` + `config.json`: the model for segchange_jax (`predictor.ChangeDetector.from_checkpoint(DIR)`).
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
from typing import Sequence

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax.inference.export import MODEL_FILE, ExportError, write_bundle


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  config_lib.define_checkpoint_flags()
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
  config = config_lib.validate_config(f.config) if f.config is not None else None
  # Lazy (jax, orbax, the model): flag errors above come back at once.
  from segchange_jax.interop.checkpoints import load_checkpoint  # pylint: disable=g-import-not-at-top
  config, variables = load_checkpoint(f.checkpoint, config)
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
