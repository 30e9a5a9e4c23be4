"""Fusion neck (upstream models/neck/{fpn,ega}.py, models/feature/token_mlp.py).

Per scale: 3x3 conv -> GroupNorm -> ReLU -> bilinear x stride (align_corners=True); concat ->
1x1 conv (L-FPN) or 1x1 conv -> GroupNorm -> ReLU (FPN); optional TokenConnector; optional EGA.

Exact rewrite: bilinear upsampling and the 1x1 fusion conv are both linear and act on different
axes, so conv(concat(up(h_i))) = sum_i up(h_i @ W_i) + b. The 1x1 conv runs at each scale's own
resolution instead of on a 4x-wide full-resolution concat.
The EGA's closing 1x1 conv is returned unapplied (`layers.DeferredDense`): the mask head only
uses the map linearly and folds that conv into its own weights.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segchange_jax.models import kernels
from segchange_jax.models import layers
from segchange_jax.models import prompt_film
from segchange_jax.models import remat as remat_lib
from segchange_jax.models import torch_rules as tc

STRIDES = (4, 8, 16, 32)
SCHARR_X = np.array([[-3., 0., 3.], [-10., 0., 10.], [-3., 0., 3.]], np.float32)


def gaussian_kernel(size: int = 3, sigma: float = 1.0) -> np.ndarray:
  r = np.arange(size) - size // 2
  g = np.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
  return (g / g.sum()).astype(np.float32)


def _depthwise_init(kernel2d: np.ndarray):
  """Every channel starts from the same fixed kernel (trainable afterwards, as upstream)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(kernel2d, dtype)[:, :, None, None], shape)
  return init


class EGA(nn.Module):
  """Edge-Gaussian aggregation: conv1x1(x + ReLU(BN(gauss(ReLU(BN(|scharr(x)|)))))).."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> layers.DeferredDense:
    """Returns the closing 1x1 conv unapplied: every consumer (the mask head) is linear in it."""
    c = x.shape[-1]
    x = x.astype(self.dtype)
    dw = lambda k, name: layers.DepthwiseConv(3, self.dtype, _depthwise_init(k), name=name)
    ex = dw(SCHARR_X, 'scharr_x')(x)
    ey = dw(SCHARR_X.T, 'scharr_y')(x)
    e = jnp.sqrt(ex * ex + ey * ey + 1e-6)
    e = nn.relu(layers.batch_norm(train, self.dtype, 'scharr_bn')(e))
    g = dw(gaussian_kernel(3, 1.0), 'gaussian')(e)
    g = nn.relu(layers.batch_norm(train, self.dtype, 'gaussian_bn')(g))
    kernel, bias = layers.Linear(c, self.dtype, name='conv_extra')(in_features=c)
    return layers.DeferredDense(x + g, kernel, bias)


class TokenConnector(nn.Module):
  """Two [1x1 conv -> LayerNorm over channels] blocks."""
  dim: int
  num_layers: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = layers.dense(self.dim, self.dtype, f'conv_{i}')(x)
      x = layers.layer_norm(self.dtype, f'norm_{i}')(x)
    return x


class Neck(nn.Module):
  """Multi-scale difference maps -> one full-resolution map."""
  fpn_type: str = 'L-FPN'
  dim: int = 256
  gn_groups: int = 32
  use_token_connector: bool = False
  token_dim: int = 128
  use_ega: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False,
               film: Sequence[tuple[jax.Array, jax.Array]] | None = None
               ) -> layers.DeferredDense:
    """-> the full-resolution map, as a `layers.DeferredDense` (`.materialize()` for the array).

    `film`: per scale a prompt's (scale, shift) [N, dim] applied after that scale's GroupNorm
    (models/prompt_film.py; one row per map), or None.
    """
    n = len(feats)
    kernel = self.param('fusion_kernel', nn.initializers.lecun_normal(), (n * self.dim, self.dim))
    bias = self.param('fusion_bias', nn.initializers.zeros, (self.dim,))
    kernel = kernel.astype(self.dtype)
    projected = []
    for i, f in enumerate(feats):
      h = layers.conv(self.dim, 3, self.dtype, f'scale_conv_{i}')(f)
      h = layers.group_norm(self.gn_groups, self.dtype, f'scale_gn_{i}')(h)
      h = nn.relu(prompt_film.modulate(h, None if film is None else film[i]))
      # The fusion conv's slice for this scale, applied before upsampling (exact rewrite).
      projected.append(h @ kernel[i * self.dim:(i + 1) * self.dim])
    out = kernels.upsample_bilinear_sum(projected, STRIDES[:n]) + bias.astype(self.dtype)
    if self.fpn_type == 'FPN':
      out = nn.relu(layers.group_norm(self.gn_groups, self.dtype, 'fusion_gn')(out))
    if self.use_token_connector:
      out = TokenConnector(self.token_dim, dtype=self.dtype, name='token_connector')(out)
    if self.use_ega:
      return EGA(self.dtype, name='ega')(out, train)
    return layers.DeferredDense(out)


def build_neck(model_cfg, dtype: Any, name: str = 'fpn') -> Neck:
  neck = remat_lib.wrap(Neck, remat_lib.policy_of(model_cfg), (2,))
  return neck(model_cfg.fpn_type, model_cfg.fpn_dim, model_cfg.gn_groups,
              model_cfg.use_token_connector, model_cfg.token_dim, model_cfg.use_ega, dtype,
              name=name)


def torch_rules(prefix: str, path: tuple[str, ...], model_cfg) -> list[tc.Rule]:
  """Rules for upstream `fpn` (FPNFeatureFuser or LightweightFPN)."""
  p = tuple(path)
  rules = []
  for i in range(len(model_cfg.out_dims)):
    rules += tc.conv(f'{prefix}.scale_heads.{i}.0', (*p, f'scale_conv_{i}'))
    rules += tc.norm(f'{prefix}.scale_heads.{i}.1', (*p, f'scale_gn_{i}'))
  fusion = f'{prefix}.fusion_conv' + ('.0' if model_cfg.fpn_type == 'FPN' else '')
  rules += [tc.Rule(f'{fusion}.weight', ('params', *p, 'fusion_kernel'), 'conv1x1_to_dense'),
            tc.Rule(f'{fusion}.bias', ('params', *p, 'fusion_bias'))]
  if model_cfg.fpn_type == 'FPN':
    rules += tc.norm(f'{prefix}.fusion_conv.1', (*p, 'fusion_gn'))
  if model_cfg.use_token_connector:
    for i in range(2):
      rules += layers.conv1x1_rules(f'{prefix}.token_connector.layers.{2 * i}',
                                    (*p, 'token_connector', f'conv_{i}'))
      rules += tc.norm(f'{prefix}.token_connector.layers.{2 * i + 1}',
                       (*p, 'token_connector', f'norm_{i}'))
  if model_cfg.use_ega:
    e, pe = f'{prefix}.ega', (*p, 'ega')
    rules += [tc.Rule(f'{e}.scharr.conv_x.weight', ('params', *pe, 'scharr_x', 'kernel'), 'conv'),
              tc.Rule(f'{e}.scharr.conv_y.weight', ('params', *pe, 'scharr_y', 'kernel'), 'conv'),
              tc.Rule(f'{e}.gaussian.gaussian.weight', ('params', *pe, 'gaussian', 'kernel'),
                      'conv')]
    rules += tc.batchnorm(f'{e}.scharr.norm', (*pe, 'scharr_bn'))
    rules += tc.batchnorm(f'{e}.gaussian.norm', (*pe, 'gaussian_bn'))
    rules += layers.conv1x1_rules(f'{e}.conv_extra', (*pe, 'conv_extra'))
  return rules
