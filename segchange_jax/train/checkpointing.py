"""Orbax checkpoints: latest N, best-F1 and best-IoU; exact resume onto any mesh.

Layout under `directory` (usually <workdir>/checkpoints):
  latest/<step>/{state,data_iter,config}   the last config.checkpoint.keep saves
  best_f1/<step>/{state,data_iter,config,metrics}, best_iou/<step>/...   one each
Three managers rather than one with best_fn: a single orbax manager ranks by one metric, and we
keep the best of two metrics plus the most recent ones. A best checkpoint is only written when
its metric improves, so each eval costs at most the latest save plus the improved bests.

Saves are asynchronous when config.checkpoint.async_save: orbax copies the arrays to host memory
before `save` returns, so the caller may donate/overwrite the state right after; files are written
in the background. `wait()` (also called by `restore` and `close`) blocks until they are on disk.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from segchange_jax import paths

KINDS = ('latest', 'best_f1', 'best_iou')
_BEST_METRIC = {'best_f1': 'f1', 'best_iou': 'iou'}


def _encode_iter_state(data_iter_state: Any) -> dict:
  """Grain iterator state (bytes, str or JSON-able dict) -> a JSON object."""
  if data_iter_state is None:
    return {'kind': 'none'}
  if isinstance(data_iter_state, (bytes, bytearray)):
    return {'kind': 'bytes', 'value': base64.b64encode(bytes(data_iter_state)).decode('ascii')}
  if isinstance(data_iter_state, str):
    return {'kind': 'str', 'value': data_iter_state}
  return {'kind': 'json', 'value': data_iter_state}


def _decode_iter_state(obj: dict) -> Any:
  kind = obj.get('kind')
  if kind == 'none':
    return None
  if kind == 'bytes':
    return base64.b64decode(obj['value'])
  return obj['value']


def _abstract(target: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with shardings) describing where each restored array must go."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        target)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      target, shardings)


class Checkpointer:
  """Saves and restores TrainState + data-iterator state + config JSON."""

  def __init__(self, directory: str, config):
    self.directory = paths.resolve(directory)   # local or gs://
    c = config.checkpoint
    self._config_json = json.loads(config.to_json_best_effort())
    self._keep_best = c.keep_best
    kinds = KINDS if c.keep_best else ('latest',)
    self._managers = {}
    for kind in kinds:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=c.keep if kind == 'latest' else 1, create=True,
          enable_async_checkpointing=c.async_save)
      self._managers[kind] = ocp.CheckpointManager(self.directory / kind, options=options)
    self._best = {kind: self._stored_best(kind) for kind in kinds if kind != 'latest'}

  def _stored_best(self, kind: str) -> float:
    """The metric of the stored best checkpoint (-inf if none), so a resumed run compares fairly."""
    mgr = self._managers[kind]
    step = mgr.latest_step()
    if step is None:
      return -np.inf
    restored = mgr.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
    return float(restored['metrics'][_BEST_METRIC[kind]])

  def _args(self, state, data_iter_state, metrics=None):
    items = {'state': ocp.args.StandardSave(state),
             'data_iter': ocp.args.JsonSave(_encode_iter_state(data_iter_state)),
             'config': ocp.args.JsonSave(self._config_json)}
    if metrics is not None:
      items['metrics'] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()
                                            if np.ndim(v) == 0})
    return ocp.args.Composite(**items)

  def save(self, step: int, state, data_iter_state: Any = None,
           metrics: dict | None = None) -> list[str]:
    """Saves the latest checkpoint, and best_f1 / best_iou where `metrics` improves them.

    Returns the kinds written (e.g. ['latest', 'best_iou']).
    """
    step = int(step)
    written = []
    if self._managers['latest'].save(step, args=self._args(state, data_iter_state), force=True):
      written.append('latest')
    if metrics is not None and self._keep_best:
      for kind, best in self._best.items():
        value = float(metrics[_BEST_METRIC[kind]])
        if value > best:
          self._managers[kind].save(step, args=self._args(state, data_iter_state, metrics),
                                    force=True)
          self._best[kind] = value
          written.append(kind)
    return written

  def steps(self, kind: str = 'latest') -> list[int]:
    return list(self._managers[kind].all_steps())

  def latest_step(self, kind: str = 'latest') -> int | None:
    return self._managers[kind].latest_step()

  def restore(self, target, shardings: Any = None, *, step: int | None = None,
              kind: str = 'latest') -> tuple[Any, Any, int] | None:
    """Restores (state, data_iter_state, step) onto `target`'s structure and shardings.

    Args:
      target: a TrainState (concrete or from jax.eval_shape) built for the current mesh; the
        restored arrays take its shapes and, unless `shardings` is given, its shardings. The
        saved run may have used a different number of devices.
      shardings: optional NamedSharding pytree for the state (from create_train_state).
      step: which step (default the latest of `kind`).
      kind: 'latest', 'best_f1' or 'best_iou'.

    Returns None when nothing has been saved yet.
    """
    self.wait()
    mgr = self._managers[kind]
    step = mgr.latest_step() if step is None else step
    if step is None:
      return None
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target, shardings)),
        data_iter=ocp.args.JsonRestore()))
    return restored['state'], _decode_iter_state(restored['data_iter']), int(step)

  def wait(self) -> None:
    for mgr in self._managers.values():
      mgr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    for mgr in self._managers.values():
      mgr.close()


class CheckpointError(ValueError):
  """A checkpoint cannot be read; the message names the path and what to do."""


def find_step_dir(path: str | os.PathLike) -> epath.Path | None:
  """The step directory (the one holding `state/`) that `path` designates, or None.

  `path`: a checkpoints root (prefers best_iou, then best_f1, then latest; a best_* folder
  stays empty until the first evaluation and is skipped), one of those folders (its highest
  step), or a step directory itself.
  """
  path = paths.resolve(path)
  if (path / 'state').is_dir():
    return path
  for sub in ('best_iou', 'best_f1', 'latest'):
    if (path / sub).is_dir():
      found = find_step_dir(path / sub)
      if found is not None:
        return found
  steps = [int(d.name) for d in path.iterdir() if d.name.isdigit()] if path.is_dir() else []
  return path / str(max(steps)) if steps else None


def _metadata_tree(ckptr, path) -> Any:
  # Orbax returns the tree under .item_metadata.tree or .tree depending on its version.
  meta = ckptr.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  return getattr(meta, 'tree', meta)


def restore_tree(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict:
  """Host numpy arrays of the Orbax tree at `path`; only its top-level `keys` when given.

  Restoring only `params` (+ model state) of a training checkpoint skips the optimizer
  state, which is twice the size of the parameters for AdamW.
  """
  path = os.path.abspath(os.fspath(path)) if not paths.is_remote(path) else os.fspath(path)
  try:
    ckptr = ocp.PyTreeCheckpointer()
    meta = _metadata_tree(ckptr, path)
    if keys is not None:
      meta = {k: meta[k] for k in keys if k in meta and meta[k] is not None}
    # jax.devices()[0] belongs to process 0; in a multi-process run use one of ours.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            meta, is_leaf=lambda x: hasattr(x, 'shape'))
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=keys is not None)
    return jax.tree.map(np.asarray, ckptr.restore(path, args=args))
  except Exception as e:  # Orbax / TensorStore raise many types for a damaged checkpoint
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise CheckpointError(f'checkpoint {path} cannot be read ({first}); it is incomplete or '
                          'corrupt: copy it again or use another step') from e


def restore_params(path: str, target_params: Any = None) -> Any:
  """The 'params' of a saved TrainState (for config.init_from).

  `path`: anything `find_step_dir` accepts. With `target_params` the arrays take its shapes
  and shardings; without, they come back as host numpy arrays.
  """
  step_dir = find_step_dir(path)
  if step_dir is None:
    raise FileNotFoundError(
        f'init_from={os.fspath(path)!r} is not a segchange_jax checkpoint: expected a '
        'checkpoints dir with latest/ or best_iou/, a dir of numbered steps, or a step dir '
        'holding state/')
  state_dir = step_dir / 'state'
  if target_params is None:
    return restore_tree(state_dir, keys=('params',))['params']
  ckptr = ocp.StandardCheckpointer()
  abstract = dict(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               _metadata_tree(ckptr, state_dir),
                               is_leaf=lambda x: hasattr(x, 'shape')))
  abstract['params'] = _abstract(target_params)
  return ckptr.restore(state_dir, abstract)['params']
