"""Train state, sharded initialisation and the jitted train / eval steps.

The model contract: `model.apply(variables, image_a, image_b, text_emb, train=bool,
rngs={'dropout': key}, mutable=[...])` returns logits [B,H,W,K]. Variables: 'params' (trained),
'batch_stats' (BatchNorm running stats, updated in training), any other collection (e.g.
'frozen') is carried unchanged in `model_state`.

Batches are dicts: 'image_a', 'image_b' float32 [b,H,W,3], 'label' int32 [b,H,W],
'prompt_index' int32 [b], 'mask' float32 [b] (0 = padding). Prompt embeddings live in a device
table [P, T, L] indexed inside the step, so the text encoder never runs in the step.
With config.data.targets='prompts' a batch holds K prompt slots per example: 'prompt_index'
[b,K] gathers text [b,K,T,L], the model answers all K in one pass with logits [b,H,W,K], and
'label' [b,H,W,K] holds each slot's mask; losses average the slots (losses.slot_losses), the
confusion matrix pools them and evaluation also counts per prompt ('prompt_cm').

Under jit with the batch split over ('data', 'fsdp'), BatchNorm's batch mean/var are means over
the global batch (XLA inserts the all-reduce), i.e. synchronised BatchNorm, not per-device stats.
config.train.grad_reduction='flat' runs the forward and backward pass per device and sums the
gradients as one flat vector (`_apply_per_device`); the default 'per_param' leaves it to jit.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
from flax import struct
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import optax

from segchange_jax import jax_compat
from segchange_jax.models import norms
from segchange_jax.models import remat as remat_lib
from segchange_jax.train import losses
from segchange_jax.train import metrics
from segchange_jax.train import optim
from segchange_jax.train import sharding

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ('image_a', 'image_b', 'label', 'prompt_index', 'mask')


class TrainState(struct.PyTreeNode):
  """Everything a training run needs to continue exactly (the optimizer is static)."""
  step: jax.Array
  params: Any
  model_state: Any          # every non-'params' collection: batch_stats, frozen, ...
  opt_state: Any
  rng: jax.Array            # raw uint32 key; dropout keys are folded from it and the step
  plateau: dict             # optim.init_plateau(); plateau['scale'] multiplies every update
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def _sample_inputs(sample_batch_shapes: Mapping[str, Any], config):
  a = sample_batch_shapes['image_a']
  b = sample_batch_shapes['image_b']
  n = a.shape[0]
  emb = jax.ShapeDtypeStruct((n, config.text.max_tokens, config.text.dim), jnp.float32)
  as_zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  return as_zeros(a), as_zeros(b), as_zeros(emb)


def create_train_state(model, config, rng: jax.Array, sample_batch_shapes: Mapping[str, Any],
                       mesh: Mesh, *, steps_per_epoch: int,
                       label_fn: optim.LabelFn = optim.default_label_fn,
                       frozen_mask_fn: Callable[[Any], Any] | None = None
                       ) -> tuple[TrainState, Any]:
  """Initialises the train state directly in its sharded layout.

  Args:
    model: a linen module with the contract in the module docstring.
    config: the full config.
    rng: a raw PRNG key (jax.random.PRNGKey(config.seed)).
    sample_batch_shapes: {'image_a': ShapeDtypeStruct or array, 'image_b': ...} (only shapes used).
    mesh: from sharding.create_mesh.
    steps_per_epoch: optimizer steps per epoch (for epoch-based schedules).
    label_fn: parameter path names -> 'head' | 'backbone' learning rate.
    frozen_mask_fn: params pytree -> bool pytree of params never to update.

  Returns:
    (state, state_shardings): the state, placed; the NamedSharding pytree to jit steps with.
  """
  def init_variables(key):
    k_params, k_dropout = jax.random.split(key)
    a, b, emb = _sample_inputs(sample_batch_shapes, config)
    return model.init({'params': k_params, 'dropout': k_dropout}, a, b, emb, train=False)

  init_rng, state_rng = jax.random.split(rng)
  abstract_params = jax.eval_shape(init_variables, init_rng)['params']
  frozen_mask = frozen_mask_fn(abstract_params) if frozen_mask_fn else None
  tx = optim.make_optimizer(config, abstract_params, steps_per_epoch, frozen_mask, label_fn)

  def init_state(key):
    variables = dict(flax.core.unfreeze(init_variables(key)))
    params = variables.pop('params')
    return TrainState(step=jnp.array(0, jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), rng=state_rng, plateau=optim.init_plateau(),
                      tx=tx)

  state_shardings = sharding.param_shardings(jax.eval_shape(init_state, init_rng), mesh, config)
  state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
  return state, state_shardings


def _apply(model, params, model_state, image_a, image_b, emb, dropout_rng):
  """The model in training mode: (logits, batch_stats updates)."""
  logits, updates = model.apply({'params': params, **model_state}, image_a, image_b, emb,
                                train=True, rngs={'dropout': dropout_rng},
                                mutable=['batch_stats'])
  return logits, dict(updates)


def _apply_per_device(model, mesh: Mesh, unravel: Callable[[jax.Array], Any]):
  """`_apply` run on each device's rows under `jax.shard_map`, parameters as one flat vector.

  For config.train.grad_reduction='flat'. Differentiated, the per-device gradient of the flat
  vector is summed over the devices in ONE all-reduce (shard_map's transpose of a replicated
  input), where jit's automatic partitioning all-reduces each parameter's gradient at the
  operation that produces it. XLA combines those into one tuple instruction, which NCCL and
  TPUs run as one collective but XLA:CPU's gloo collectives run one array at a time (one TCP
  round trip per parameter: bench/README.md "Multi-host on CPU"). BatchNorm averages its
  statistics over the devices (norms.batch_axis), so they stay global; each device draws its
  own dropout masks (the step's key folded with the device index), so the masks differ from
  the automatic partitioning's while the arithmetic is the same.
  """
  axes = (sharding.DATA, sharding.FSDP)

  def local(flat, model_state, image_a, image_b, emb, dropout_rng):
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axes))
    with norms.batch_axis(axes):
      return _apply(model, unravel(flat), model_state, image_a, image_b, emb, dropout_rng)

  rows = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), rows, rows, rows, P()),
                       out_specs=(rows, P()), check_vma=False)


def _forward_loss(apply_fn, config, params, model_state, batch, text_table, dropout_rng):
  """Loss of one (micro)batch and what the step needs from the forward pass."""
  emb = jnp.take(text_table, batch['prompt_index'], axis=0)
  logits, updates = apply_fn(params, model_state, batch['image_a'], batch['image_b'], emb,
                             dropout_rng)
  total, parts = losses.total_loss(logits, batch['label'], batch['mask'], config.loss)
  return total, (parts, updates, logits)


def _grads(model, config, state: TrainState, batch: Batch, text_table: jax.Array,
           mesh: Mesh | None = None):
  """Gradients (microbatched when config.train.grad_accum_steps > 1), loss, parts, new stats, cm.

  Microbatch i holds examples i, i+accum, ... (a reshape that keeps each device's rows local).
  Microbatch gradients are combined weighted by their share of valid examples, which equals the
  full-batch gradient for per-pixel-mean losses (BCE/CE, focal); Dice and BCL are normalised
  over the whole (micro)batch and BatchNorm uses microbatch statistics, as in torch gradient
  accumulation. `mesh`: the step's mesh, needed by config.train.grad_reduction='flat'.
  """
  accum = config.train.grad_accum_steps
  threshold = config.train.threshold
  rng = jax.random.fold_in(state.rng, state.step)
  if config.train.grad_reduction == 'flat':   # make_train_step checked the mesh
    params, unravel = ravel_pytree(state.params)
    apply_fn = _apply_per_device(model, mesh, unravel)
  else:
    params, unravel = state.params, lambda g: g
    apply_fn = functools.partial(_apply, model)
  value_and_grad = jax.value_and_grad(
      lambda p, ms, mb, r: _forward_loss(apply_fn, config, p, ms, mb, text_table, r),
      has_aux=True)

  def grad_fn(*args):
    out, grads = value_and_grad(params, *args)
    return out, unravel(grads)

  if accum == 1:
    (total, (parts, updates, logits)), grads = grad_fn(state.model_state, batch, rng)
    model_state = {**state.model_state, **updates}
    cm = metrics.confusion_matrix(logits, batch['label'], batch['mask'], threshold=threshold)
    return grads, total, parts, model_state, cm

  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro = jax.tree.map(split, dict(batch))
  n_total = jnp.maximum(jnp.sum(batch['mask']), 1.0)

  def body(carry, xs):
    grads_acc, loss_acc, parts_acc, model_state, cm_acc = carry
    i, mb = xs
    (total, (parts, updates, logits)), grads = grad_fn(model_state, mb, jax.random.fold_in(rng, i))
    w = jnp.sum(mb['mask']) / n_total
    grads_acc = jax.tree.map(lambda g, a: a + w * g, grads, grads_acc)
    parts_acc = jax.tree.map(lambda p, a: a + w * p, parts, parts_acc)
    cm = metrics.confusion_matrix(logits, mb['label'], mb['mask'], threshold=threshold)
    return (grads_acc, loss_acc + w * total, parts_acc, {**model_state, **updates},
            cm_acc + cm), None

  num_classes = max(2, config.model.num_classes)
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  init = (zeros(state.params), jnp.zeros((), jnp.float32),
          {k: jnp.zeros((), jnp.float32) for k in ('ce', 'dice', 'focal', 'bcl')},
          state.model_state, jnp.zeros((num_classes, num_classes), jnp.int32))
  (grads, total, parts, model_state, cm), _ = jax.lax.scan(
      body, init, (jnp.arange(accum), micro))
  return grads, total, parts, model_state, cm


def make_train_step(model, config, mesh: Mesh, state_shardings: Any):
  """jit-compiled `train_step(state, batch, text_table) -> (state, metrics)`; donates the state.

  metrics: 'loss' (weighted total), 'ce', 'dice', 'focal', 'bcl', 'grad_norm' (before clipping),
  'lr_scale', 'cm' (int32 confusion-matrix increment, for train OA).
  """
  # Dropout masks: same bits, drawn without XLA:CPU's rolled threefry loop (jax_compat). Not
  # under remat: copied into every recomputed block, the unrolled form makes XLA's compile of
  # the step several times slower. Process-wide once set.
  if remat_lib.policy_of(config.model) == 'none':
    jax_compat.unroll_cpu_threefry()
  if config.train.grad_reduction == 'flat' and mesh.shape[sharding.FSDP] > 1:
    raise ValueError(
        f"config.train.grad_reduction='flat' runs a data-parallel step (parameters replicated), "
        f'but the mesh splits parameters over fsdp={mesh.shape[sharding.FSDP]} devices; set '
        "config.mesh.fsdp=1 or config.train.grad_reduction='per_param'")
  micro = config.train.batch_size // config.train.grad_accum_steps
  if config.train.grad_reduction == 'flat' and micro % mesh.size:
    raise ValueError(
        f"config.train.grad_reduction='flat' runs each (micro)batch as equal rows per device, "
        f'but train.batch_size={config.train.batch_size} / train.grad_accum_steps='
        f'{config.train.grad_accum_steps} = {micro} rows do not split over {mesh.size} devices; '
        "make it a multiple of the device count or use grad_reduction='per_param'")
  def train_step(state: TrainState, batch: Batch, text_table: jax.Array):
    grads, total, parts, model_state, cm = _grads(model, config, state, batch, text_table, mesh)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    scale = state.plateau['scale']
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    out = {'loss': total, **parts, 'grad_norm': optax.global_norm(grads), 'lr_scale': scale,
           'cm': cm}
    return new_state, out

  rep = sharding.replicated(mesh)
  options = remat_lib.compiler_options(config.model, mesh.devices.flat[0].platform)
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,),
                 compiler_options=options or None)


def eval_outputs(model, config, variables: Mapping[str, Any], batch: Batch,
                 text_table: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  """Sums of one eval batch (as returned by make_eval_step's step) and the logits.

  Pure; shared by the training loop's eval step and `segchange_jax.evaluate`, so both score a
  split with the same code.
  """
  emb = jnp.take(text_table, batch['prompt_index'], axis=0)
  logits = model.apply(dict(variables), batch['image_a'], batch['image_b'], emb, train=False)
  total, parts = losses.total_loss(logits, batch['label'], batch['mask'], config.loss)
  n = jnp.sum(batch['mask'])
  out = {'cm': metrics.confusion_matrix(logits, batch['label'], batch['mask'],
                                        threshold=config.eval.threshold),
         'loss_sum': total * n, 'n': n}
  if batch['label'].ndim == logits.ndim == 4:   # prompt slots: slot k is prompt k of every example
    out['prompt_cm'] = metrics.slot_confusion_matrices(logits, batch['label'], batch['mask'],
                                                       threshold=config.eval.threshold)
  out.update({f'{k}_sum': v * n for k, v in parts.items()})
  return out, logits


def make_eval_step(model, config, mesh: Mesh, state_shardings: Any):
  """jit-compiled `eval_step(state, batch, text_table) -> sums` (running BatchNorm stats).

  Returns {'cm': int32 [C,C], 'loss_sum': loss x valid examples, 'n': valid examples,
  'ce_sum', 'dice_sum', 'focal_sum', 'bcl_sum'}: add over batches, divide by n on the host
  (upstream's val loss is the example-weighted mean of batch losses). Prompt-slot batches add
  'prompt_cm' int32 [P,2,2], the counts of each prompt.
  """
  def eval_step(state: TrainState, batch: Batch, text_table: jax.Array):
    variables = {'params': state.params, **state.model_state}
    return eval_outputs(model, config, variables, batch, text_table)[0]

  rep = sharding.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
                 out_shardings=rep)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch (global, single process) on the mesh, checking its keys."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f'batch lacks {missing}; a batch needs {list(BATCH_KEYS)}')
  return {k: jax.device_put(batch[k], sharding.batch_sharding(mesh)) for k in BATCH_KEYS}
