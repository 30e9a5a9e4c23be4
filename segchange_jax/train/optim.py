"""AdamW with two learning rates, frozen params, schedules and clipping (upstream's recipe).

Upstream: torch.optim.AdamW with two param groups, lr for params whose state_dict name does not
contain 'backbone' and lr_backbone for the rest, weight decay on all of them; StepLR stepped once
per epoch, or ReduceLROnPlateau on the validation loss.

optax.adamw is torch's AdamW: update = -lr (m_hat / (sqrt(v_hat) + eps) + wd p), with
m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t); torch's `p *= 1 - lr wd` before the Adam step is
the same decoupled decay of the old parameter. tests/train/test_optim.py checks it against torch.

The plateau schedule is data-dependent (validation loss), so it cannot be a function of the step
count. We keep a multiplicative `lr_scale` in the train state, applied to the updates inside the
step (the update is linear in lr, so scaling it equals scaling every group's lr), and
`plateau_update` (pure) changes it after each evaluation as torch's ReduceLROnPlateau does
(mode min, relative threshold 1e-4, no cooldown, min_lr 0). One difference: torch skips a
reduction that changes a group's lr by less than 1e-8; we always apply it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from segchange_jax.models import torch_rules

LabelFn = Callable[[tuple[str, ...]], str]

HEAD, BACKBONE, FROZEN = 'head', 'backbone', 'frozen'


def default_label_fn(names: tuple[str, ...]) -> str:
  """Upstream's rule: 'backbone' lr for a parameter whose name contains 'backbone'.

  A model whose Flax paths differ from its torch state_dict names (e.g. the HGNetv2 stem, which
  upstream names without 'backbone') should pass its own torch-name-based labeller.
  """
  return BACKBONE if any('backbone' in n for n in names) else HEAD


def param_labels(params: Any, label_fn: LabelFn = default_label_fn,
                 frozen_mask: Any = None) -> Any:
  """Pytree of 'head' / 'backbone' / 'frozen' labels matching `params`."""
  labels = jax.tree_util.tree_map_with_path(lambda p, _: label_fn(torch_rules.path_names(p)),
                                            params)
  if frozen_mask is not None:
    labels = jax.tree.map(lambda l, f: FROZEN if f else l, labels, frozen_mask)
  return labels


def make_schedule(config, base_lr: float, steps_per_epoch: int) -> optax.Schedule:
  """lr as a function of the optimizer step, from config.train.scheduler.

  step:    base * lr_gamma ** (epoch // lr_drop), epoch = step // steps_per_epoch (torch StepLR
           stepped after every epoch).
  cosine:  linear warmup from 0 over warmup_steps, then cosine to 0 at the last step.
  plateau: constant (the driver scales it through `plateau_update`).
  """
  t = config.train
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch={steps_per_epoch} must be >= 1 (is the training split '
                     'empty?)')
  if t.scheduler == 'step':
    return optax.exponential_decay(base_lr, transition_steps=steps_per_epoch * t.lr_drop,
                                   decay_rate=t.lr_gamma, staircase=True)
  if t.scheduler == 'cosine':
    total = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    warmup = min(t.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup,
                                              decay_steps=max(total, warmup + 1), end_value=0.0)
  if t.scheduler == 'plateau':
    return optax.constant_schedule(base_lr)
  raise ValueError(f'config.train.scheduler={t.scheduler!r} is not one of step, cosine, plateau')


def _adamw(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  t = config.train
  return optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)


def make_optimizer(config, params: Any, steps_per_epoch: int, frozen_mask: Any = None,
                   label_fn: LabelFn = default_label_fn) -> optax.GradientTransformation:
  """The full optimizer from config.train.

  Args:
    config: the full config (reads config.train.*).
    params: the 'params' pytree (arrays or ShapeDtypeStructs), only its structure is used.
    steps_per_epoch: optimizer steps per epoch (schedules are stated in epochs upstream).
    frozen_mask: optional bool pytree like params; True = never updated, no weight decay, and
      excluded from the clipping norm.
    label_fn: maps a parameter's path names to 'head' or 'backbone'.
  """
  t = config.train
  labels = param_labels(params, label_fn, frozen_mask)
  transforms = {
      HEAD: _adamw(config, make_schedule(config, t.lr, steps_per_epoch)),
      BACKBONE: _adamw(config, make_schedule(config, t.lr_backbone, steps_per_epoch)),
      FROZEN: optax.set_to_zero(),
  }
  chain = []
  if frozen_mask is not None:
    # Frozen grads must not count in the global norm used for clipping.
    chain.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if t.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(t.grad_clip_norm))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain)


def learning_rates(config, steps_per_epoch: int, step: int, lr_scale: float = 1.0) -> dict:
  """The lr of each group at optimizer step `step` (for logging)."""
  t = config.train
  return {HEAD: float(make_schedule(config, t.lr, steps_per_epoch)(step)) * lr_scale,
          BACKBONE: float(make_schedule(config, t.lr_backbone, steps_per_epoch)(step)) * lr_scale}


def init_plateau() -> dict[str, jax.Array]:
  """State of the plateau schedule: best val loss, epochs without improvement, lr scale."""
  return {'best': jnp.array(jnp.inf, jnp.float32), 'bad_epochs': jnp.array(0, jnp.int32),
          'scale': jnp.array(1.0, jnp.float32)}


def plateau_update(plateau: dict, val_loss, *, patience: int, factor: float,
                   threshold: float = 1e-4) -> dict:
  """torch ReduceLROnPlateau(mode='min', threshold_mode='rel') step on one validation loss."""
  val_loss = jnp.asarray(val_loss, jnp.float32)
  better = val_loss < plateau['best'] * (1.0 - threshold)
  best = jnp.where(better, val_loss, plateau['best'])
  bad = jnp.where(better, 0, plateau['bad_epochs'] + 1)
  reduce = bad > patience
  return {'best': best, 'bad_epochs': jnp.where(reduce, 0, bad).astype(jnp.int32),
          'scale': jnp.where(reduce, plateau['scale'] * factor, plateau['scale'])}
