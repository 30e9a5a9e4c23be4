"""Siamese backbones: each returns 4 NHWC feature maps at strides 4, 8, 16, 32.

Interface of every backbone module file:
- a linen Module whose `__call__(x, train: bool = False)` maps [B, H, W, 3] to a list of 4 maps;
- `torch_mapping(torch_prefix, flax_prefix, model_cfg) -> (rules, aliases, ignore)` giving the
  `torch_convert.Rule`s for its weights, aliased torch keys (alias -> canonical) and regexes of
  torch keys that are deliberately unused;
- `USES_BATCH_STATS`: whether training normalises with batch statistics (BatchNorm).
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

# config name (`model.backbone`) -> (module, class, upstream torch prefix of its weights).
# The one list of backbones: config validation reads its keys.
REGISTRY = {
    'swin_base_patch4_window7_224': ('swin', 'SwinTransformer', 'dual_encoder.encoder.backbone.'),
    'resnet50': ('resnet', 'ResNet', 'dual_encoder.encoder.backbone.'),
    'hgnetv2': ('hgnetv2', 'HGNetv2', 'dual_encoder.encoder.'),
}


def _module(name: str):
  if name not in REGISTRY:
    raise ValueError(f'unknown backbone {name!r}; choices: {sorted(REGISTRY)}')
  return importlib.import_module(f'segchange_jax.models.backbones.{REGISTRY[name][0]}')


def build_backbone(model_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                   name: str = 'backbone') -> nn.Module:
  """The backbone module selected by `model_cfg.backbone`."""
  module = _module(model_cfg.backbone)
  return module.from_config(model_cfg, dtype=dtype, name=name)


def backbone_channels(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Channels of the 4 feature maps for this config."""
  return tuple(_module(model_cfg.backbone).channels(model_cfg))


def backbone_uses_batch_stats(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the backbone normalises with batch statistics in training (BatchNorm)."""
  return bool(_module(model_cfg.backbone).USES_BATCH_STATS)


def backbone_torch_mapping(model_cfg: ml_collections.ConfigDict, flax_prefix=('backbone',),
                           torch_prefix: str | None = None):
  """(rules, aliases, ignore) for the backbone's weights under upstream key names.

  `torch_prefix` defaults to where upstream's model keeps the backbone; '' gives the key names
  of the stand-alone backbone (timm / torchvision / D-FINE files, see `segchange_jax.interop.pretrained`).
  """
  if torch_prefix is None:
    torch_prefix = REGISTRY[model_cfg.backbone][2]
  return _module(model_cfg.backbone).torch_mapping(torch_prefix, tuple(flax_prefix), model_cfg)


def backbone_frozen_param_paths(model_cfg: ml_collections.ConfigDict,
                                flax_prefix=('backbone',)) -> list[tuple[str, ...]]:
  """'params' paths that upstream never trains (HGNetv2's stem); the optimizer must skip them."""
  module = _module(model_cfg.backbone)
  fn = getattr(module, 'frozen_param_paths', None)
  return list(fn(tuple(flax_prefix))) if fn is not None else []
