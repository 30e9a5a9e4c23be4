"""Converting whole SegChange checkpoints between upstream PyTorch and segchange_jax.

The library behind `python -m segchange_jax.convert_torch`: `to_flax` reads an upstream
`.pth` (with the config naming its variant) and writes our variables dir; `to_torch` writes
any of our checkpoints as an upstream-compatible safetensors state_dict. Both go through each
module's `torch_rules` (segchange_jax.models.torch_rules), so a round trip is exact.
"""

from __future__ import annotations

import jax
import numpy as np

from segchange_jax import atomic
from segchange_jax.interop import checkpoints


def to_flax(checkpoint: str, config, out: str) -> int:
  """Upstream .pth (or any checkpoint) -> `out`/{variables/, config.json}; returns #params."""
  config, variables = checkpoints.load_variables(checkpoint, config)
  with atomic.atomic_dir(out) as tmp:
    checkpoints.save_variables(tmp, config, variables)
  return sum(int(v.size) for v in jax.tree.leaves(variables['params']))


def to_torch(checkpoint: str, config, out: str) -> int:
  """Our checkpoint -> upstream state_dict in `out` (.safetensors); returns #tensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  config, variables = checkpoints.load_variables(checkpoint, config)
  sd = segchange.export_torch_state_dict(config, variables)
  with atomic.atomic_path(out) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp)
  return len(sd)
