"""BERT encoder (transformers' BertModel last_hidden_state) as a linen module.

Any BERT-family `config.json` (bert-base-uncased, all-MiniLM-L6-v2, ...): word + position +
token-type embeddings, LayerNorm, post-norm encoder layers, bidirectional attention with a key
padding mask. Only absolute position embeddings are supported (the BERT default).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.text import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pad_token_id: int = 0

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> 'BertConfig':
    pet = cfg.get('position_embedding_type', 'absolute')
    if pet != 'absolute':
      raise ValueError(f'config.json position_embedding_type={pet!r}: only "absolute" is supported')
    if cfg.get('is_decoder', False):
      raise ValueError('config.json is_decoder=true: only BERT encoders are supported')
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in names and v is not None}
    layers.activation(kw.get('hidden_act', 'gelu'))
    return cls(**kw)


class BertLayer(nn.Module):
  """Post-norm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""
  cfg: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    heads = c.num_attention_heads
    hd = c.hidden_size // heads
    b, t, _ = x.shape
    q = layers.dense(c.hidden_size, 'query', dt)(x).reshape(b, t, heads, hd)
    k = layers.dense(c.hidden_size, 'key', dt)(x).reshape(b, t, heads, hd)
    v = layers.dense(c.hidden_size, 'value', dt)(x).reshape(b, t, heads, hd)
    a = layers.attention(q, k, v, mask, causal=False).reshape(b, t, c.hidden_size)
    a = layers.dense(c.hidden_size, 'attention_output', dt)(a)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=dt, name='attention_LayerNorm')(x + a)
    h = layers.dense(c.intermediate_size, 'intermediate', dt)(x)
    h = layers.activation(c.hidden_act)(h)
    h = layers.dense(c.hidden_size, 'output', dt)(h)
    return nn.LayerNorm(c.layer_norm_eps, dtype=dt, name='output_LayerNorm')(x + h)


class BertModel(nn.Module):
  """ids [B, T] int, mask [B, T] bool -> last hidden state [B, T, hidden]."""
  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    t = ids.shape[1]
    emb = lambda n, name: nn.Embed(n, c.hidden_size, dtype=dt, name=name)  # pylint: disable=unnecessary-lambda-assignment
    x = emb(c.vocab_size, 'word_embeddings')(ids)
    x = x + emb(c.max_position_embeddings, 'position_embeddings')(jnp.arange(t))[None]
    # token_type_ids are all zero, as upstream never passes them.
    x = x + emb(c.type_vocab_size, 'token_type_embeddings')(jnp.zeros_like(ids))
    x = nn.LayerNorm(c.layer_norm_eps, dtype=dt, name='embeddings_LayerNorm')(x)
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, dt, name=f'layer_{i}')(x, mask)
    return x


# HF name (after 'bert.' is stripped) -> our path: the module tree above is flatter than HF's.
_LAYER_RENAMES = {
    'attention.self.query': 'query', 'attention.self.key': 'key',
    'attention.self.value': 'value', 'attention.output.dense': 'attention_output',
    'attention.output.LayerNorm': 'attention_LayerNorm', 'intermediate.dense': 'intermediate',
    'output.dense': 'output', 'output.LayerNorm': 'output_LayerNorm',
}
IGNORED_PREFIXES = ('pooler.', 'cls.', 'embeddings.position_ids', 'lm_head', 'classifier.',
                    'qa_outputs.')


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], str] | None:
  """HF state_dict key -> (module path, 'weight'|'bias'); None for keys we do not use."""
  name = name.removeprefix('bert.')
  name = name.replace('.gamma', '.weight').replace('.beta', '.bias')  # TF-era checkpoints
  if name.startswith(IGNORED_PREFIXES):
    return None
  stem, leaf = name.rsplit('.', 1)
  if stem.startswith('embeddings.'):
    sub = stem.removeprefix('embeddings.')
    return ((sub if sub != 'LayerNorm' else 'embeddings_LayerNorm',), leaf)
  if stem.startswith('encoder.layer.'):
    idx, rest = stem.removeprefix('encoder.layer.').split('.', 1)
    if rest in _LAYER_RENAMES:
      return ((f'layer_{idx}', _LAYER_RENAMES[rest]), leaf)
  raise KeyError(name)
