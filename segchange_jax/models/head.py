"""Text-guided mask head (upstream models/masks/{mask,d_projector}.py).

DProjector (1 text query) and a 2-layer post-norm decoder (5 learned queries) attend over every
pixel of the full-resolution map. Exact rewrites used here:
- few-query cross-attention: scores = x . (q W_k^T) (the key bias only shifts every score of a
  query by a constant, which softmax removes), output = (softmax-weighted sum of x) W_v
  + (sum of weights) b_v. K and V are never formed for the N pixels;
- the DProjector query and the first decoder layer's queries do not depend on each other, so
  both attend in ONE pass over the pixels; the first layer's self-attention acts on the learned
  queries alone and is computed once for the whole batch;
- each pass over the pixels (scores, softmax, dropout, weighted sum) has a written-out VJP whose
  input gradient is one product over the stacked score and pooling terms;
- the gate and the decoder vector enter the first output conv as a per-image kernel scaling and
  a per-image bias instead of full-resolution products and a 2C-channel concat;
- the map arrives with the neck's last 1x1 conv unapplied (`layers.DeferredDense`): every use
  above is linear in it, so that conv folds into the small per-query / per-image weights (its
  bias adds the same score to every pixel of a query, which softmax removes).

Several prompts at once (text [B, P, T, L]): only the DProjector query depends on the text, so
the P text queries join the decoder's queries in the one pass over the pixels, and the learned
queries' decoder, the gate and the decoder vector are computed once per image. What remains per
prompt is the per-image kernel of the first output conv and the output convs after it, which
run as one batch of B * P maps.

Prompt conditioning (`config.model.prompt_conditioning`, models/prompt_film.py): with 'film_head'
or 'film_neck' a prompt-computed scale and shift acts after each of the two output GroupNorms.
With 'dynamic_head' the output convs run once per image without the prompt (the gate alone scales
the first one's kernel), and a small per-prompt network with generated weights reads their maps
and the map the head was given (models/prompt_readout.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import layers
from segchange_jax.models import prompt_film
from segchange_jax.models import prompt_readout
from segchange_jax.models import remat as remat_lib
from segchange_jax.models import torch_rules as tc


def _split(t, heads):
  return t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads)


class _MHA(nn.Module):
  """Holds the four projections of one upstream MultiheadAttention."""
  dim: int
  dtype: Any = jnp.float32

  def setup(self):
    self.in_proj_q = layers.Linear(self.dim, self.dtype)
    self.in_proj_k = layers.Linear(self.dim, self.dtype)
    self.in_proj_v = layers.Linear(self.dim, self.dtype)
    self.out_proj = layers.Linear(self.dim, self.dtype)

  def __call__(self):  # creates every parameter (used by init)
    return [m(in_features=self.dim) for m in (self.in_proj_q, self.in_proj_k, self.in_proj_v,
                                              self.out_proj)]

  def weights(self):
    return self()


def self_attention(x, w, heads: int, dropout: float, deterministic: bool):
  """Standard attention among a few queries [B, Q, C] (tiny; done explicitly)."""
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = w
  q, k, v = (_split(x @ a + b, heads) for a, b in ((wq, bq), (wk, bk), (wv, bv)))
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  p = nn.Dropout(dropout)(jax.nn.softmax(s, -1), deterministic)
  o = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v)
  return o.reshape(*x.shape[:-1], -1) @ wo + bo


def fold_queries(q_in, w, heads: int):
  """Projects queries [B, Q, C] and folds W_k into them: -> [B, Q, H, C] (scaled)."""
  (wq, bq), (wk, _), _, _ = w
  q = _split(q_in @ wq + bq, heads)
  wk = _split(wk, heads)  # [C, H, D]
  return jnp.einsum('bqhd,chd->bqhc', q, wk) * q.shape[-1] ** -0.5


def _scores(x, qk):
  """x [B, N, C] . qk [B, Q, H, C] -> [B, Q, H, N] float32.

  Computed as x @ qk^T ([N, Q*H], x in its own layout) and the small result transposed: as
  qk @ x^T, XLA materialised x^T, a full-resolution transpose.
  """
  s = jnp.einsum('bnc,bqhc->bnqh', x, qk.astype(x.dtype))
  return s.astype(jnp.float32).transpose(0, 2, 3, 1)


def _attend_pool(x, qk, keep):
  """(pooled [B, Q, H, C], weight sums [B, Q, H], softmax weights [B, Q, H, N] float32)."""
  s = _scores(x, qk)
  p = jax.nn.softmax(s, axis=-1)
  pk = p if keep is None else p * keep
  return jnp.einsum('bqhn,bnc->bqhc', pk.astype(x.dtype), x), jnp.sum(pk, -1), p


@jax.custom_vjp
def _attend_pool_kept(x, qk, keep):
  return _attend_pool(x, qk, keep)[:2]


def _attend_pool_fwd(x, qk, keep):
  pooled, wsum, p = _attend_pool(x, qk, keep)
  return (pooled, wsum), (x, qk, keep, p)


def _attend_pool_bwd(res, g):
  x, qk, keep, p = res
  g_pooled, g_wsum = g
  dpk = _scores(x, g_pooled)
  dp = (dpk + g_wsum[..., None]) * keep
  ds = p * (dp - jnp.sum(p * dp, -1, keepdims=True))  # softmax VJP
  # Both input-gradient terms (scores and pooling) as ONE product over the stacked queries: one
  # full-resolution result instead of one per term, all of which autodiff kept until their sum
  # (at the train step's memory peak).
  lhs = jnp.concatenate([ds, p * keep], axis=1).astype(x.dtype)
  rhs = jnp.concatenate([qk.astype(x.dtype), g_pooled.astype(x.dtype)], axis=1)
  dx = jnp.einsum('bqhn,bqhc->bnc', lhs, rhs)
  dqk = jnp.einsum('bqhn,bnc->bqhc', ds.astype(x.dtype), x).astype(qk.dtype)
  return dx, dqk, jnp.zeros_like(keep)


_attend_pool_kept.defvjp(_attend_pool_fwd, _attend_pool_bwd)


def attend_pixels(x, qk, keep=None):
  """Cross-attention of folded queries qk [B, Q, H, C] over the N pixels of x [B, N, C].

  Softmax over the pixels, then the weighted sum of x: returns (pooled [B, Q, H, C], sum of
  the weights [B, Q, H]). `keep`: dropout's scaled keep mask on the weights [B, Q, H, N]
  (None: no dropout). With a mask the VJP is written out (`_attend_pool_bwd`).
  """
  if keep is None:
    return _attend_pool(x, qk, None)[:2]
  return _attend_pool_kept(x, qk, keep)


def finish_cross(pooled, wsum, w, heads: int):
  """Pooled pixels -> W_v per head (+ the weight sum times b_v), merge heads, out_proj.

  Returns [B, Q, C].
  """
  _, _, (wv, bv), (wo, bo) = w
  v = jnp.einsum('bqhc,chd->bqhd', pooled, _split(wv, heads))
  v = v + wsum[..., None].astype(v.dtype) * _split(bv, heads)
  return v.reshape(*v.shape[:2], -1) @ wo + bo


class MaskHead(nn.Module):
  """Full-resolution map x [B, H, W, C] and text embeddings [B, T, L] -> logits [B, H, W, K].

  Text [B, P, T, L] (P prompts per image) gives [B, H, W, P] logits for K = 1 and
  [B, H, W, P, K] for K > 1: the same numbers as P calls with one prompt each, for about the
  cost of one call plus P output convs (module docstring). The head has no BatchNorm; in train
  mode the output convs' GroupNorm is per map and the decoder's dropout is drawn once per image
  (the decoder does not depend on the prompt, so all P prompts of an image share it).
  """
  num_classes: int = 1
  heads: int = 8
  num_queries: int = 5
  decoder_layers: int = 2
  decoder_ffn: int = 2048
  dropout: float = 0.1
  gn_groups: int = 32
  dtype: Any = jnp.float32
  conditioning: str = 'none'   # prompt_film.CONDITIONINGS

  @nn.compact
  def __call__(self, x: jax.Array | layers.DeferredDense, text: jax.Array,
               train: bool = False) -> jax.Array:
    # The map is only used linearly (pixel sums, attention scores, the first output conv), so a
    # pending 1x1 conv (the neck's EGA) is folded into those weights instead of applied.
    m = x if isinstance(x, layers.DeferredDense) else layers.DeferredDense(x)
    b, h, w, _ = m.x.shape
    c = m.channels
    det = not train
    dt = self.dtype
    xd = m.x.astype(dt)
    pix = xd.reshape(b, h * w, -1)
    drop = lambda t: nn.Dropout(self.dropout)(t, det)

    # DProjector text query: one per prompt.
    multi = text.ndim == 4
    t = jnp.mean(text.astype(jnp.float32), axis=-2).astype(dt)
    if text.shape[-1] != c:
      t = layers.dense(c, dt, 'lang2vis')(t)
    if not multi:
      t = t[:, None]  # [B, 1, C]
    p = t.shape[1]  # [B, P, C]
    dp_w = _MHA(c, dt, name='dproj_attn').weights()
    qk_dp = fold_queries(t, dp_w, self.heads)

    # Decoder layer 0's self-attention on the learned queries: batch-independent.
    queries = self.param('query_embed', nn.initializers.normal(1.0), (self.num_queries, c))
    tgt = jnp.broadcast_to(queries.astype(dt)[None], (1 if det else b, self.num_queries, c))
    dec_w = [(_MHA(c, dt, name=f'dec{i}_self_attn').weights(),
              _MHA(c, dt, name=f'dec{i}_cross_attn').weights()) for i in range(self.decoder_layers)]

    pooled_dp = None
    for i, (sw, cw) in enumerate(dec_w):
      a = self_attention(tgt, sw, self.heads, self.dropout, det)
      tgt = layers.layer_norm(dt, f'dec{i}_norm1')(tgt + drop(a))
      tgt = jnp.broadcast_to(tgt, (b, *tgt.shape[1:]))
      qk = fold_queries(tgt, cw, self.heads)
      # Dropout on the decoder's attention weights, as the scaled keep mask it multiplies by.
      n_q = qk.shape[1]
      keep = None if det else nn.Dropout(self.dropout)(
          jnp.ones((b, n_q, self.heads, h * w), jnp.float32), det)
      if i == 0:  # one pass over the pixels for the text query and the first layer's queries
        if keep is not None:  # (the text queries' weights take no dropout)
          ones = (jnp.ones_like(keep[:, :1]) if not multi else
                  jnp.ones((b, p, *keep.shape[2:]), keep.dtype))
          keep = jnp.concatenate([ones, keep], axis=1)
        pooled, wsum = attend_pixels(pix, m.fold(jnp.concatenate([qk_dp, qk], axis=1)), keep)
        pooled = m.combine(pooled, wsum)
        pooled_dp = finish_cross(pooled[:, :p], wsum[:, :p], dp_w, self.heads)
        pooled, wsum = pooled[:, p:], wsum[:, p:]
      else:
        pooled, wsum = attend_pixels(pix, m.fold(qk), keep)
        pooled = m.combine(pooled, wsum)
      a = finish_cross(pooled, wsum, cw, self.heads)
      tgt = layers.layer_norm(dt, f'dec{i}_norm2')(tgt + drop(a))
      f = layers.dense(self.decoder_ffn, dt, f'dec{i}_linear1')(tgt)
      f = layers.dense(c, dt, f'dec{i}_linear2')(drop(nn.relu(f)))
      tgt = layers.layer_norm(dt, f'dec{i}_norm3')(tgt + drop(f))
    d = jnp.mean(tgt, axis=1)  # [B, C]
    query_vec = layers.dense(c, dt, 'dproj_lin')(pooled_dp + t)  # [B, P, C]

    g = m.combine(jnp.mean(m.x.astype(jnp.float32), axis=(1, 2)).astype(dt))
    g = nn.relu(layers.dense(c // 8, dt, 'gate_fc1')(g))
    g = nn.sigmoid(layers.dense(c, dt, 'gate_fc2')(g))
    readout = prompt_film.reads_per_prompt(self.conditioning)
    w0, b0 = layers.Linear(c // 2, dt, name='out_conv0')(in_features=2 * c)
    if readout or not multi:
      # feat = x * scale, scale [B, C]: with 'dynamic_head' the gate alone (the maps below are
      # the same for every prompt of a pair, which reads them afterwards).
      y = _first_conv(m, xd, g if readout else g + query_vec[:, 0], d, w0, b0)
    else:  # the same per (image, prompt); the maps below are a batch of B * P
      k_img = (g[:, None] + query_vec)[:, :, None, :] * w0[:c].T  # [B, P, C/2, C]
      bias_img = (d @ w0[c:] + b0)[:, None] + m.offset(k_img)  # [B, P, C/2]
      k_img = m.fold(k_img).transpose(0, 1, 3, 2)  # [B, P, Cx, C/2]
      # One [N, Cx] x [Cx, P * C/2] product per image (XLA:CPU ran the prompt-major output
      # layout as a slower, strided product), then the maps moved prompt-major for the batch.
      y = jnp.einsum('bhwc,bpco->bhwpo', xd, k_img) + bias_img[:, None, None]
      y = y.transpose(0, 3, 1, 2, 4).reshape(b * p, h, w, -1)
    film = [None, None]
    if prompt_film.conditions_head(self.conditioning):  # one (scale, shift) row per map
      film = [tuple(f.reshape(y.shape[0], -1) for f in pair) for pair in
              prompt_film.PromptFiLM((c // 2, c // 4), dtype=dt, name='prompt_film')(text)]
    modulate = prompt_film.modulate
    y0 = nn.relu(modulate(layers.group_norm(self.gn_groups, dt, 'out_gn0')(y), film[0]))
    y = layers.ShiftedConv(c // 4, 3, dt, name='out_conv1')(y0)  # = conv(), faster backward
    z = nn.relu(modulate(layers.group_norm(self.gn_groups, dt, 'out_gn1')(y), film[1]))
    y = layers.dense(self.num_classes, dt, 'out_conv2')(z).astype(jnp.float32)
    if readout:  # [B, H, W, K] + a per-prompt network on both maps -> [B, H, W, P, K]
      # It also reads xd, the given map before the neck's pending 1x1 conv: that conv is a
      # linear map of xd, so xd carries all it does without forming the full-resolution product.
      y = y[:, :, :, None] + prompt_readout.PromptReadout(
          num_classes=self.num_classes, groups=self.gn_groups, dtype=dt, name='prompt_readout')(
              jnp.concatenate([y0, z], -1), xd, text if multi else text[:, None], query_vec)
      if not multi:
        return y[:, :, :, 0]
    elif not multi:
      return y
    else:
      y = y.reshape(b, p, h, w, -1).transpose(0, 2, 3, 1, 4)  # [B, H, W, P, K]
    return y[..., 0] if self.num_classes == 1 else y


def _first_conv(m: layers.DeferredDense, xd, scale, d, w0, b0):
  """conv1x1(concat[x * scale, d]) = x @ (scale[:, None] * W_top) + (d @ W_bottom + bias), for a
  per-image scale [B, C] and decoder vector d [B, C]: [B, H, W, C/2]."""
  c = scale.shape[-1]
  k_img = scale[:, None, :] * w0[:c].T  # [B, C/2, C]
  bias_img = d @ w0[c:] + b0 + m.offset(k_img)  # [B, C/2]
  k_img = m.fold(k_img).transpose(0, 2, 1)  # [B, Cx, C/2]
  return jnp.einsum('bhwc,bco->bhwo', xd, k_img) + bias_img[:, None, None]


def build_head(model_cfg, dtype: Any, name: str = 'mask_head') -> MaskHead:
  head = remat_lib.wrap(MaskHead, remat_lib.policy_of(model_cfg), (3,))
  return head(model_cfg.num_classes, model_cfg.head_heads, model_cfg.num_queries,
                  model_cfg.decoder_layers, model_cfg.decoder_ffn, model_cfg.dropout,
                  model_cfg.gn_groups, dtype, prompt_film.conditioning_of(model_cfg),
                  name=name)


def _mha_rules(t: str, path) -> list[tc.Rule]:
  rules = []
  for n in ('in_proj_q', 'in_proj_k', 'in_proj_v', 'out_proj'):
    rules += tc.linear(f'{t}.{n}', (*path, n))
  return rules


def torch_rules(prefix: str, path: tuple[str, ...], model_cfg, text_dim: int) -> list[tc.Rule]:
  """Rules for upstream `mask_head` (MaskHead)."""
  p = tuple(path)
  vis = model_cfg.token_dim if model_cfg.use_token_connector else model_cfg.fpn_dim
  rules = []
  if text_dim != vis:
    rules += tc.linear(f'{prefix}.d_projector.lang2vis', (*p, 'lang2vis'))
  rules += _mha_rules(f'{prefix}.d_projector.cross_attn', (*p, 'dproj_attn'))
  rules += tc.linear(f'{prefix}.d_projector.lin', (*p, 'dproj_lin'))
  rules.append(tc.Rule(f'{prefix}.query_embed.weight', ('params', *p, 'query_embed')))
  for i in range(model_cfg.decoder_layers):
    t = f'{prefix}.transformer_decoder.layers.{i}'
    rules += _mha_rules(f'{t}.self_attn', (*p, f'dec{i}_self_attn'))
    rules += _mha_rules(f'{t}.cross_attn', (*p, f'dec{i}_cross_attn'))
    rules += tc.linear(f'{t}.linear1', (*p, f'dec{i}_linear1'))
    rules += tc.linear(f'{t}.linear2', (*p, f'dec{i}_linear2'))
    for j in (1, 2, 3):
      rules += tc.norm(f'{t}.norm{j}', (*p, f'dec{i}_norm{j}'))
  rules += layers.conv1x1_rules(f'{prefix}.channel_attn.1', (*p, 'gate_fc1'))
  rules += layers.conv1x1_rules(f'{prefix}.channel_attn.3', (*p, 'gate_fc2'))
  rules += layers.conv1x1_rules(f'{prefix}.mask_head.0', (*p, 'out_conv0'))
  rules += tc.norm(f'{prefix}.mask_head.1', (*p, 'out_gn0'))
  rules += tc.conv(f'{prefix}.mask_head.3', (*p, 'out_conv1'))
  rules += tc.norm(f'{prefix}.mask_head.4', (*p, 'out_gn1'))
  rules += layers.conv1x1_rules(f'{prefix}.mask_head.6', (*p, 'out_conv2'))
  return rules
