"""Prompt embeddings for training/eval: a precomputed .npz, or an on-disk cache over the encoder.

Upstream re-runs BERT/Phi on every batch. Here each distinct prompt is encoded once per encoder
identity and stored as `<cache_dir>/<identity>/<sha256(prompt)>.npy` (atomic writes, so parallel
workers never read half a file). Cached embeddings use `TextEncoder.encode(pad_to_batch=False)`:
the embedding a prompt gets when encoded alone, so it does not depend on batch companions.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Any, Sequence

import numpy as np

_ENCODERS: dict[tuple, Any] = {}


class PromptEmbeddingCache:
  """On-disk store of [max_tokens, L] float32 arrays keyed by (encoder identity, prompt)."""

  def __init__(self, cache_dir: str | os.PathLike):
    self.root = pathlib.Path(cache_dir).expanduser()

  def _file(self, identity: str, prompt: str) -> pathlib.Path:
    key = hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:40]
    return self.root / identity / f'{key}.npy'

  def get(self, identity: str, prompt: str) -> np.ndarray | None:
    f = self._file(identity, prompt)
    return np.load(f) if f.is_file() else None

  def put(self, identity: str, prompt: str, value: np.ndarray) -> None:
    f = self._file(identity, prompt)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as fh:
        np.save(fh, np.asarray(value, np.float32))
      os.replace(tmp, f)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser() / \
      'segchange_jax' / 'prompt_embeddings'


def get_encoder(text_cfg) -> Any:
  """One TextEncoder per (model, dtype, max_tokens) in this process."""
  from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  key = (text_cfg.model, text_cfg.dtype, int(text_cfg.max_tokens))
  if key not in _ENCODERS:
    _ENCODERS[key] = encoder_lib.TextEncoder.from_pretrained(
        text_cfg.model, dtype=text_cfg.dtype, max_tokens=text_cfg.max_tokens)
  return _ENCODERS[key]


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """embeddings .npz (from segchange_jax.embed_prompts) -> ({prompt: [T, L]}, identity)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'text.embeddings={str(path)!r} does not exist; create it with '
                            'python -m segchange_jax.embed_prompts')
  with np.load(path, allow_pickle=False) as z:
    if 'prompts' not in z or 'embeddings' not in z:
      raise ValueError(f'text.embeddings={str(path)!r} must hold arrays "prompts" and '
                       f'"embeddings" (found {sorted(z.files)}); regenerate it with '
                       'python -m segchange_jax.embed_prompts')
    prompts, emb = z['prompts'], z['embeddings']
    identity = str(z['identity']) if 'identity' in z else ''
  if emb.ndim != 3 or emb.shape[0] != len(prompts):
    raise ValueError(f'{path}: embeddings shape {emb.shape} does not fit {len(prompts)} prompts '
                     '(expected [N, max_tokens, dim])')
  return {str(p): e for p, e in zip(prompts, emb)}, identity


def embed_prompts(text_cfg, prompts: Sequence[str], encoder: Any = None) -> np.ndarray:
  """Prompts -> float32 [N, text.max_tokens, text.dim].

  Uses `text.embeddings` (an .npz) when set; otherwise the on-disk cache in `text.cache_dir`,
  running the encoder only for prompts it has not seen. Empty prompts are zeros.
  """
  t, dim = int(text_cfg.max_tokens), int(text_cfg.dim)
  out = np.zeros((len(prompts), t, dim), np.float32)
  live = sorted({p for p in prompts if p.strip()})
  if text_cfg.embeddings:
    table, _ = load_npz(text_cfg.embeddings)
    some = next(iter(table.values()), None)
    if some is not None and some.shape != (t, dim):
      raise ValueError(f'text.embeddings={text_cfg.embeddings!r} holds [{some.shape[0]}, '
                       f'{some.shape[1]}] per prompt; config wants text.max_tokens={t}, '
                       f'text.dim={dim}: fix the config or regenerate the file')
    missing = [p for p in live if p not in table]
    if missing:
      raise KeyError(f'text.embeddings={text_cfg.embeddings!r} lacks {len(missing)} prompt(s), '
                     f'e.g. {missing[:3]}; regenerate it with python -m '
                     'segchange_jax.embed_prompts over all prompts.txt files')
  else:
    enc = encoder if encoder is not None else get_encoder(text_cfg)
    if enc.dim != dim or enc.max_tokens != t:
      raise ValueError(f'text.model={text_cfg.model!r} gives [{enc.max_tokens}, {enc.dim}] '
                       f'embeddings but config has text.max_tokens={t}, text.dim={dim}')
    cache = PromptEmbeddingCache(text_cfg.cache_dir or default_cache_dir())
    table = {p: cache.get(enc.identity, p) for p in live}
    missing = [p for p in live if table[p] is None]
    if missing:
      for p, e in zip(missing, enc.encode(missing, pad_to_batch=False)):
        cache.put(enc.identity, p, e)
        table[p] = e
  for i, p in enumerate(prompts):
    if p.strip():
      out[i] = table[p]
  return out
