"""Llama-family decoder (transformers' LlamaModel last_hidden_state) as a linen module.

RoPE (rope_theta, default rope type only), grouped-query attention, SwiGLU MLP, RMSNorm, causal
attention with a key padding mask. SmolLM2, TinyLlama, Llama-2 and similar configs load as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.text import layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  num_key_value_heads: int = 0      # 0 -> num_attention_heads
  head_dim: int = 0                 # 0 -> hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  hidden_act: str = 'silu'
  attention_bias: bool = False
  mlp_bias: bool = False

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> 'LlamaConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in names and v is not None}
    # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_scaling.
    rope = dict(cfg.get('rope_parameters') or {})
    if 'rope_theta' in rope:
      kw['rope_theta'] = rope['rope_theta']
    scaling = cfg.get('rope_scaling') or {}
    rope_type = (rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
                 or 'default')
    if rope_type != 'default':
      raise ValueError(f'config.json rope type {rope_type!r} is not supported (only "default")')
    layers.activation(kw.get('hidden_act', 'silu'))
    return cls(**kw)

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def hd(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


class LlamaLayer(nn.Module):
  """Pre-norm block: x += attn(RMSNorm(x)); x += mlp(RMSNorm(x))."""
  cfg: LlamaConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    c, dt = self.cfg, self.dtype
    b, t, _ = x.shape
    h = layers.RMSNorm(c.rms_norm_eps, dt, name='input_layernorm')(x)
    ab = c.attention_bias
    q = layers.dense(c.num_attention_heads * c.hd, 'q_proj', dt, ab)(h)
    k = layers.dense(c.kv_heads * c.hd, 'k_proj', dt, ab)(h)
    v = layers.dense(c.kv_heads * c.hd, 'v_proj', dt, ab)(h)
    q = layers.apply_rope(q.reshape(b, t, -1, c.hd), cos, sin)
    k = layers.apply_rope(k.reshape(b, t, -1, c.hd), cos, sin)
    a = layers.attention(q, k, v.reshape(b, t, -1, c.hd), mask, causal=True)
    x = x + layers.dense(c.hidden_size, 'o_proj', dt, ab)(a.reshape(b, t, -1))
    h = layers.RMSNorm(c.rms_norm_eps, dt, name='post_attention_layernorm')(x)
    act = layers.activation(c.hidden_act)
    g = act(layers.dense(c.intermediate_size, 'gate_proj', dt, c.mlp_bias)(h))
    u = layers.dense(c.intermediate_size, 'up_proj', dt, c.mlp_bias)(h)
    return x + layers.dense(c.hidden_size, 'down_proj', dt, c.mlp_bias)(g * u)


class LlamaModel(nn.Module):
  """ids [B, T] int, mask [B, T] bool -> final-normed hidden state [B, T, hidden]."""
  cfg: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.dtype
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, name='embed_tokens')(ids)
    # Positions count from 0 whatever the padding (right padding, as transformers does).
    cos, sin = layers.rope_cos_sin(jnp.arange(ids.shape[1]), c.hd, c.rope_theta)
    for i in range(c.num_hidden_layers):
      x = LlamaLayer(c, dt, name=f'layers_{i}')(x, mask, cos, sin)
    return layers.RMSNorm(c.rms_norm_eps, dt, name='norm')(x)


IGNORED_PREFIXES = ('lm_head', 'rotary_emb', 'score.')


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], str] | None:
  """HF key (with or without 'model.') -> (module path, 'weight'|'bias'); None if unused."""
  name = name.removeprefix('model.')
  if name.startswith(IGNORED_PREFIXES) or name.endswith('rotary_emb.inv_freq'):
    return None
  stem, leaf = name.rsplit('.', 1)
  if stem in ('embed_tokens', 'norm'):
    return ((stem,), leaf)
  if stem.startswith('layers.'):
    idx, rest = stem.removeprefix('layers.').split('.', 1)
    return ((f'layers_{idx}', rest.split('.')[-1]), leaf)
  raise KeyError(name)
