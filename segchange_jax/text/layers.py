"""Building blocks shared by the text encoders: attention, rotary embeddings, RMSNorm.

Flax submodule names mirror the Hugging Face parameter names (`q_proj`, `LayerNorm`, ...), so one
generic name mapping (`loading.py`) serves every architecture.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """'float32' | 'bfloat16' | a jnp dtype -> jnp dtype, with a clear error otherwise."""
  try:
    out = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'unknown dtype {dtype!r}; use float32 or bfloat16') from e
  if out not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f'unsupported compute dtype {dtype!r}; use float32 or bfloat16')
  return out


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
              causal: bool) -> jax.Array:
  """Scaled dot-product attention with a key padding mask (and causal mask).

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, T, Hkv, D]; Hkv divides H (grouped-query attention).
    key_mask: [B, T] bool, False for padding keys.
    causal: lower-triangular mask on top of the padding mask.

  Returns:
    [B, T, H, D]. Logits and softmax run in float32 as in transformers' eager path.
  """
  t = q.shape[1]
  mask = key_mask[:, None, None, :]
  if causal:
    mask = mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
  if k.shape[2] != q.shape[2]:
    # GQA: each KV head serves H / Hkv query heads, in order (torch repeat_interleave layout).
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
  out = jax.nn.dot_product_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask)
  return out.astype(q.dtype)


def rope_cos_sin(positions: jax.Array, rot_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [T, rot_dim] in the rotate-half layout of transformers (float32)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))
  freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first cos.shape[-1] channels of x [B, T, H, D]; the rest pass through."""
  rot = cos.shape[-1]
  xr, xp = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  xr = (xr.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)
  return jnp.concatenate([xr, xp], axis=-1) if xp.shape[-1] else xr


class RMSNorm(nn.Module):
  """Llama RMSNorm: statistics in float32, then scaled by `weight` in the input dtype."""
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param('weight', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return w.astype(self.dtype) * xf.astype(self.dtype)


ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_fast': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


def activation(name: str):
  """Hugging Face `hidden_act` name -> function (clear error for unknown names)."""
  if name not in ACTIVATIONS:
    raise ValueError(f'hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  """A Dense layer with float32 params and `dtype` compute (params cast at call time)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)
