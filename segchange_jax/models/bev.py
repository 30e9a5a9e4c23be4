"""BEV modules applied per scale to each time's features (upstream models/encoders/bev.py).

`BEVLinearAttention`: linear attention with the key softmax over the head dimension (not over
tokens), then a 1x1 conv. `BEVTransformer`: torch nn.Transformer(x, x) (2 encoder + 2 decoder
post-norm layers) over all H*W tokens, with memory-efficient attention, then a 1x1 conv.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import layers
from segchange_jax.models import remat as remat_lib
from segchange_jax.models import torch_rules as tc

# Queries per chunk when attention dropout forces an explicit softmax (training only).
_DROPOUT_QUERY_CHUNK = 1024


class LinearAttention(nn.Module):
  """q (scaled by inner**-0.5) @ (softmax_d(k)^T v) per head, inner = heads * dim_head."""
  dim: int
  heads: int = 8
  dim_head: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    inner = self.heads * self.dim_head
    qkv = layers.dense(3 * inner, self.dtype, 'to_qkv', use_bias=False)(x)
    q, k, v = (t.reshape(b, n, self.heads, self.dim_head) for t in jnp.split(qkv, 3, axis=-1))
    # Upstream's scale uses the total inner width (its `dim_head`=64), not the per-head 8.
    q = q * inner ** -0.5
    k = jax.nn.softmax(k.astype(jnp.float32), axis=-1).astype(q.dtype)
    context = jnp.einsum('bnhd,bnhe->bhde', k, v)
    out = jnp.einsum('bnhd,bhde->bnhe', q, context).reshape(b, n, inner)
    return layers.dense(self.dim, self.dtype, 'to_out')(out)


class BEVLinearAttention(nn.Module):
  dim: int
  heads: int = 8
  dim_head: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    b, h, w, c = x.shape
    y = LinearAttention(c, self.heads, self.dim_head, self.dtype, name='linear_attention')(
        x.reshape(b, h * w, c))
    return layers.dense(self.dim, self.dtype, 'proj')(y.reshape(b, h, w, c))


def attention(q, k, v, dropout_rate: float, deterministic: bool, module: nn.Module):
  """Softmax attention on [B, L, H, D] tensors.

  Without dropout: `jax.nn.dot_product_attention` (never materialises L x L scores on
  backends with fused kernels). With attention dropout (training): explicit softmax over
  query chunks, so memory stays O(chunk x L).
  """
  if deterministic or dropout_rate == 0.0:
    return jax.nn.dot_product_attention(q, k, v)
  scale = q.shape[-1] ** -0.5
  rng = module.make_rng('dropout')
  lq = q.shape[1]
  chunk = min(_DROPOUT_QUERY_CHUNK, lq)
  pad = (-lq) % chunk
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qc = qp.reshape(q.shape[0], -1, chunk, *q.shape[2:]).swapaxes(0, 1)
  keys = jax.random.split(rng, qc.shape[0])

  @jax.checkpoint
  def one(args):
    qi, key = args
    s = jnp.einsum('bqhd,bkhd->bhqk', qi, k).astype(jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    keep = jax.random.bernoulli(key, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', p, v)

  out = jax.lax.map(one, (qc, keys)).swapaxes(0, 1)
  return out.reshape(q.shape[0], -1, *q.shape[2:])[:, :lq]


class PackedMultiheadAttention(nn.Module):
  """torch nn.MultiheadAttention (packed in_proj [C, 3C] in Flax layout, then out_proj)."""
  heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, memory, deterministic: bool = True):
    c = query.shape[-1]
    kernel = self.param('in_proj_kernel', nn.initializers.xavier_uniform(), (c, 3 * c))
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * c,))
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    q = query.astype(self.dtype) @ kernel[:, :c] + bias[:c]
    kv = memory.astype(self.dtype) @ kernel[:, c:] + bias[c:]
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, c // self.heads)
    out = attention(split(q), split(k), split(v), self.dropout, deterministic, self)
    return layers.dense(c, self.dtype, 'out_proj')(out.reshape(*out.shape[:2], c))


class _FFN(nn.Module):
  ffn: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    y = nn.relu(layers.dense(self.ffn, self.dtype, 'linear1')(x))
    y = nn.Dropout(self.dropout)(y, deterministic)
    return layers.dense(x.shape[-1], self.dtype, 'linear2')(y)


class EncoderLayer(nn.Module):
  """torch nn.TransformerEncoderLayer, post-norm, relu."""
  heads: int
  ffn: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    drop = lambda t: nn.Dropout(self.dropout)(t, deterministic)
    a = PackedMultiheadAttention(self.heads, self.dropout, self.dtype, name='self_attn')(
        x, x, deterministic)
    x = layers.layer_norm(self.dtype, 'norm1')(x + drop(a))
    f = _FFN(self.ffn, self.dropout, self.dtype, name='ffn')(x, deterministic)
    return layers.layer_norm(self.dtype, 'norm2')(x + drop(f))


class DecoderLayer(nn.Module):
  """torch nn.TransformerDecoderLayer, post-norm, relu."""
  heads: int
  ffn: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory, deterministic: bool):
    drop = lambda t: nn.Dropout(self.dropout)(t, deterministic)
    a = PackedMultiheadAttention(self.heads, self.dropout, self.dtype, name='self_attn')(
        x, x, deterministic)
    x = layers.layer_norm(self.dtype, 'norm1')(x + drop(a))
    a = PackedMultiheadAttention(self.heads, self.dropout, self.dtype, name='multihead_attn')(
        x, memory, deterministic)
    x = layers.layer_norm(self.dtype, 'norm2')(x + drop(a))
    f = _FFN(self.ffn, self.dropout, self.dtype, name='ffn')(x, deterministic)
    return layers.layer_norm(self.dtype, 'norm3')(x + drop(f))


class BEVTransformer(nn.Module):
  """transformer(x, x) over the H*W tokens, then a 1x1 conv."""
  dim: int
  heads: int = 8
  layers: int = 2
  ffn: int = 2048
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    det = not train
    src = x.reshape(b, h * w, c)
    mem = src
    for i in range(self.layers):
      mem = EncoderLayer(self.heads, self.ffn, self.dropout, self.dtype,
                         name=f'encoder_layers_{i}')(mem, det)
    mem = layers.layer_norm(self.dtype, 'encoder_norm')(mem)
    out = src
    for i in range(self.layers):
      out = DecoderLayer(self.heads, self.ffn, self.dropout, self.dtype,
                         name=f'decoder_layers_{i}')(out, mem, det)
    out = layers.layer_norm(self.dtype, 'decoder_norm')(out)
    return layers.dense(self.dim, self.dtype, 'proj')(out.reshape(b, h, w, c))


def build_bev(model_cfg, dim: int, dtype: Any, name: str) -> nn.Module:
  policy = remat_lib.policy_of(model_cfg)
  if model_cfg.bev == 'LinearAttention':
    return remat_lib.wrap(BEVLinearAttention, policy, (2,))(
        dim, model_cfg.bev_heads, model_cfg.bev_dim_head, dtype, name=name)
  return remat_lib.wrap(BEVTransformer, policy, (2,))(
      dim, model_cfg.bev_heads, model_cfg.bev_transformer_layers,
      model_cfg.bev_transformer_ffn, model_cfg.dropout, dtype, name=name)


# ------------------------------------------------------------------------------ torch mapping


def _packed_mha_rules(t: str, path: tuple[str, ...]) -> list[tc.Rule]:
  return [tc.Rule(f'{t}.in_proj_weight', ('params', *path, 'in_proj_kernel'), 'linear'),
          tc.Rule(f'{t}.in_proj_bias', ('params', *path, 'in_proj_bias')),
          *tc.linear(f'{t}.out_proj', (*path, 'out_proj'))]


def torch_rules(prefix: str, path: tuple[str, ...], model_cfg) -> list[tc.Rule]:
  """Rules for one upstream BEV module at `prefix` (e.g. 'dual_encoder.bev.0')."""
  p = tuple(path)
  rules = layers.conv1x1_rules(f'{prefix}.proj', (*p, 'proj'))
  if model_cfg.bev == 'LinearAttention':
    la = f'{prefix}.linear_attention'
    return rules + tc.linear(f'{la}.to_qkv', (*p, 'linear_attention', 'to_qkv'), bias=False) + \
        tc.linear(f'{la}.to_out', (*p, 'linear_attention', 'to_out'))
  t = f'{prefix}.transformer'
  for kind, n_norms, attn_names in (('encoder', 2, ('self_attn',)),
                                    ('decoder', 3, ('self_attn', 'multihead_attn'))):
    for i in range(model_cfg.bev_transformer_layers):
      tl, fl = f'{t}.{kind}.layers.{i}', (*p, f'{kind}_layers_{i}')
      for a in attn_names:
        rules += _packed_mha_rules(f'{tl}.{a}', (*fl, a))
      rules += tc.linear(f'{tl}.linear1', (*fl, 'ffn', 'linear1'))
      rules += tc.linear(f'{tl}.linear2', (*fl, 'ffn', 'linear2'))
      for j in range(1, n_norms + 1):
        rules += tc.norm(f'{tl}.norm{j}', (*fl, f'norm{j}'))
    rules += tc.norm(f'{t}.{kind}.norm', (*p, f'{kind}_norm'))
  return rules
