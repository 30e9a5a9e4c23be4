"""The training loop: data, prompt table, sharded state, steps, evaluation, checkpoints, logs.

Pure pieces live in train_step / losses / metrics / optim / sharding; this module only drives
them and does the I/O. Every process runs the same code; only process 0 writes logs.
"""

from __future__ import annotations

import collections
import functools
import json
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from segchange_jax import allocator
from segchange_jax import atomic
from segchange_jax import jax_compat
from segchange_jax import paths
from segchange_jax.data import fingerprint as fingerprint_lib
from segchange_jax.data import input_pipeline
from segchange_jax.data import shards
from segchange_jax.interop import checkpoints
from segchange_jax.models import segchange
from segchange_jax.text import prompts
from segchange_jax.train import checkpointing
from segchange_jax.train import compilation_cache
from segchange_jax.train import init_from
from segchange_jax.train import metrics as metrics_lib
from segchange_jax.train import mfu as mfu_lib
from segchange_jax.train import model_card
from segchange_jax.train import optim
from segchange_jax.train import param_groups
from segchange_jax.train import sharding
from segchange_jax.train import summary
from segchange_jax.train import train_step


class TrainingError(RuntimeError):
  """The data or the config cannot be trained on; the message says what to change."""


# Global batches placed on the mesh ahead of the step that consumes them: while step n runs,
# the host reads, augments and transfers batch n + 2.
DEVICE_PREFETCH = 2
LOSS_PARTS = ('ce', 'dice', 'focal', 'bcl')
# Step outputs that are pixel counts, summed exactly (metrics.add_counts), not as floats.
COUNT_KEYS = ('cm', 'prompt_cm', 'semantic_cm')


def _host_batch_to_global(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over ('data', 'fsdp')."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(batch[k]))
          for k in train_step.BATCH_KEYS}


class DevicePrefetch:
  """Batches of a host iterator, placed on the mesh `depth` batches ahead of their use.

  `next()` hands out the oldest placed batch; `fill()` (call it after dispatching the step)
  tops the queue up while the device works. `get_state()` is the host iterator's state after
  the last batch handed out, not after the ones waiting in the queue, so a checkpoint resumes
  at the first batch the model has not seen.
  """

  def __init__(self, host_iter, mesh, depth: int = DEVICE_PREFETCH, keep_host: bool = False):
    self._it, self._mesh, self._depth, self._keep_host = iter(host_iter), mesh, depth, keep_host
    self._state_fn = getattr(host_iter, 'get_state', None)
    self._state = self._state_fn() if self._state_fn else None
    self._queue: collections.deque = collections.deque()
    self._done = False
    self.host_seconds = 0.0   # time this host spent reading and placing batches

  def fill(self) -> None:
    start = time.perf_counter()
    while not self._done and len(self._queue) < self._depth:
      try:
        host = next(self._it)
      except StopIteration:
        self._done = True
        break
      placed = _host_batch_to_global(host, self._mesh)
      state = self._state_fn() if self._state_fn else None
      self._queue.append((placed, host if self._keep_host else None, state))
    self.host_seconds += time.perf_counter() - start

  def next(self) -> tuple[dict, dict | None]:
    """(global batch, host batch if keep_host); StopIteration when the iterator is spent."""
    if not self._queue:
      self.fill()
    if not self._queue:
      raise StopIteration
    placed, host, self._state = self._queue.popleft()
    return placed, host

  def get_state(self):
    return self._state


def _add_tree(total, increment):
  """Running sums on device: float leaves add, 'cm' counts add exactly (metrics.add_counts)."""
  out = {k: v + increment[k] for k, v in total.items() if k not in COUNT_KEYS}
  out.update({k: metrics_lib.add_counts(total[k], increment[k]) for k in COUNT_KEYS
              if k in total})
  return out


@jax.jit
def _zero_sums(example_out: dict) -> dict:
  """Zero running sums shaped like a step's outputs (cm as exact counts), placed like them."""
  zeros = {k: jnp.zeros_like(v, jnp.float32) for k, v in example_out.items()
           if k not in COUNT_KEYS}
  zeros.update({k: metrics_lib.zero_counts(jnp.shape(example_out[k])) for k in COUNT_KEYS
                if k in example_out})
  return zeros


@jax.jit
def _accumulate_train(sums: dict, out: dict) -> dict:
  """Adds one train step's outputs to the window sums (and a step count) on device."""
  keep = {k: out[k].astype(jnp.float32) for k in ('loss', *LOSS_PARTS, 'grad_norm')}
  keep['steps'] = jnp.ones((), jnp.float32)
  keep['cm'] = out['cm']
  if sums is None:
    sums = _zero_sums(keep)
  return _add_tree(sums, keep)


@jax.jit
def _accumulate_eval(sums: dict | None, out: dict) -> dict:
  """Adds one eval batch's sums to the split's running sums on device."""
  out = {k: (v if k in COUNT_KEYS else v.astype(jnp.float32)) for k, v in out.items()}
  return _add_tree(_zero_sums(out) if sums is None else sums, out)


@functools.partial(jax.jit, static_argnames='keep_cm')
def _reset(sums: dict, keep_cm: bool) -> dict:
  """Zeroes the window sums; the confusion-matrix counts too unless `keep_cm`."""
  out = jax.tree.map(jnp.zeros_like, sums)
  if keep_cm:
    out['cm'] = sums['cm']
  return out


def evaluate_split(eval_step, state, config, split: str, prompt_to_index, text_table, mesh,
                   batch_size: int, on_batch: Callable[[dict, Any], None] | None = None
                   ) -> dict[str, Any]:
  """Metrics over every example of `split` (each exactly once across hosts).

  Sums accumulate on device and are fetched once at the end. A step may also return
  'per_example' outputs (kept out of the sums); `on_batch(host_batch, per_example)` then
  receives them with this process's batch (segchange_jax.evaluate uses it), which fetches
  those per batch. A step's 'semantic_cm' (both dates' [C, C] semantic class counts,
  train/evaluation.SemanticPlan) adds metrics.sek's scores: 'sek', 'sek_kappa_n0',
  'sek_iou_change', 'sek_iou_no_change', 'sek_miou', 'sek_score' and the matrix
  'semantic_confusion'.
  """
  it = input_pipeline.create_eval_iterator(config, split, prompt_to_index, batch_size)
  batches = DevicePrefetch(it, mesh, keep_host=on_batch is not None)
  sums = None
  while True:
    try:
      batch, host = batches.next()
    except StopIteration:
      break
    out = dict(eval_step(state, batch, text_table))
    per_example = out.pop('per_example', None)
    sums = _accumulate_eval(sums, out)
    batches.fill()
    if on_batch is not None:
      on_batch(host, jax.device_get(per_example))
  if sums is None:
    raise TrainingError(f'split {split!r} has no examples')
  cm = metrics_lib.counts_to_host(sums.pop('cm'))
  prompt_cm = sums.pop('prompt_cm', None)
  semantic_cm = sums.pop('semantic_cm', None)
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  result = dict(metrics_lib.compute_metrics(cm))
  if prompt_cm is not None:   # config.data.targets='prompts': scores per target prompt
    result.update(metrics_lib.prompt_metrics(metrics_lib.counts_to_host(prompt_cm),
                                             input_pipeline.target_prompts(config)))
  if semantic_cm is not None:  # semantic change data: SeK of both dates' class maps
    semantic_cm = metrics_lib.counts_to_host(semantic_cm)
    result.update({k if k == 'sek' else f'sek_{k}': v
                   for k, v in metrics_lib.sek(semantic_cm).items()})
    result['semantic_confusion'] = semantic_cm.tolist()
  n = max(sums.get('n', 0.0), 1.0)
  result['loss'] = sums.get('loss_sum', 0.0) / n
  for part in LOSS_PARTS:
    if f'{part}_sum' in sums:
      result[part] = sums[f'{part}_sum'] / n
  result['num_examples'] = int(sums.get('n', 0))
  return result


def _all_agree_to_stop(local: bool) -> bool:
  """True on every process if any process was asked to stop (e.g. SIGTERM on one host).

  All processes must then save the same step and leave together; a process leaving alone
  would hang the others in their next collective. One tiny blocking all-gather: call it only
  where stop_check_due says so.
  """
  if jax.process_count() == 1:
    return bool(local)
  flags = multihost_utils.process_allgather(np.asarray(bool(local)))
  return bool(np.any(flags))


def stop_check_due(step: int, every: int, boundary: bool) -> bool:
  """Whether the processes agree on stopping after `step`.

  One process: after every step (no collective involved). Several: every `every` steps and at
  the loop's own boundaries (a log point, an evaluation, an epoch end, a save), where the host
  waits for the device anyway; every process reaches them at the same step, so they agree
  without a collective per step.
  """
  return jax.process_count() == 1 or boundary or step % every == 0


class _CompileThenAlign:
  """Compiles a jitted step at its first call; multi-process: waits for all, then runs.

  Compile times differ between hosts (a busy CPU, a compilation-cache miss on one host); CPU
  clusters (gloo) fail a collective whose participants arrive further apart than its timeout,
  and other backends would just idle. Aligning after compiling keeps the first collective
  together. `on_compiled(compiled)` runs once (e.g. to log XLA's cost analysis; no extra
  compile); `seconds` is the time spent compiling (and aligning), which the loop's step
  timings leave out.
  """

  def __init__(self, step_fn, name: str, timeout_s: int,
               on_compiled: Callable[[Any], None] | None = None):
    self._step_fn, self._name, self._timeout = step_fn, name, timeout_s
    self._on_compiled = on_compiled
    self._compiled = None
    self.seconds = 0.0

  def __call__(self, *args):
    if self._compiled is None:
      start = time.perf_counter()
      self._compiled = self._step_fn.lower(*args).compile()
      # A persistent-cache hit shows here as a short time.
      logging.info('%s traced and compiled in %.1f s', self._name,
                   time.perf_counter() - start)
      if self._on_compiled is not None:
        self._on_compiled(self._compiled)
      if jax.process_count() > 1:
        jax_compat.wait_at_barrier(f'segchange_{self._name}_compiled', self._timeout)
      self.seconds += time.perf_counter() - start
    return self._compiled(*args)


def log_model_cost(compiled, n_params: int, examples_per_device: int) -> float:
  """Logs the parameter count and the train step's FLOPs per example (returned).

  FLOPs come from XLA's cost analysis of the compiled per-device step (forward, backward and
  optimizer update, every op counted), divided by the examples one device processes per step.
  On CPU with glibc malloc and a working set above 1 GB, also warns how to preload a caching
  allocator (`segchange_jax.allocator`).
  """
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops = float(cost.get('flops', 0.0)) / max(examples_per_device, 1)
  logging.info('model: %d parameters (%.1f M); train step %.1f GFLOP per example (XLA cost '
               'analysis: forward + backward + update)', n_params, n_params / 1e6, flops / 1e9)
  memory = compiled.memory_analysis()
  advice = allocator.hint(getattr(memory, 'temp_size_in_bytes', 0), jax.default_backend())
  if advice:
    logging.warning('%s', advice)
  return flops


def _scalars(result: dict) -> dict[str, float]:
  return {k: float(v) for k, v in result.items() if np.ndim(v) == 0}


def train_and_evaluate(config, workdir: str,
                       should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
  """Trains per `config`, writing everything into `workdir`; returns the final test metrics.

  Every checkpoint carries a model card (train/model_card.py); `<workdir>/model_card.json` (+
  MODEL_CARD.md) is the card of the checkpoint scored on config.eval.split, with its metrics.
  """
  start_time = time.perf_counter()
  is_main = jax.process_index() == 0
  try:
    cache_dir = compilation_cache.enable(config.train.compilation_cache_dir)
  except NotADirectoryError as e:
    raise TrainingError(str(e)) from e
  if cache_dir is not None:
    logging.info('XLA compilation cache: %s', cache_dir)
  try:
    paths.check_writable(workdir, '--workdir')
  except ValueError as e:
    raise TrainingError(str(e)) from e
  workdir = paths.resolve(workdir)   # local or gs://
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(workdir / 'config.json', config.to_json_best_effort(indent=2))

  logging.info('run %r (config.name) in %s', config.name, workdir)
  shards_dir = shards.ensure_dataset(config)
  info = input_pipeline.load_dataset_info(shards_dir)
  shards.check_dataset_matches_config(info, config, shards_dir)
  table_np, prompt_to_index = prompts.dataset_table(
      config, input_pipeline.prompt_table_info(config, info))

  mesh = sharding.create_mesh(config)
  n_shards = mesh.shape['data'] * mesh.shape['fsdp']
  for field in ('train.batch_size', 'eval.batch_size'):
    size = config.train.batch_size if field == 'train.batch_size' else config.eval.batch_size
    if size % n_shards:
      raise TrainingError(f'config.{field}={size} must be a multiple of the {n_shards} devices '
                          "the batch is split over (mesh.data x mesh.fsdp); change the batch size")
  model = segchange.build_model(config)
  train_iter, steps_per_epoch = input_pipeline.create_train_iterator(config, prompt_to_index)
  if steps_per_epoch < 1:
    raise TrainingError(
        f'{shards_dir}: {info["splits"][config.data.train_split]["num_examples"]} training '
        f'examples are fewer than one batch of {config.train.batch_size}; lower '
        '--config.train.batch_size')
  total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
  size = config.data.image_size
  sample = {k: jax.ShapeDtypeStruct((config.train.batch_size, size, size, 3), jnp.float32)
            for k in ('image_a', 'image_b')}
  state, state_shardings = train_step.create_train_state(
      model, config, jax.random.PRNGKey(config.seed), sample, mesh,
      steps_per_epoch=steps_per_epoch, label_fn=param_groups.lr_label_fn(config),
      frozen_mask_fn=param_groups.frozen_mask_fn(config))
  text_table = jax.device_put(jnp.asarray(table_np), sharding.replicated(mesh))
  timeout = config.distributed.initialization_timeout
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  per_device = config.train.batch_size // n_shards
  cost = {}   # the compiled step's FLOPs per device and step (XLA's cost analysis)

  def on_compiled(compiled):
    cost['flops'] = log_model_cost(compiled, n_params, per_device) * per_device

  step_fn = _CompileThenAlign(
      train_step.make_train_step(model, config, mesh, state_shardings), 'train_step', timeout,
      on_compiled=on_compiled)
  eval_step = _CompileThenAlign(
      train_step.make_eval_step(model, config, mesh, state_shardings), 'eval_step', timeout)

  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', config)
  restored = ckpt.restore(state, state_shardings)
  wall_time_before = 0.0  # training wall time of the run's earlier processes (resumed runs)
  card_metrics: dict[str, dict] = {}  # the model card's metrics per split, as known so far
  if restored is not None:
    state, iter_state, step = restored
    if iter_state is not None:
      train_iter.set_state(iter_state)
    logging.info('resumed from step %d', step)
    previous = checkpoints.read_card(ckpt.step_dir('latest', step))
    if previous is not None:
      wall_time_before = float(previous['training']['wall_time_s'])
      card_metrics.update(previous['metrics'])
  elif config.init_from:
    params, model_state, report = init_from.load(config, state.params, state.model_state)
    state = state.replace(params=params, model_state=model_state)
    logging.info('init_from %s: loaded %d variables, skipped %d, %d checkpoint tensors unused',
                 report['path'], report['loaded'], len(report['skipped']), len(report['unused']))
    for line in report['skipped']:
      logging.info('  skipped %s', line)
    if is_main:
      atomic.write_text(workdir / 'init_from_report.json', json.dumps(report, indent=1))
    if config.model.pretrained:
      logging.info('config.init_from is set: config.model.pretrained=%r is not used',
                   config.model.pretrained)
  elif config.model.pretrained:
    from segchange_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
    params, model_state, report = pretrained.load(config, state.params, state.model_state)
    state = state.replace(params=params, model_state=model_state)
    logging.info('pretrained %s (%s, %s): loaded %d backbone tensors, skipped %d, %d unused: %s',
                 report['spec'], report['path'], report['layout'], report['loaded'],
                 len(report['skipped']), len(report['unused']), ', '.join(report['unused'][:6]))
    if is_main:
      atomic.write_text(workdir / 'pretrained_report.json', json.dumps(report, indent=1))

  config_json = json.loads(config.to_json_best_effort())
  card_facts = {
      'config': config_json, 'code': checkpoints.code_version(), 'shards_dir': str(shards_dir),
      'fingerprint': fingerprint_lib.fingerprint(shards_dir, info), 'leaks': info.get('leaks'),
      'seed': config.seed, 'total_steps': total_steps, 'steps_per_epoch': steps_per_epoch,
      'hardware_info': model_card.hardware()}

  def card(at_step: int) -> dict:
    return model_card.build_card(
        **card_facts, metrics=card_metrics, step=at_step,
        wall_time_s=wall_time_before + time.perf_counter() - start_time)

  writer = summary.MetricWriter(workdir)
  if restored is not None and writer.drop_after(restored[2]):
    logging.info('metrics.csv: dropped rows logged after step %d (they are redone)', restored[2])
  step = int(jax.device_get(state.step))
  progress = None
  if is_main and config.train.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=total_steps, initial=step, desc='train', unit='step', dynamic_ncols=True)
  peak = mfu_lib.peak_tflops(jax.devices()[0].device_kind, config.model.dtype)
  profile_start, profile_stop = (int(x) for x in config.train.profile_steps)
  profiling = False
  batches = DevicePrefetch(train_iter, mesh)
  # On device: sums over the log window (loss, its parts, grad norm, steps) and exact counts
  # of the epoch's training confusion matrix; fetched at log points and evaluations only.
  window = None
  productive_s = 0.0   # wall time spent in training steps (no compile, evaluation or saving)
  window_t, window_other_s = time.perf_counter(), 0.0
  compile_seen, input_seen = step_fn.seconds, batches.host_seconds
  val_result: dict[str, Any] = {}
  while step < total_steps:
    if is_main and step == profile_start and profile_stop > profile_start:
      jax.profiler.start_trace(str(workdir / 'tb'))
      profiling = True
    batch, _ = batches.next()
    state, out = step_fn(state, batch, text_table)
    window = _accumulate_train(window, out)
    batches.fill()   # the next batches travel while this step runs
    step += 1
    if profiling and step >= profile_stop:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      profiling = False
      logging.info('profile of steps %d-%d written to %s', profile_start + 1, step,
                   workdir / 'tb')
    logged = step % config.train.log_every_steps == 0 or step == total_steps
    if logged:
      sums = jax.device_get({k: v for k, v in window.items() if k != 'cm'})  # waits for `step`
      window = _reset(window, keep_cm=True)   # the cm counts the whole epoch
      now = time.perf_counter()
      compiled_s, compile_seen = step_fn.seconds - compile_seen, step_fn.seconds
      input_s, input_seen = batches.host_seconds - input_seen, batches.host_seconds
      elapsed = max(now - window_t - window_other_s - compiled_s, 1e-9)
      productive_s += elapsed
      n = max(float(sums['steps']), 1.0)
      step_time = elapsed / n
      lrs = optim.learning_rates(config, steps_per_epoch, step,
                                 float(jax.device_get(state.plateau['scale'])))
      scalars = {'loss': sums['loss'] / n, 'grad_norm': sums['grad_norm'] / n,
                 **{k: sums[k] / n for k in LOSS_PARTS},
                 'step_time_s': step_time,
                 'examples_per_s': config.train.batch_size / step_time,
                 'host_input_frac': min(input_s / elapsed, 1.0),
                 'goodput': productive_s / max(now - start_time, 1e-9),
                 **{f'lr_{k}': v for k, v in lrs.items()}}
      if cost.get('flops'):
        scalars.update(mfu_lib.throughput(cost['flops'], step_time, peak))
      writer.write(step, 'train', scalars)
      if progress is not None:
        progress.set_postfix(loss=f'{scalars["loss"]:.4f}', lr=f'{lrs.get("head", 0):.2e}',
                             ex_s=f'{scalars["examples_per_s"]:.1f}')
      window_t, window_other_s = time.perf_counter(), 0.0
    if progress is not None:
      progress.update(1)

    epoch_end = step % steps_per_epoch == 0
    epoch = step // steps_per_epoch
    do_eval = (epoch_end and epoch >= config.train.start_eval
               and epoch % config.train.eval_every_epochs == 0) or step == total_steps
    save_now = bool(config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0)
    boundary = do_eval or epoch_end or save_now or step == total_steps
    if boundary:
      # The evaluation or save below waits for the dispatched steps anyway; waiting here first
      # keeps their device time in the window's step time instead of in `other`.
      jax.block_until_ready(state)
    other_start = time.perf_counter()   # evaluation and saving are not step time
    if do_eval:
      val_result = evaluate_split(eval_step, state, config, config.data.val_split,
                                  prompt_to_index, text_table, mesh, config.eval.batch_size)
      val_result['epoch'] = epoch
      writer.write(step, 'val', _scalars(val_result))
      if window is not None:
        train_cm = metrics_lib.counts_to_host(window['cm'])
        writer.write(step, 'train_epoch', _scalars(metrics_lib.compute_metrics(train_cm)))
        window = _reset(window, keep_cm=False)
      if config.train.scheduler == 'plateau':
        state = state.replace(plateau=optim.plateau_update(
            state.plateau, val_result['loss'], patience=config.train.plateau_patience,
            factor=config.train.plateau_factor))
      logging.info('step %d epoch %d val: loss %.4f F1 %.4f IoU %.4f', step, epoch,
                   val_result['loss'], val_result['f1'], val_result['iou'])
      card_metrics[config.data.val_split] = model_card.split_metrics(
          val_result, config.eval.threshold, step)
    stop = (stop_check_due(step, config.train.stop_check_every, boundary or logged)
            and _all_agree_to_stop(should_stop()))
    if boundary or stop:
      ckpt.save(step, state, batches.get_state(), _scalars(val_result) if do_eval else None,
                card=card(step))
    window_other_s += time.perf_counter() - other_start
    if stop:
      if profiling:
        jax.profiler.stop_trace()
      logging.warning('stopping after step %d on request (checkpoint saved)', step)
      ckpt.close()
      writer.close()
      return {'stopped_at_step': step}
  if profiling:
    jax.profiler.stop_trace()
  if progress is not None:
    progress.close()
  ckpt.wait()

  # Final evaluation of the best-IoU checkpoint on the evaluation split.
  result = {}
  best = ckpt.restore(state, state_shardings, kind='best_iou') if config.checkpoint.keep_best \
      else None
  final_state = best[0] if best is not None else state
  if config.eval.split in info['splits']:
    result = evaluate_split(eval_step, final_state, config, config.eval.split, prompt_to_index,
                            text_table, mesh, config.eval.batch_size)
    result['checkpoint_step'] = best[2] if best is not None else step
    writer.write(step, config.eval.split, _scalars(result))
    if is_main:
      atomic.write_text(workdir / f'eval_{config.eval.split}.json',
                        json.dumps(result, indent=2, default=float))
      logging.info('%s: %s', config.eval.split, json.dumps(_scalars(result)))
      # The scored checkpoint's card gains the evaluation split's metrics, in its step folder
      # (so export and `evaluate --verify` see them) and as the workdir's card.
      kind = 'best_iou' if best is not None else 'latest'
      scored_dir = ckpt.step_dir(kind, result['checkpoint_step'])
      scored = checkpoints.read_card(scored_dir)
      if scored is not None:
        scored = model_card.with_metrics(scored, config.eval.split, model_card.split_metrics(
            result, config.eval.threshold, result['checkpoint_step']))
        checkpoints.write_card(scored_dir / checkpoints.CARD_ITEM, scored)
        checkpoints.write_card(workdir, scored)
  ckpt.close()
  writer.close()
  return result
