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

import os
import pathlib
from typing import Sequence

import argparse

import numpy as np

def read_prompt_file(path: str | os.PathLike, fmt: str = 'auto') -> list[str]:
  """Prompts of one file (SegChange `<name>  <prompt>` lines or plain lines), in file order."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'--prompts {str(path)!r} does not exist')
  lines = [ln.rstrip('\r\n') for ln in path.read_text(encoding='utf-8').splitlines()]
  lines = [ln for ln in lines if ln.strip()]
  if fmt == 'auto':
    fmt = 'segchange' if lines and all('  ' in ln for ln in lines) else 'plain'
  if fmt == 'plain':
    return [ln.strip() for ln in lines]
  out = []
  for i, ln in enumerate(lines, 1):
    if '  ' not in ln:
      raise ValueError(f'{path}:{i}: expected "<filename><two spaces><prompt>", got {ln!r} '
                       '(use --format plain for one prompt a line)')
    out.append(ln.split('  ', 1)[1].strip())
  return out


def write_npz(out: str | os.PathLike, prompts: Sequence[str], embeddings: np.ndarray,
              identity: str, model: str) -> None:
  """Atomic write (temp file + rename) so a reader never sees a half-written file."""
  from segchange_jax import atomic  # pylint: disable=g-import-not-at-top
  with atomic.atomic_open(os.fspath(out), 'wb') as fh:
    np.savez(fh, prompts=np.asarray(list(prompts), dtype=str),
             embeddings=np.asarray(embeddings, np.float32), identity=np.asarray(identity),
             model=np.asarray(model))


class _Parser(argparse.ArgumentParser):
  """argparse with the project's one-line errors (exit 2)."""

  def error(self, message: str):
    from segchange_jax import cli  # pylint: disable=g-import-not-at-top
    cli.fail(f'{message} (see --help)')


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = _Parser(prog='python -m segchange_jax.embed_prompts',
                              description=__doc__.split('\n\n', 1)[0],
                              epilog=__doc__.split('\n\n', 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--text_model', required=True, help='Hugging Face Hub id, HF model dir, .gguf file or pkg:<package>')
  p.add_argument('--prompts', required=True, action='append',
                 help='prompt file; repeat the flag for more files')
  p.add_argument('--out', required=True, help='output .npz path')
  p.add_argument('--format', default='auto', choices=['auto', 'segchange', 'plain'],
                 help='segchange: "<filename>  <prompt>" lines; plain: one prompt a line')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--max_tokens', type=int, default=8, help='tokens kept per prompt (upstream 8)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line; user errors exit 2 with one line (segchange_jax.cli)."""
  from segchange_jax import cli  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  try:
    _run(args)
  except cli.USER_ERRORS as e:
    if os.environ.get('SEGCHANGE_TRACEBACK'):
      raise
    cli.fail(cli.one_line(e))


def _run(args: argparse.Namespace) -> None:
  from segchange_jax import atomic  # pylint: disable=g-import-not-at-top
  from segchange_jax import cli  # pylint: disable=g-import-not-at-top
  cli.positive('max_tokens', args.max_tokens)
  atomic.check_output(args.out, args.prompts, args.overwrite)
  if not args.out.lower().endswith('.npz'):
    raise ValueError(f'--out {args.out}: the embeddings file is an .npz; name it *.npz')
  prompts: list[str] = []
  for f in args.prompts:
    prompts += read_prompt_file(f, args.format)
  unique = sorted({p for p in prompts if p})
  if not unique:
    raise ValueError(f'no non-empty prompts in --prompts {args.prompts}; give a file with one '
                     'prompt a line')
  cli.quiet_libraries()
  from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  enc = encoder_lib.TextEncoder.from_pretrained(args.text_model, dtype=args.dtype,
                                                max_tokens=args.max_tokens)
  emb = enc.encode(unique, pad_to_batch=False)
  write_npz(args.out, unique, emb, enc.identity, args.text_model)
  print(f'wrote {args.out}: {len(unique)} prompts, embeddings {emb.shape}, '
        f'encoder {enc.identity}')


if __name__ == '__main__':
  main()
