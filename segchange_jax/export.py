r"""Inference bundle: Orbax params, config, prompt embeddings and a self-contained model file.

  python -m segchange_jax.export --checkpoint CKPT --out DIR [--config configs/x.py] \
      [--prompts "Buildings with changes" --prompts "..." | --embeddings prompts.npz] \
      [--size 512] [--format stablehlo|onnx] [--platforms cpu,cuda] [--raw_inputs] \
      [--prompt_batch P]

DIR holds `variables/` + `config.json` (the model for segchange_jax), `prompts.npz` (from
--prompts encoded with the config's text encoder, --embeddings, or config.data.prompt), the
model file, `signature.json`, a README.md that says how to run the model file with its
runtime alone and `model_card.json` + `MODEL_CARD.md` (the checkpoint's model card with the
export settings added); the layout is segchange_jax/inference/bundle.py's. --format picks the
model file from FORMATS:
- `stablehlo`: `model.stablehlo`, a `jax.export` serialization run with jax alone
  (`jax.export.deserialize`); `b` is symbolic, S = --size (default config.infer.window); lowered
  for --platforms (segchange_jax/inference/export.py).
- `onnx`: `model.onnx` (opset 17, dynamic batch) for ONNX Runtime (pip install .[onnx];
  segchange_jax/inference/onnx_export.py).
Both compute `probabilities, mask = f(image_a, image_b, prompt)`: image_a, image_b uint8 RGB
[b, S, S, 3] as read from the files (the ImageNet normalisation is in the graph), prompt int32
[b] (a row of the bundle's prompt table), probabilities float32 [b, S, S, K] and mask uint8
[b, S, S] (probabilities[..., 0] > config.infer.threshold for K = 1, argmax otherwise). A second
file, model_embeddings.stablehlo / model_embeddings.onnx, takes text_emb float32 [b, T, L] in
place of prompt. --raw_inputs writes one file with the float graph instead, `logits =
f(image_a, image_b, text_emb)` on images already normalised (RGB / 255, then ImageNet
mean/std), for users who normalise themselves.
--prompt_batch P exports graphs that answer P prompts per image pair in one pass (the image
trunk once, the mask head for all P): prompt int32 [b, P] (or text_emb float32 [b, P, T, L];
--raw_inputs too) -> probabilities float32 [b, S, S, P] and mask uint8 [b, S, S, P] for K = 1
([b, S, S, P, K] probabilities otherwise); signature.json and the model card record
`prompt_batch`, and `infer --backend onnxruntime` runs up to P prompts on such a bundle
(inference/onnx_runtime.py pads fewer). Without it the graphs take one prompt, as above.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from absl import flags

from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax.inference import bundle


def _card(f) -> dict | None:
  """The model card of --checkpoint (None when it has none), for the bundle's card."""
  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.read_card(f.checkpoint) if os.path.isdir(f.checkpoint) else None


def _stablehlo(f, config, variables) -> str:
  from segchange_jax.inference import export  # pylint: disable=g-import-not-at-top
  sig = export.write_bundle(f.out, config, variables, f.prompts, f.embeddings, f.size,
                            f.platforms, overwrite=f.overwrite, raw_inputs=f.raw_inputs,
                            card=_card(f), prompt_batch=f.prompt_batch)
  return f'{export.MODEL_FILE} for {sig["platforms"]}, inputs {json.dumps(sig["inputs"])}'


def _onnx(f, config, variables) -> str:
  from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  sig = onnx_export.write_bundle(f.out, config, variables, f.prompts, f.embeddings, f.size,
                                 overwrite=f.overwrite, raw_inputs=f.raw_inputs,
                                 card=_card(f), prompt_batch=f.prompt_batch)
  return f'{onnx_export.MODEL_FILE} ({sig["bytes"]} bytes), inputs {json.dumps(sig["inputs"])}'


# --format -> writer of the bundle (flags, config, variables) -> what it wrote, for the log line.
FORMATS: dict[str, Callable[..., str]] = {'stablehlo': _stablehlo, 'onnx': _onnx}


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
  flags.DEFINE_bool('raw_inputs', False, 'Write the float-input graph instead: logits = '
                    'f(image_a, image_b, text_emb) on ImageNet-normalised float32 images (by '
                    'default the graphs take uint8 images and a prompt index or embedding and '
                    'return probabilities and the mask).')
  flags.DEFINE_integer('prompt_batch', None, 'Export graphs that take P prompts per image pair '
                       'in one pass (prompt int32 [b, P], text_emb [b, P, T, L] -> '
                       'probabilities [b, S, S, P]); default: one prompt per pair.')
  flags.DEFINE_enum('format', 'stablehlo', list(FORMATS), 'stablehlo: model.stablehlo '
                    '(jax.export); onnx: model.onnx (opset 17, dynamic batch) for ONNX Runtime '
                    '(pip install .[onnx]; segchange_jax/inference/onnx_export.py).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name in ('checkpoint', 'out'):
    if not f[name].value:
      raise cli.UsageError(f'--{name} is required')
  bundle.check_args(f.out, f.size, f.prompts, f.embeddings, f.overwrite, [f.checkpoint],
                    prompt_batch=f.prompt_batch)
  cli.quiet_libraries()
  config = config_lib.validate_config(f.config) if f.config is not None else None
  # Lazy (jax, orbax, the model): flag errors above come back at once.
  from segchange_jax.interop.checkpoints import load_checkpoint  # pylint: disable=g-import-not-at-top
  config, variables = load_checkpoint(f.checkpoint, config)
  print(f'wrote {f.out}: {FORMATS[f.format](f, config, variables)}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
