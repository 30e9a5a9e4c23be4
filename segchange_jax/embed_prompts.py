r"""Precomputes prompt embeddings into an .npz for `text.embeddings`.

  python -m segchange_jax.embed_prompts --text_model DIR_OR_GGUF_OR_pkg:NAME \
      --prompts train/prompts.txt --prompts val/prompts.txt --out embeddings.npz

Prompt files: SegChange's `prompts.txt` lines `<filename><two spaces><prompt>`, or plain text with
one prompt per line. `--format auto` (default) reads a file as SegChange format when every
non-blank line contains two consecutive spaces, else as plain lines. Distinct non-empty prompts
are encoded once each (as if alone in their batch, so embeddings do not depend on file order).
The .npz holds `prompts` [N] str, `embeddings` [N, max_tokens, dim] float32, `identity` (the
encoder's id) and `model` (the --text_model string).
"""

from __future__ import annotations

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax.text import prompts as prompts_lib


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string('text_model', None, 'Hugging Face Hub id, HF model dir, .gguf file or '
                      'pkg:<package>.')
  flags.DEFINE_multi_string('prompts', None, 'Prompt file; repeat the flag for more files.')
  flags.DEFINE_string('out', None, 'Output .npz path.')
  flags.DEFINE_enum('format', 'auto', ['auto', 'segchange', 'plain'],
                    'segchange: "<filename>  <prompt>" lines; plain: one prompt a line.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Encoder compute dtype.')
  flags.DEFINE_integer('max_tokens', 8, 'Tokens kept per prompt (upstream 8).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}; flags take the form --name=value')
  f = flags.FLAGS
  missing = [f'--{n}' for n in ('text_model', 'prompts', 'out') if not f[n].value]
  if missing:
    raise cli.UsageError(f'{", ".join(missing)} required (see --help)')
  cli.positive('max_tokens', f.max_tokens)
  atomic.check_output(f.out, f.prompts, f.overwrite)
  if not f.out.lower().endswith('.npz'):
    raise ValueError(f'--out {f.out}: the embeddings file is an .npz; name it *.npz')
  prompts: list[str] = []
  for path in f.prompts:
    prompts += prompts_lib.read_prompt_file(path, f.format)
  unique = sorted({p for p in prompts if p})
  if not unique:
    raise ValueError(f'no non-empty prompts in --prompts {f.prompts}; give a file with one '
                     'prompt a line')
  cli.quiet_libraries()
  from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  enc = encoder_lib.TextEncoder.from_pretrained(f.text_model, dtype=f.dtype,
                                                max_tokens=f.max_tokens)
  emb = enc.encode(unique, pad_to_batch=False)
  prompts_lib.write_npz(f.out, unique, emb, enc.identity, f.text_model)
  print(f'wrote {f.out}: {len(unique)} prompts, embeddings {emb.shape}, encoder {enc.identity}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
