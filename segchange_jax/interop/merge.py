"""Placing loaded arrays onto a (possibly sharded) target tree, by path and shape.

Used wherever variables from a file meet a freshly initialised model: `config.init_from`
(`train/init_from.py`) and `config.model.pretrained` (`interop/pretrained.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from segchange_jax.models import torch_rules


def merge(target: dict, source: dict) -> tuple[dict, dict[str, Any]]:
  """Takes each target leaf from `source` where path and shape agree.

  Args:
    target: {collection: tree} of jax arrays (possibly sharded).
    source: {collection: tree} of numpy arrays.

  Returns:
    (merged variables placed like `target`, report with 'loaded', 'skipped', 'unused').
  """
  src = torch_rules.flatten(source)
  loaded, skipped = [], []

  def take(path, leaf):
    key = torch_rules.path_names(path)
    name = '/'.join(key)
    if key not in src:
      skipped.append(f'{name}: not in the checkpoint')
      return leaf
    value = np.asarray(src[key])
    if value.shape != leaf.shape:
      skipped.append(f'{name}: checkpoint {value.shape} vs model {tuple(leaf.shape)}')
      return leaf
    loaded.append(name)
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  merged = jax.tree_util.tree_map_with_path(take, target)
  used = {tuple(n.split('/')) for n in loaded}
  unused = ['/'.join(k) for k in src if k not in used and k[0] in target]
  return merged, {'loaded': len(loaded), 'skipped': skipped, 'unused': unused}
