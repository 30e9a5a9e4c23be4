"""Prompt embeddings for the model: the one place prompts become [P, T, L] arrays.

Every consumer (the training loop's prompt table, `infer`, `export`, `ChangeDetector.embed`)
goes through `embed`, so they agree on where embeddings come from (an .npz written by
`embed_prompts` / an export bundle, else the config's text settings: `text.embeddings`, the
on-disk cache, the encoder) and on the shape check against `text.max_tokens` / `text.dim`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from segchange_jax import atomic
from segchange_jax.text import cache


class PromptError(ValueError):
  """Embeddings cannot be produced or do not fit the model; the message names the fix."""


def embed(config: ml_collections.ConfigDict, prompts: Sequence[str] | None = None, *,
          npz: str | None = None, text_model: str | None = None
          ) -> tuple[list[str], np.ndarray]:
  """(prompts, float32 [P, text.max_tokens, text.dim]) for the model of `config`.

  Args:
    config: a full SegChange config (its `text` fields and `data.prompt`).
    prompts: the prompts; None means every prompt of `npz`, or `config.data.prompt`.
    npz: an .npz with arrays `prompts` and `embeddings` (embed_prompts format); every prompt
      must be in it. Skips the text encoder.
    text_model: encode with this text model instead of `config.text.model`.
  """
  want = (int(config.text.max_tokens), int(config.text.dim))
  if npz:
    if text_model:
      raise PromptError('give --embeddings or --text_model, not both')
    if not os.path.isfile(npz):
      raise PromptError(f'--embeddings {npz} does not exist; create it with '
                        'python -m segchange_jax.embed_prompts')
    table, _ = cache.load_npz(npz)
    names = list(table) if prompts is None else list(prompts)
    missing = [p for p in names if p not in table]
    if missing:
      raise PromptError(f'--embeddings {npz} has no entry for {missing[0]!r}; it holds '
                        f'{list(table)[:5]}')
    emb = (np.stack([np.asarray(table[p], np.float32) for p in names]) if names
           else np.zeros((0, *want), np.float32))
  else:
    names = [config.data.prompt] if prompts is None else list(prompts)
    text_cfg = config.text
    if text_model:
      text_cfg = ml_collections.ConfigDict(config.text.to_dict())
      text_cfg.model, text_cfg.embeddings = text_model, ''
    emb = np.asarray(cache.embed_prompts(text_cfg, names), np.float32)
  if not names:
    raise PromptError('no prompts to embed; pass at least one prompt')
  if emb.shape[1:] != want:
    raise PromptError(
        f'prompt embeddings of shape {list(emb.shape[1:])} do not fit the model, which wants '
        f'[text.max_tokens, text.dim] = {list(want)}; use embeddings of its text model or set '
        f'--config.text.max_tokens={emb.shape[1]} --config.text.dim={emb.shape[2]} for a new '
        'model')
  return names, emb


def embed_one(config: ml_collections.ConfigDict, prompt: str, *, npz: str | None = None,
              text_model: str | None = None) -> np.ndarray:
  """[1, T, L] embedding of one prompt (see `embed`)."""
  return embed(config, [prompt], npz=npz, text_model=text_model)[1]


def dataset_table(config: ml_collections.ConfigDict, info: dict
                  ) -> tuple[np.ndarray, dict[str, int]]:
  """Embeddings [P, T, L] of every prompt of a converted dataset (its dataset_info.json) plus
  `config.data.prompt`, and the prompt -> row index the input pipeline uses."""
  names = list(info.get('prompts') or [])
  if config.data.prompt not in names:
    names.append(config.data.prompt)
  _, table = embed(config, names)
  return table, {p: i for i, p in enumerate(names)}


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
  with atomic.atomic_open(os.fspath(out), 'wb') as fh:
    np.savez(fh, prompts=np.asarray(list(prompts), dtype=str),
             embeddings=np.asarray(embeddings, np.float32), identity=np.asarray(identity),
             model=np.asarray(model))
