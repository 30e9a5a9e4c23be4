"""Rematerialisation (`config.model.remat`): trade backward-pass recompute for activation memory.

Applied per block: each Swin block, each BEV module, each per-scale difference block, the neck
and the mask head. Parameter names and values are unchanged (a remat-wrapped module keeps its
name), so checkpoints are interchangeable between policies.

- 'none': the backward pass reads every saved forward activation (fastest, most memory);
- 'dots': inside each block only matmul / conv outputs are saved; elementwise work (GELU,
  LayerNorm, softmax, masks) is recomputed in the backward pass (cheap, memory bound);
- 'block': only each block's inputs are saved; the whole block runs forward again in the
  backward pass (least memory, about one extra forward pass of compute).

On CPU the step must be compiled with `compiler_options(...)`: `jax.checkpoint` marks the
recomputation with an optimization barrier, which XLA:GPU keeps until after scheduling but
XLA:CPU removes early (its `cse_barrier_expander` pass runs before fusion and scheduling). After
that, CSE merges the recomputation back into the forward pass or the scheduler runs it long
before the backward pass needs it, and remat saves nothing (or even costs memory).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import flax.linen as nn
import jax

from segchange_jax.models import fields

_POLICIES = {'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
             'block': jax.checkpoint_policies.nothing_saveable}


def wrap(cls: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()) -> type[nn.Module]:
  """`cls`, or `nn.remat(cls)` with the named policy.

  static_argnums count `self` as 0 (flax convention): e.g. (2,) for `__call__(self, x, train)`.
  """
  if policy in (None, 'none'):
    return cls
  if policy not in _POLICIES:
    raise ValueError(f'config.model.remat={policy!r} is not one of {["none", *_POLICIES]}')
  return nn.remat(cls, policy=_POLICIES[policy], static_argnums=tuple(static_argnums))


def compiler_options(model_cfg, platform: str) -> dict[str, str]:
  """XLA options a train step needs so that `policy_of(model_cfg)` holds on `platform`."""
  if policy_of(model_cfg) == 'none' or platform != 'cpu':
    return {}
  # Keep passes the user disabled with XLA_FLAGS: this option replaces that list for the step.
  user = re.findall(r'--xla_disable_hlo_passes=(\S+)', os.environ.get('XLA_FLAGS', ''))
  return {'xla_disable_hlo_passes': ','.join([*user, 'cse_barrier_expander'])}


def policy_of(model_cfg) -> str:
  """config.model.remat, 'none' for configs saved before the field existed."""
  return fields.model_field(model_cfg, 'remat', 'none')
