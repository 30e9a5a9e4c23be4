"""GGUF (llama.cpp) files -> a Hugging Face style config dict and HF-named numpy tensors.

Quantised tensors are dequantised with `gguf.quants`. llama.cpp's converter permutes the rows of
the Q and K projections (interleaved rotary pairs instead of transformers' rotate-half halves);
`_unpermute` undoes it so the weights fit `llama.LlamaModel` exactly.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np

# GGUF per-block tensor names -> transformers Llama names.
_LLAMA_BLOCK = {
    'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_LLAMA_TOP = {'token_embd': 'embed_tokens', 'output_norm': 'norm', 'output': 'lm_head'}
SUPPORTED = ('llama',)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation for `n_head` heads (rows = n_head * head_dim)."""
  rows = w.shape[0]
  # llama.cpp stored row (head, j, half) at the place of transformers' row (head, half, j).
  return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def read(path: pathlib.Path, num_layers: int | None = None
         ) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
  """Returns (HF-style config dict with model_type, generator of (HF name, float32 array)).

  `num_layers` keeps only the first blocks (tests and quick checks; the rest is never dequantised).
  """
  try:
    import gguf  # pylint: disable=g-import-not-at-top
    from gguf import quants  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading .gguf files needs the gguf package: pip install gguf') from e
  reader = gguf.GGUFReader(str(path))
  arch = _field(reader, 'general.architecture')
  if arch not in SUPPORTED:
    raise ValueError(f'{path}: GGUF architecture {arch!r} is not supported; supported: '
                     f'{list(SUPPORTED)}')
  p = f'{arch}.'
  heads = int(_field(reader, p + 'attention.head_count'))
  kv_heads = int(_field(reader, p + 'attention.head_count_kv', heads))
  hidden = int(_field(reader, p + 'embedding_length'))
  head_dim = int(_field(reader, p + 'attention.key_length', hidden // heads))
  tok = next(t for t in reader.tensors if t.name == 'token_embd.weight')
  vocab = int(_field(reader, p + 'vocab_size', int(tok.shape[-1])))
  config = {
      'model_type': 'llama', 'vocab_size': vocab, 'hidden_size': hidden,
      'num_hidden_layers': int(_field(reader, p + 'block_count')),
      'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'head_dim': head_dim,
      'intermediate_size': int(_field(reader, p + 'feed_forward_length')),
      'rms_norm_eps': float(_field(reader, p + 'attention.layer_norm_rms_epsilon', 1e-6)),
      'rope_theta': float(_field(reader, p + 'rope.freq_base', 10000.0)),
      'bos_token_id': _field(reader, 'tokenizer.ggml.bos_token_id'),
      'eos_token_id': _field(reader, 'tokenizer.ggml.eos_token_id'),
      'pad_token_id': _field(reader, 'tokenizer.ggml.padding_token_id'),
      'tie_word_embeddings': not any(t.name == 'output.weight' for t in reader.tensors),
  }
  if num_layers is not None:
    config['num_hidden_layers'] = min(int(num_layers), config['num_hidden_layers'])
  if _field(reader, p + 'rope.scaling.type', 'none') not in ('none', None):
    raise ValueError(f'{path}: rope scaling is not supported')

  def tensors():
    for t in reader.tensors:
      parts = t.name.split('.')
      if parts[0] == 'blk':
        if int(parts[1]) >= config['num_hidden_layers']:
          continue
        base = _LLAMA_BLOCK.get(parts[2])
        name = None if base is None else f'model.layers.{parts[1]}.{base}.{parts[-1]}'
      else:
        base = _LLAMA_TOP.get(parts[0])
        name = None if base is None else (f'{base}.{parts[-1]}' if base == 'lm_head'
                                          else f'model.{base}.{parts[-1]}')
      if name is None:
        raise ValueError(f'{path}: unexpected GGUF tensor {t.name!r}')
      w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
      if parts[-2:] == ['attn_q', 'weight']:
        w = _unpermute(w, heads)
      elif parts[-2:] == ['attn_k', 'weight']:
        w = _unpermute(w, kv_heads)
      yield name, w
  return config, tensors()
