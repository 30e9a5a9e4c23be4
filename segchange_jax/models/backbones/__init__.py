"""Siamese backbones: each maps images to 4 NHWC feature maps at strides 4, 8, 16, 32.

The registry: `model.backbone` names a backbone that `register(name, module, torch_prefix)`
added (the three built-ins at the end of this file). `register` checks the interface below
and refuses a module that lacks any of it, naming each missing attribute. Interface of a
backbone module (the one statement of it; `REQUIRED` and `OPTIONAL` hold the same names):

- `from_config(model_cfg, dtype, name) -> flax.linen.Module`: the backbone for the config's
  `model` section, computing in `dtype`, with `name` as its variable scope. The module's
  `__call__(x, train: bool = False)` maps [B, H, W, 3] ImageNet-normalised images (H and W
  multiples of 32) to a list of 4 maps [B, H/s, W/s, channels(model_cfg)[i]], s = 4, 8, 16, 32.
  Its randomness (dropout, drop path) draws from the 'dropout' rng, and only when `train`.
- `channels(model_cfg) -> tuple[int, int, int, int]`: the 4 maps' widths, without building it.
- `torch_mapping(torch_prefix, flax_prefix, model_cfg) -> (rules, aliases, ignore)`: its weights
  as `segchange_jax.models.torch_rules.Rule`s (torch key `torch_prefix + ...` <-> Flax path
  `(collection, *flax_prefix, ...)`), torch keys that alias a canonical one ({alias: canonical})
  and regexes of torch keys that are deliberately unused. `torch_prefix` '' gives the key names
  of the stand-alone backbone (the published ImageNet files, `interop/pretrained.py`).
- `USES_BATCH_STATS: bool`: whether training normalises with batch statistics (a
  'batch_stats' collection). True makes the model call the backbone on each time separately
  in training, as upstream does; False lets it run the stacked pair in one call.
- optional `frozen_param_paths(flax_prefix) -> list of 'params' paths` that upstream never
  trains; the optimizer leaves them unchanged (`train/param_groups.py`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from segchange_jax.models.backbones import hgnetv2
from segchange_jax.models.backbones import resnet
from segchange_jax.models.backbones import swin

# The interface above, by attribute: what a missing one is (for the registration error).
REQUIRED = {
    'from_config': 'from_config(model_cfg, dtype, name) -> the linen module',
    'channels': 'channels(model_cfg) -> the 4 maps\' widths',
    'torch_mapping': 'torch_mapping(torch_prefix, flax_prefix, model_cfg) -> '
                     '(rules, aliases, ignore)',
    'USES_BATCH_STATS': 'USES_BATCH_STATS = True or False (BatchNorm with batch statistics?)',
}
OPTIONAL = {
    'frozen_param_paths': 'frozen_param_paths(flax_prefix) -> params paths never trained',
}


class Backbone(NamedTuple):
  """A registered backbone: its module and where upstream's model keeps its weights."""
  module: ModuleType
  torch_prefix: str


# config name (`model.backbone`) -> Backbone, filled by `register` only. The one list of
# backbones: config validation (`config_lib.backbone_names()`) reads its keys.
REGISTRY: dict[str, Backbone] = {}


def register(name: str, module: ModuleType, torch_prefix: str) -> None:
  """Adds backbone `name` (the `model.backbone` value) implemented by `module`.

  Args:
    name: the config name; registering a name twice is an error.
    module: the backbone's module, with every attribute of the interface (module docstring).
    torch_prefix: where upstream's SegChange model keeps the backbone's weights, e.g.
      'dual_encoder.encoder.backbone.' (prepended to its stand-alone torch key names).

  Raises:
    ValueError: the name is taken, or the module lacks or mistypes interface attributes (all
      of them named in one message).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'backbone name {name!r} must be a non-empty string')
  if name in REGISTRY:
    raise ValueError(f'backbone {name!r} is already registered (module '
                     f'{REGISTRY[name].module.__name__}); pick another name')
  if not isinstance(torch_prefix, str):
    raise ValueError(f'backbone {name!r}: torch_prefix {torch_prefix!r} must be a string')
  where = getattr(module, '__name__', repr(module))
  problems = [f'{attr} ({what})' for attr, what in REQUIRED.items()
              if not hasattr(module, attr)]
  if problems:
    raise ValueError(f'backbone {name!r}: module {where} lacks ' + '; '.join(problems)
                     + ' (the interface: segchange_jax/models/backbones/__init__.py)')
  # Every interface attribute but the flag is a function.
  wrong = [attr for attr in (*REQUIRED, *OPTIONAL) if attr != 'USES_BATCH_STATS'
           and hasattr(module, attr) and not callable(getattr(module, attr))]
  if wrong:
    raise ValueError(f'backbone {name!r}: module {where}: {", ".join(wrong)} must be '
                     'functions')
  if not isinstance(module.USES_BATCH_STATS, bool):
    raise ValueError(f'backbone {name!r}: module {where}: USES_BATCH_STATS is '
                     f'{module.USES_BATCH_STATS!r}, not True or False')
  REGISTRY[name] = Backbone(module, torch_prefix)


def _module(name: str) -> ModuleType:
  if name not in REGISTRY:
    raise ValueError(f'unknown backbone {name!r}; choices: {sorted(REGISTRY)}')
  return REGISTRY[name].module


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
  return _module(model_cfg.backbone).USES_BATCH_STATS


def backbone_torch_mapping(model_cfg: ml_collections.ConfigDict, flax_prefix=('backbone',),
                           torch_prefix: str | None = None):
  """(rules, aliases, ignore) for the backbone's weights under upstream key names.

  `torch_prefix` defaults to where upstream's model keeps the backbone (its registration);
  '' gives the key names of the stand-alone backbone (timm / torchvision / D-FINE files, see
  `segchange_jax.interop.pretrained`).
  """
  module = _module(model_cfg.backbone)
  if torch_prefix is None:
    torch_prefix = REGISTRY[model_cfg.backbone].torch_prefix
  return module.torch_mapping(torch_prefix, tuple(flax_prefix), model_cfg)


def backbone_frozen_param_paths(model_cfg: ml_collections.ConfigDict,
                                flax_prefix=('backbone',)) -> list[tuple[str, ...]]:
  """'params' paths that upstream never trains (HGNetv2's stem); the optimizer must skip them."""
  module = _module(model_cfg.backbone)
  fn = getattr(module, 'frozen_param_paths', None)
  return list(fn(tuple(flax_prefix))) if fn is not None else []


register('swin_base_patch4_window7_224', swin, 'dual_encoder.encoder.backbone.')
register('resnet50', resnet, 'dual_encoder.encoder.backbone.')
register('hgnetv2', hgnetv2, 'dual_encoder.encoder.')
