"""Which parameters train at which learning rate, and which never train (upstream semantics).

Upstream gives the backbone learning rate to every parameter whose torch NAME contains
'backbone' and freezes the HGNetv2 stem. Our Flax paths differ from those names (the HGNetv2
weights are named `dual_encoder.encoder.*` upstream, so they train at the head rate), so the
labels are read off the same torch mapping the checkpoint converter uses.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from segchange_jax.models import segchange
from segchange_jax.models import torch_rules
from segchange_jax.models.backbones import backbone_frozen_param_paths
from segchange_jax.train import optim


def lr_label_fn(config: ml_collections.ConfigDict) -> optim.LabelFn:
  """Param path names (without 'params') -> 'backbone' or 'head', by upstream torch names."""
  rules, _, _ = segchange.torch_mapping(config)
  torch_names = {r.path[1:]: r.torch_key for r in rules if r.path[0] == 'params'}

  def label(names: tuple[str, ...]) -> str:
    key = torch_names.get(tuple(names))
    if key is None:  # a parameter upstream does not have: fall back to the path rule
      return optim.default_label_fn(names)
    return optim.BACKBONE if 'backbone' in key else optim.HEAD
  return label


def frozen_mask_fn(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
  """params -> bool pytree, True where upstream sets requires_grad=False (the backbone's
  `frozen_param_paths`, e.g. the HGNetv2 stem); None when nothing is frozen."""
  frozen = {tuple(p[1:]) for p in backbone_frozen_param_paths(config.model)}  # drop 'params'
  if not frozen:
    return None

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: torch_rules.path_names(path) in frozen, params)
  return mask
