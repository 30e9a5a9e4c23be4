"""Model cards: what a checkpoint is, what it was trained and scored on, and how.

A card is a JSON object (schema `SCHEMA`, version `VERSION`) built by `build_card`, a pure
function of the run's facts; the training loop writes one into every checkpoint step folder
(`train/checkpointing.py`, an item of the Orbax checkpoint, so saves stay atomic and async), the
card of the checkpoint scored on the evaluation split into the workdir, and `export` copies it
into bundles (`inference/bundle.py`, which adds the export settings). Reading, writing and the
markdown rendering are `interop/checkpoints.py` (`read_card`, `write_card`, `render_card`).

Fields:
- `schema`, `version`: this format (`VERSION` changes when a field changes meaning).
- `code`: {'segchange_jax': version, 'git_commit', 'git_dirty'} (`checkpoints.code_version`).
- `config`: the full config as JSON.
- `data`: {'shards_dir', 'fingerprint': `data.fingerprint.fingerprint(shards_dir)` ({'sha256',
  'splits': {split: examples}}), 'leaks': dataset_info.json's leak report or None}.
- `metrics`: {split: {metric: value, ..., 'threshold', 'step'}} for the splits scored so far
  (val at each evaluation; the evaluation split in the final card).
- `seed`; `training`: {'step', 'total_steps', 'steps_per_epoch', 'wall_time_s'} (wall time of
  training so far, resumed runs included).
- `checkpoint`: {'kind': 'latest' | 'best_f1' | 'best_iou', 'step'}.
- `hardware`: {'platform', 'device_kind', 'device_count', 'process_count'}.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np

from segchange_jax.interop import checkpoints

SCHEMA = checkpoints.CARD_SCHEMA
VERSION = checkpoints.CARD_VERSION  # bump (in interop/checkpoints.py) when a field changes
# Keys of a split's metrics that describe the evaluation rather than measure the model.
CONTEXT_KEYS = ('threshold', 'step', 'epoch', 'checkpoint_step')


def hardware() -> dict[str, Any]:
  """The devices this process runs on (platform, device kind and count, process count)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'process_count': jax.process_count()}


def split_metrics(result: Mapping[str, Any], threshold: float, step: int) -> dict[str, Any]:
  """The scalar metrics of one split's evaluation, with the threshold and the step scored."""
  out = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
         for k, v in result.items() if np.ndim(v) == 0 and not isinstance(v, (str, bytes))
         and k not in CONTEXT_KEYS}
  out.update({'threshold': float(threshold), 'step': int(step)})
  return out


def build_card(*, config: Mapping[str, Any], code: Mapping[str, Any], shards_dir: str,
               fingerprint: Mapping[str, Any], leaks: Any, metrics: Mapping[str, Mapping],
               seed: int, step: int, total_steps: int, steps_per_epoch: int,
               wall_time_s: float, hardware_info: Mapping[str, Any],
               kind: str | None = None) -> dict[str, Any]:
  """The card (module docstring) of a checkpoint at `step` of kind `kind`; pure.

  `config`: the config as a JSON dict; `metrics`: {split: `split_metrics(...)`}.
  """
  return {
      'schema': SCHEMA, 'version': VERSION,
      'code': dict(code),
      'config': copy.deepcopy(dict(config)),
      'data': {'shards_dir': str(shards_dir), 'fingerprint': copy.deepcopy(dict(fingerprint)),
               'leaks': copy.deepcopy(leaks)},
      'metrics': {k: dict(v) for k, v in metrics.items()},
      'seed': int(seed),
      'training': {'step': int(step), 'total_steps': int(total_steps),
                   'steps_per_epoch': int(steps_per_epoch),
                   'wall_time_s': round(float(wall_time_s), 3)},
      'checkpoint': {'kind': kind, 'step': int(step)},
      'hardware': dict(hardware_info),
  }


def for_checkpoint(card: Mapping[str, Any], kind: str, step: int) -> dict[str, Any]:
  """`card` naming the checkpoint it is saved with (kind and step)."""
  out = copy.deepcopy(dict(card))
  out['checkpoint'] = {'kind': kind, 'step': int(step)}
  return out


def with_metrics(card: Mapping[str, Any], split: str, metrics: Mapping[str, Any]
                 ) -> dict[str, Any]:
  """`card` with `metrics` (from `split_metrics`) recorded for `split`."""
  out = copy.deepcopy(dict(card))
  out['metrics'] = {**out.get('metrics', {}), split: dict(metrics)}
  return out


def check_card(card: Any, source: str) -> dict[str, Any]:
  """`card` if it is a card of a version this code reads; else ValueError naming `source`."""
  if not isinstance(card, dict) or card.get('schema') != SCHEMA:
    raise ValueError(f'{source} is not a segchange_jax model card')
  if card.get('version') != VERSION:
    raise ValueError(f'{source} is a model card of version {card.get("version")} (written by '
                     f'segchange_jax {card.get("code", {}).get("segchange_jax")}); this code '
                     f'reads version {VERSION}')
  return card


# `evaluate --verify`: when the setup differs from the card's (other hardware, other or
# uncommitted code), every metric may move by this much (absolute) and still reproduce;
# num_examples must always be equal.
TOLERANCE = 1e-3


def same_setup(card: Mapping[str, Any], code: Mapping[str, Any],
               hardware_info: Mapping[str, Any]) -> list[str]:
  """Why `code` / `hardware_info` may not repeat `card`'s numbers bit for bit ([] = same).

  The code counts as the same when both name the same git commit with no uncommitted changes
  (and the same version); the hardware when platform, device kind and counts all match.
  """
  reasons = []
  was = card.get('code') or {}
  if (was.get('segchange_jax') != code.get('segchange_jax') or not was.get('git_commit')
      or was.get('git_commit') != code.get('git_commit')):
    reasons.append(f'code {was.get("segchange_jax")} @ {was.get("git_commit")} then, '
                   f'{code.get("segchange_jax")} @ {code.get("git_commit")} now')
  elif was.get('git_dirty') or code.get('git_dirty'):
    reasons.append('uncommitted changes in the code (then or now)')
  hw = dict(card.get('hardware') or {})
  if hw != dict(hardware_info):
    reasons.append(f'hardware {hw} then, {dict(hardware_info)} now')
  return reasons


def compare_metrics(card_metrics: Mapping[str, Any], now: Mapping[str, Any],
                    tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
  """One row per metric of `card_metrics` (context keys left out): {'metric', 'card', 'now',
  'exact', 'within'}; 'now' is None (and neither flag set) for a metric `now` lacks."""
  rows = []
  for key, want in card_metrics.items():
    if key in CONTEXT_KEYS or not isinstance(want, (int, float)):
      continue
    got = now.get(key)
    if got is None or np.ndim(got) != 0:
      rows.append({'metric': key, 'card': want, 'now': None, 'exact': False, 'within': False})
      continue
    got = int(got) if key == 'num_examples' else float(got)
    exact = got == want
    within = exact or (key != 'num_examples' and abs(got - want) <= tolerance)
    rows.append({'metric': key, 'card': want, 'now': got, 'exact': exact, 'within': within})
  return rows
