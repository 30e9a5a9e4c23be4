"""Phi decoder (phi-1_5 / phi-2; transformers' PhiModel last_hidden_state) as a linen module.

Parallel block: x = x + attn(LN(x)) + mlp(LN(x)) with one shared LayerNorm; partial rotary
embeddings on the first head_dim * partial_rotary_factor channels; gelu_new MLP; final LayerNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.text import layers


@dataclasses.dataclass(frozen=True)
class PhiConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  num_key_value_heads: int = 0      # 0 -> num_attention_heads
  layer_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 0.5
  hidden_act: str = 'gelu_new'

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> 'PhiConfig':
    if cfg.get('qk_layernorm', False):
      raise ValueError('config.json qk_layernorm=true is not supported (phi-1_5/phi-2 use false)')
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in names and v is not None}
    rope = dict(cfg.get('rope_parameters') or {})
    for key in ('rope_theta', 'partial_rotary_factor'):
      if key in rope:
        kw[key] = rope[key]
    scaling = cfg.get('rope_scaling') or {}
    rope_type = (rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
                 or 'default')
    if rope_type != 'default':
      raise ValueError(f'config.json rope type {rope_type!r} is not supported (only "default")')
    layers.activation(kw.get('hidden_act', 'gelu_new'))
    return cls(**kw)

  @property
  def hd(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.hd * self.partial_rotary_factor)


class PhiLayer(nn.Module):
  cfg: PhiConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    c, dt = self.cfg, self.dtype
    b, t, _ = x.shape
    kvh = c.num_key_value_heads or c.num_attention_heads
    h = nn.LayerNorm(c.layer_norm_eps, dtype=dt, name='input_layernorm')(x)
    q = layers.dense(c.num_attention_heads * c.hd, 'q_proj', dt)(h).reshape(b, t, -1, c.hd)
    k = layers.dense(kvh * c.hd, 'k_proj', dt)(h).reshape(b, t, -1, c.hd)
    v = layers.dense(kvh * c.hd, 'v_proj', dt)(h).reshape(b, t, -1, c.hd)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    a = layers.attention(q, k, v, mask, causal=True).reshape(b, t, -1)
    a = layers.dense(c.hidden_size, 'dense', dt)(a)
    m = layers.activation(c.hidden_act)(layers.dense(c.intermediate_size, 'fc1', dt)(h))
    m = layers.dense(c.hidden_size, 'fc2', dt)(m)
    return x + a + m


class PhiModel(nn.Module):
  """ids [B, T] int, mask [B, T] bool -> final-normed hidden state [B, T, hidden]."""
  cfg: PhiConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, name='embed_tokens')(ids)
    cos, sin = layers.rope_cos_sin(jnp.arange(ids.shape[1]), c.rotary_dim, c.rope_theta)
    for i in range(c.num_hidden_layers):
      x = PhiLayer(c, dt, name=f'layers_{i}')(x, mask, cos, sin)
    return nn.LayerNorm(c.layer_norm_eps, dtype=dt, name='final_layernorm')(x)


IGNORED_PREFIXES = ('lm_head', 'rotary_emb')


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], str] | None:
  """HF key (with or without 'model.') -> (module path, 'weight'|'bias'); None if unused."""
  name = name.removeprefix('model.')
  if name.startswith(IGNORED_PREFIXES) or name.endswith('rotary_emb.inv_freq'):
    return None
  stem, leaf = name.rsplit('.', 1)
  if stem in ('embed_tokens', 'final_layernorm'):
    return ((stem,), leaf)
  if stem.startswith('layers.'):
    idx, rest = stem.removeprefix('layers.').split('.', 1)
    return ((f'layers_{idx}', rest.split('.')[-1]), leaf)
  raise KeyError(name)
