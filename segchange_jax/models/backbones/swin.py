"""Swin Transformer backbone (NHWC), numerically equal to timm 1.0.x `swin_*` with features_only.

Returns the raw output of each of the 4 stages (timm's features_only drops the final norm), at
strides 4, 8, 16, 32 with widths C, 2C, 4C, 8C. Every stage keeps the configured window (7) and
shift (3) at every input size: maps that are not a multiple of the window are cyclically shifted
FIRST and then zero-padded bottom/right, with the shift mask built for the padded map. That is
what timm 1.0.x computes for a model built at img_size=512 (upstream), so one checkpoint serves
any input size that is a multiple of 32. The relative position index and the masks are numpy
constants computed at trace time from the (static) input shape; they are not variables.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segchange_jax.models import kernels
from segchange_jax.models import remat as remat_lib
from segchange_jax.models import torch_rules as tc

_LN_EPS = 1e-5
_dense_init = nn.initializers.truncated_normal(0.02)  # timm's ViT-style Linear init

# LayerNorm only: a training call on the stacked A/B pair is the same maths as two calls.
USES_BATCH_STATS = False


# Static geometry (numpy, cached per shape) -------------------------------------------------


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """[N, N] index into the (2w-1)^2 bias table for every (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in [0, 2w-2]
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, N, N] additive mask (0 / -100) for shifted windows on a padded map.

  height, width are the padded sizes (multiples of `window`). The three bands per axis are
  measured from the padded border, as in timm 1.0.x, so the mask matches its padded layout.
  """

  def bands(size):
    band = np.zeros(size, np.int32)
    band[size - window:size - shift] = 1
    band[size - shift:] = 2
    return band

  region = bands(height)[:, None] * 3 + bands(width)[None, :]
  region = _partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
  differs = region[:, None, :] != region[:, :, None]
  return np.where(differs, -100.0, 0.0).astype(np.float32)


def _partition(x, window: int):
  """[B, H, W, C] -> [B, num_windows, window*window, C] (row-major windows); numpy or jax."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def _merge(x, window: int, height: int, width: int):
  """Inverse of `_partition`: [B, num_windows, window*window, C] -> [B, height, width, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


# Modules -----------------------------------------------------------------------------------


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_dense_init, name=name)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a learned relative position bias.

  Takes the (shifted) map unpadded and returns it unpadded: zero-padded to a multiple of the
  window before qkv (as timm), cropped back BEFORE proj (timm projects the padded tokens and
  then drops them; proj acts per token, so the kept values are the same). Projecting real
  tokens only in qkv too was tried: the saved work was lost to the transposes and bias
  reductions that pad-after-projection adds to the backward pass.
  """
  dim: int
  num_heads: int
  window_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, shift: int) -> jax.Array:
    """x: [B, H, W, C], already rolled by -shift; shift > 0 masks across the roll's seams."""
    b, h, w, _ = x.shape
    ws, n = self.window_size, self.window_size**2
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    head_dim = self.dim // self.num_heads
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    qkv = _dense(3 * self.dim, 'qkv', self.dtype)(_partition(x, ws))
    qkv = qkv.reshape(b, -1, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, nW, N, h, d]
    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q * head_dim**-0.5, k)

    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1)**2, self.num_heads), jnp.float32)
    index = relative_position_index(self.window_size)
    bias = table[index.reshape(-1)].reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [h, N, N]
    logits = kernels.add_broadcast(logits.astype(jnp.float32), bias)
    if shift:  # the shift mask is built for the padded map, as timm's
      logits = logits + jnp.asarray(shift_mask(hp, wp, ws, shift))[:, None]  # over batch, heads
    # Softmax in float32 also under bfloat16 compute: the -100 mask and the bias need the range.
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bwhqk,bwkhd->bwqhd', attn, v).reshape(b, -1, n, self.dim)
    return _dense(self.dim, 'proj', self.dtype)(_merge(out, ws, hp, wp)[:, :h, :w])


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = nn.gelu(_dense(self.hidden, 'fc1', self.dtype)(x), approximate=False)
    return _dense(dim, 'fc2', self.dtype)(x)


def _drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per sample (timm DropPath, scaled by 1/keep) in training only."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  b = x.shape[0]
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (b,))
  # Stored by a scatter, which XLA never fuses into a consumer: otherwise XLA:CPU fuses the
  # (unrolled) threefry hash into the full-size select below and recomputes it for every
  # element. optimization_barrier does not stop it: XLA:CPU drops barriers before fusion.
  mask = jnp.zeros_like(mask).at[jnp.arange(b)].set(mask).reshape((b,) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class SwinBlock(nn.Module):
  """Pre-norm block: (shifted) window attention, then MLP, each with a residual."""
  dim: int
  num_heads: int
  window_size: int = 7
  shift: int = 0
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ws, s = self.window_size, self.shift
    y = _layer_norm('norm1', self.dtype)(x)
    # timm 1.0.x order: cyclic shift, THEN zero-pad bottom/right to a multiple of the window
    # (the padding and the shift mask for the padded map are inside WindowAttention).
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    y = WindowAttention(self.dim, self.num_heads, ws, self.dtype, name='attn')(y, s)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    x = x + _drop_path(self, y, self.drop_path, train)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name='mlp')(
        _layer_norm('norm2', self.dtype)(x))
    return x + _drop_path(self, y, self.drop_path, train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> 4C (timm order: (0,0), (1,0), (0,1), (1,1) as (row, col)) -> LN -> 2C."""
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    # [B, H/2, 2(row), W/2, 2(col), C] -> [B, H/2, W/2, col, row, C]: the row offset varies fastest.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(
        b, h // 2, w // 2, 4 * c)
    x = _layer_norm('norm', self.dtype)(x)
    return _dense(self.out_dim, 'reduction', self.dtype, use_bias=False)(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patch x patch conv, then LayerNorm."""
  dim: int
  patch_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='proj')(x)
    return _layer_norm('norm', self.dtype)(x)


class SwinStage(nn.Module):
  """Optional patch merging (stages 1..3, timm 1.x places it at the stage start), then blocks."""
  dim: int
  depth: int
  num_heads: int
  downsample: bool
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_paths: Sequence[float] = ()
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = remat_lib.wrap(SwinBlock, self.remat, static_argnums=(2,))
    if self.downsample:
      x = PatchMerging(self.dim, self.dtype, name='downsample')(x)
    for i in range(self.depth):
      x = block(self.dim, self.num_heads, self.window_size,
                    shift=self.window_size // 2 if i % 2 else 0, mlp_ratio=self.mlp_ratio,
                    drop_path=self.drop_paths[i] if self.drop_paths else 0.0,
                    dtype=self.dtype, name=f'blocks_{i}')(x, train)
    return x


class SwinTransformer(nn.Module):
  """Swin backbone: [B, H, W, 3] -> 4 NHWC maps at strides 4, 8, 16, 32 (widths C..8C)."""
  embed_dim: int = 128
  depths: Sequence[int] = (2, 2, 18, 2)
  num_heads: Sequence[int] = (4, 8, 16, 32)
  window_size: int = 7
  mlp_ratio: float = 4.0
  patch_size: int = 4
  drop_path_rate: float = 0.1  # timm default; only active with train=True
  dtype: Any = jnp.float32
  remat: str = 'none'  # config.model.remat, per block

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    stride = self.patch_size * 2**(len(self.depths) - 1)
    if x.ndim != 4 or x.shape[1] % stride or x.shape[2] % stride:
      raise ValueError(f'Swin backbone needs NHWC images with height and width multiples of '
                       f'{stride}, got shape {x.shape}; resize or pad the input '
                       '(config.data.image_size / config.model.img_size)')
    # Stochastic depth grows linearly over all blocks (timm: linspace(0, rate, sum(depths))).
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name='patch_embed')(
        x.astype(self.dtype))
    feats, start = [], 0
    for i, depth in enumerate(self.depths):
      x = SwinStage(self.embed_dim * 2**i, depth, self.num_heads[i], downsample=i > 0,
                    window_size=self.window_size, mlp_ratio=self.mlp_ratio,
                    drop_paths=tuple(rates[start:start + depth]), dtype=self.dtype,
                    remat=self.remat,
                    name=f'layers_{i}')(x, train)
      start += depth
      feats.append(x)
    return feats


# Registry interface ------------------------------------------------------------------------


def from_config(model_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                name: str = 'backbone') -> SwinTransformer:
  """The Swin backbone described by `model_cfg.swin`."""
  s = model_cfg.swin
  return SwinTransformer(embed_dim=s.embed_dim, depths=tuple(s.depths),
                         num_heads=tuple(s.num_heads), window_size=s.window_size,
                         mlp_ratio=s.mlp_ratio, drop_path_rate=s.drop_path_rate,
                         dtype=jnp.dtype(dtype), remat=remat_lib.policy_of(model_cfg), name=name)


def channels(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Widths of the 4 feature maps: C, 2C, 4C, 8C."""
  c = model_cfg.swin.embed_dim
  return (c, 2 * c, 4 * c, 8 * c)


def torch_rules(torch_prefix: str, flax_prefix: Sequence[str],
                model_cfg: ml_collections.ConfigDict) -> list[tc.Rule]:
  """Rules for every tensor of timm's features_only Swin state_dict (keys `layers_N.*`)."""
  t, f = torch_prefix, tuple(flax_prefix)
  rules = tc.conv(f'{t}patch_embed.proj', f + ('patch_embed', 'proj'))
  rules += tc.norm(f'{t}patch_embed.norm', f + ('patch_embed', 'norm'))
  for i, depth in enumerate(model_cfg.swin.depths):
    ts, fs = f'{t}layers_{i}', f + (f'layers_{i}',)
    if i > 0:
      rules += tc.norm(f'{ts}.downsample.norm', fs + ('downsample', 'norm'))
      rules += tc.linear(f'{ts}.downsample.reduction', fs + ('downsample', 'reduction'), bias=False)
    for j in range(depth):
      tb, fb = f'{ts}.blocks.{j}', fs + (f'blocks_{j}',)
      rules += tc.norm(f'{tb}.norm1', fb + ('norm1',))
      rules.append(tc.Rule(f'{tb}.attn.relative_position_bias_table',
                           ('params',) + fb + ('attn', 'relative_position_bias_table')))
      rules += tc.linear(f'{tb}.attn.qkv', fb + ('attn', 'qkv'))
      rules += tc.linear(f'{tb}.attn.proj', fb + ('attn', 'proj'))
      rules += tc.norm(f'{tb}.norm2', fb + ('norm2',))
      rules += tc.linear(f'{tb}.mlp.fc1', fb + ('mlp', 'fc1'))
      rules += tc.linear(f'{tb}.mlp.fc2', fb + ('mlp', 'fc2'))
  return rules


def torch_mapping(torch_prefix: str, flax_prefix: Sequence[str],
                  model_cfg: ml_collections.ConfigDict):
  """(rules, aliases, ignore) for the registry.

  timm 1.0.x keeps `relative_position_index` and `attn_mask` as non-persistent buffers; older
  timm saved them in checkpoints. They are derived from the geometry (recomputed here per input
  size), so they are ignored when present.
  """
  ignore = [re.escape(torch_prefix)
            + r'layers_\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)']
  return torch_rules(torch_prefix, flax_prefix, model_cfg), {}, ignore
