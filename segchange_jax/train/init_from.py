"""`config.init_from`: start training from an upstream .pth or one of our checkpoints.

Every variable whose path and shape match is loaded; the rest keep their fresh initialisation
(e.g. a new mask-head output layer when fine-tuning to another number of classes or a new text
dimension). The report says which were loaded, which were skipped and why, and which
checkpoint tensors went unused; the trainer logs it and writes it to the workdir.
"""

from __future__ import annotations

import os
from typing import Any

from segchange_jax.interop import checkpoints
from segchange_jax.interop import merge
from segchange_jax.interop import torch_pickle
from segchange_jax.models import segchange
from segchange_jax.models import torch_rules


def _source_variables(path: str, config) -> dict:
  if os.path.isfile(path):
    # An upstream checkpoint: map every tensor by name, leave shape checks to the merge.
    state_dict = torch_rules.strip_prefixes(torch_pickle.load(path))
    rules, aliases, ignore = segchange.torch_mapping(config)
    have = [r for r in rules if r.torch_key in state_dict]
    if not have:
      raise ValueError(f'init_from={path}: none of its tensors has an upstream SegChange name; '
                       'is it a SegChange-R1 checkpoint?')
    sd = {k: v for k, v in state_dict.items()
          if k in {r.torch_key for r in have} or k in aliases}
    return torch_rules.convert(sd, have, aliases=aliases, ignore=ignore, source=path)
  return checkpoints.load_variables(path)[1]


def load(config, params: Any, model_state: dict) -> tuple[Any, dict, dict[str, Any]]:
  """(params, model_state, report) with `config.init_from` loaded where it fits."""
  path = config.init_from
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.init_from={path!r} does not exist')
  source = {k: dict(v) for k, v in _source_variables(path, config).items()}
  target = {'params': params, **model_state}
  merged, report = merge.merge(target, source)
  params = merged.pop('params')
  report['path'] = os.path.abspath(path)
  return params, merged, report
