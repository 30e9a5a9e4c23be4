"""Orbax checkpoints: latest N, best-F1 and best-IoU; exact resume onto any mesh.

Layout under `directory` (usually <workdir>/checkpoints):
  latest/<step>/{state,data_iter,config,model_card}   the last config.checkpoint.keep saves
  best_f1/<step>/{state,data_iter,config,metrics,model_card}, best_iou/<step>/...   one each
`model_card/` holds the checkpoint's model card (`model_card.json` + `MODEL_CARD.md`,
train/model_card.py) when `save` is given one: an item of the same Orbax save, so it is
written with the checkpoint, asynchronously, and appears only when the step is complete.
Three managers rather than one with best_fn: a single orbax manager ranks by one metric, and we
keep the best of two metrics plus the most recent ones. A best checkpoint is only written when
its metric improves, so each eval costs at most the latest save plus the improved bests.

Saves are asynchronous when config.checkpoint.async_save: orbax copies the arrays to host memory
before `save` returns, so the caller may donate/overwrite the state right after; files are written
in the background. `wait()` (also called by `restore` and `close`) blocks until they are on disk.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from segchange_jax import paths
from segchange_jax.interop import checkpoints
from segchange_jax.train import model_card

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


class CardHandler(ocp.JsonCheckpointHandler):
  """Writes a model card item: its JSON and, beside it, the markdown rendering."""

  def __init__(self, **kwargs):
    super().__init__(checkpoints.CARD_FILE, **kwargs)

  async def _save_fn(self, x, directory):
    await super()._save_fn(x, directory)
    if jax.process_index() == 0:
      (directory / checkpoints.CARD_MARKDOWN).write_text(checkpoints.render_card(x))


@ocp.args.register_with_handler(CardHandler, for_save=True)
@dataclasses.dataclass
class CardSave(ocp.args.CheckpointArgs):
  """Orbax args of a model card item (a JSON dict)."""
  item: dict


@ocp.args.register_with_handler(CardHandler, for_restore=True)
@dataclasses.dataclass
class CardRestore(ocp.args.CheckpointArgs):
  """Orbax restore args of a model card item (cards are read as files: checkpoints.read_card)."""


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

  def _args(self, state, data_iter_state, metrics=None, card=None):
    items = {'state': ocp.args.StandardSave(state),
             'data_iter': ocp.args.JsonSave(_encode_iter_state(data_iter_state)),
             'config': ocp.args.JsonSave(self._config_json)}
    if metrics is not None:
      items['metrics'] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()
                                            if np.ndim(v) == 0})
    if card is not None:
      items[checkpoints.CARD_ITEM] = CardSave(card)
    return ocp.args.Composite(**items)

  def save(self, step: int, state, data_iter_state: Any = None,
           metrics: dict | None = None, card: dict | None = None) -> list[str]:
    """Saves the latest checkpoint, and best_f1 / best_iou where `metrics` improves them.

    `card`: the model card (train/model_card.build_card) saved with each of them, naming the
    kind and step of each. Returns the kinds written (e.g. ['latest', 'best_iou']).
    """
    step = int(step)
    written = []

    def card_of(kind):
      return None if card is None else model_card.for_checkpoint(card, kind, step)
    if self._managers['latest'].save(
        step, args=self._args(state, data_iter_state, card=card_of('latest')), force=True):
      written.append('latest')
    if metrics is not None and self._keep_best:
      for kind, best in self._best.items():
        value = float(metrics[_BEST_METRIC[kind]])
        if value > best:
          self._managers[kind].save(
              step, args=self._args(state, data_iter_state, metrics, card_of(kind)), force=True)
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

  def step_dir(self, kind: str, step: int):
    """The folder of the checkpoint `kind` at `step` (its model card: read_card(step_dir))."""
    return self.directory / kind / str(int(step))

  def wait(self) -> None:
    for mgr in self._managers.values():
      mgr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    for mgr in self._managers.values():
      mgr.close()


def restore_params(path: str, target_params: Any = None) -> Any:
  """The 'params' of a saved TrainState (for config.init_from).

  `path`: anything `interop.checkpoints.find_step_dir` accepts. With `target_params` the
  arrays take its shapes and shardings; without, they come back as host numpy arrays.
  """
  step_dir = checkpoints.find_step_dir(path)
  if step_dir is None:
    raise FileNotFoundError(
        f'init_from={os.fspath(path)!r} is not a segchange_jax checkpoint: expected a '
        'checkpoints dir with latest/ or best_iou/, a dir of numbered steps, or a step dir '
        'holding state/')
  state_dir = step_dir / 'state'
  if target_params is None:
    return checkpoints.restore_tree(state_dir, keys=('params',))['params']
  ckptr = ocp.StandardCheckpointer()
  abstract = dict(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               checkpoints.metadata_tree(ckptr, state_dir),
                               is_leaf=lambda x: hasattr(x, 'shape')))
  abstract['params'] = _abstract(target_params)
  return ckptr.restore(state_dir, abstract)['params']
