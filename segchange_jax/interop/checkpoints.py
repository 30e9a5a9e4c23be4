"""Reading and writing SegChange checkpoints of every kind, in one place.

- our training checkpoints (`train/checkpointing.Checkpointer`: `<dir>/{latest,best_f1,
  best_iou}/<step>/{state,config,...}`): `find_step_dir` picks the step folder, `restore_tree`
  restores all or some top-level entries (params + model state, not the optimizer);
- variables folders (`variables/` + `config.json`, written by `save_variables`: convert_torch
  output, export bundles);
- upstream `.pth` files (through `torch_pickle` and the model's torch rules).
`load_variables` takes any of them; `load_checkpoint` also checks the variables fit the
config's model. Placing loaded arrays onto a (sharded) target tree is `interop/merge.py`.

Model cards (`CARD_FILE` + its rendering `CARD_MARKDOWN`, built by `train/model_card.py`) sit
in a training step folder's `CARD_ITEM/` (an item of the Orbax checkpoint), in a run's workdir
and in export bundles; `read_card` finds the one that belongs to any checkpoint path,
`write_card` writes both files and `render_card` is the markdown.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import segchange_jax
from segchange_jax import atomic
from segchange_jax import config_lib
from segchange_jax import paths
from segchange_jax.interop import pretrained
from segchange_jax.interop import torch_pickle
from segchange_jax.models import segchange
from segchange_jax.models import torch_rules

VARIABLES_DIR = 'variables'  # a variables folder: VARIABLES_DIR/ (Orbax) + CONFIG_FILE
CONFIG_FILE = 'config.json'
CARD_FILE = 'model_card.json'   # the model card (train/model_card.py builds it)
CARD_MARKDOWN = 'MODEL_CARD.md'  # the same card for people (render_card)
CARD_ITEM = 'model_card'         # the Orbax item of a training step folder holding both
CARD_SCHEMA = 'segchange_jax.model_card'
CARD_VERSION = 1


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


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
  """{'segchange_jax': version, 'git_commit', 'git_dirty'} (git fields None outside a checkout).

  The commit and dirty flag are those of the git checkout the package runs from (its parent
  folder holds `.git`); an installed package has none.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(segchange_jax.__file__)))
  commit = dirty = None
  if os.path.exists(os.path.join(root, '.git')):
    try:
      run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True,
                              timeout=30, check=True)
      commit = run(['git', 'rev-parse', 'HEAD']).stdout.strip() or None
      dirty = bool(run(['git', 'status', '--porcelain', '--untracked-files=no']).stdout.strip())
    except (OSError, subprocess.SubprocessError):
      commit = dirty = None
  return {'segchange_jax': segchange_jax.__version__, 'git_commit': commit, 'git_dirty': dirty}


def _fmt(v: Any) -> str:
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def _leak_summary(leaks: Any) -> str:
  if leaks is None:
    return 'not checked (dataset_info.json has no leak report)'
  if isinstance(leaks, dict) and 'num_leaks' in leaks:
    counts = ', '.join(f'{k} {v}' for k, v in (leaks.get('counts') or {}).items())
    return (f'{leaks["num_leaks"]} pair(s) found across splits{f" ({counts})" if counts else ""}'
            f', {leaks.get("num_dropped", 0)} dropped from train (on_leak={leaks.get("on_leak")})')
  return json.dumps(leaks)[:300]


def render_card(card: dict[str, Any]) -> str:
  """MODEL_CARD.md: the card's facts for a reader (the JSON next to it has everything)."""
  cfg, code, data = card.get('config') or {}, card.get('code') or {}, card.get('data') or {}
  ckpt, hw, tr = card.get('checkpoint') or {}, card.get('hardware') or {}, card.get('training')
  commit = code.get('git_commit')
  commit = (f'{commit[:12]}{" (uncommitted changes)" if code.get("git_dirty") else ""}'
            if commit else 'not a git checkout')
  lines = [f'# Model card: {cfg.get("name", "segchange_jax model")}', '',
           f'- code: segchange_jax {code.get("segchange_jax")}, git {commit}']
  if ckpt:
    lines.append(f'- checkpoint: {ckpt.get("kind")} at step {ckpt.get("step")}')
  model, text = cfg.get('model') or {}, cfg.get('text') or {}
  if model:
    lines.append(f'- model: backbone {model.get("backbone")}, {model.get("img_size")} px, '
                 f'{model.get("num_classes")} class(es); text {text.get("model")}')
  fp = data.get('fingerprint')
  if fp:
    sizes = ', '.join(f'{k} {v}' for k, v in fp.get('splits', {}).items())
    lines.append(f'- data: {data.get("shards_dir")} (sha256 {fp.get("sha256")}; {sizes})')
    lines.append(f'- split leaks: {_leak_summary(data.get("leaks"))}')
  if tr:
    lines.append(f'- training: seed {card.get("seed")}, step {tr.get("step")} of '
                 f'{tr.get("total_steps")}, wall time {tr.get("wall_time_s", 0.0):.0f} s')
  if hw:
    lines.append(f'- hardware: {hw.get("device_count")} x {hw.get("device_kind")} '
                 f'({hw.get("platform")}), {hw.get("process_count")} process(es)')
  export = card.get('export')
  if export:
    lines.append(f'- export: {export.get("format")} ({export.get("file")}), '
                 f'{export.get("size")} px, prompts {export.get("prompts")}')
  metrics = card.get('metrics') or {}
  if metrics:
    keys = ('f1', 'iou', 'precision', 'recall', 'kappa', 'oa', 'loss', 'num_examples')
    lines += ['', '| split | threshold | ' + ' | '.join(keys) + ' |',
              '|---' * (len(keys) + 2) + '|']
    for split, m in metrics.items():
      lines.append(f'| {split} | {_fmt(m.get("threshold"))} | '
                   + ' | '.join(_fmt(m.get(k, '-')) for k in keys) + ' |')
  lines += ['', f'Everything else (the full config, every metric): `{CARD_FILE}`.', '']
  return '\n'.join(lines)


def write_card(directory: str | os.PathLike, card: dict[str, Any]) -> None:
  """Writes CARD_FILE and CARD_MARKDOWN into `directory` (each under a temporary name)."""
  directory = paths.resolve(directory)
  atomic.write_text(directory / CARD_FILE, json.dumps(card, indent=1, default=float))
  atomic.write_text(directory / CARD_MARKDOWN, render_card(card))


def card_dir(path: str | os.PathLike) -> epath.Path | None:
  """The folder holding the model card of checkpoint `path` (which may not have one yet).

  A training checkpoint (anything `find_step_dir` accepts): its step folder's CARD_ITEM/;
  a variables folder (export bundle, convert_torch output) or a workdir: the folder itself.
  """
  path = paths.resolve(path)
  if (path / CARD_FILE).is_file() or (path / VARIABLES_DIR).is_dir():
    return path
  step_dir = find_step_dir(path) if path.is_dir() else None
  return step_dir / CARD_ITEM if step_dir is not None else None


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
  """The model card of checkpoint `path` (see `card_dir`), or None when it has none."""
  folder = card_dir(path)
  if folder is None or not (folder / CARD_FILE).is_file():
    return None
  try:
    return json.loads((folder / CARD_FILE).read_text())
  except ValueError as e:
    raise CheckpointError(f'{folder / CARD_FILE} is not valid JSON ({e}); the card is '
                          'damaged') from e


def metadata_tree(ckptr, path) -> Any:
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
    meta = metadata_tree(ckptr, path)
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


def save_variables(directory: str, config: ml_collections.ConfigDict, variables: dict) -> None:
  """Writes `variables/` (Orbax) and `config.json` under `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target):
    raise FileExistsError(f'{target} already exists; choose another --out or delete it')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, jax.tree.map(np.asarray, dict(variables)))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def _read_json_item(directory: str) -> dict:
  files = [f for f in glob.glob(os.path.join(directory, '**', '*'), recursive=True)
           if os.path.isfile(f)]
  for f in files:
    try:
      with open(f) as fh:
        return json.load(fh)
    except (ValueError, UnicodeDecodeError):
      continue
  raise FileNotFoundError(f'no JSON config found under {directory}')


def convert_torch_state_dict(config: ml_collections.ConfigDict, state_dict: dict,
                             source: str = 'checkpoint') -> dict:
  """An upstream state_dict -> our variables; a mismatch also names the backbone the file has.

  Every problem is listed in one `ConversionError` (models.segchange.load_torch_state_dict);
  a checkpoint of another variant additionally says which backbone it was trained with, so the
  fix is one config field away.
  """
  try:
    return segchange.load_torch_state_dict(config, state_dict, source=source)
  except torch_rules.ConversionError as e:
    state_dict = torch_rules.strip_prefixes(state_dict)
    backbone = {}
    for prefix in ('dual_encoder.encoder.backbone.', 'dual_encoder.encoder.'):
      backbone = backbone or {k.removeprefix(prefix): v for k, v in state_dict.items()
                              if k.startswith(prefix)}
    if not backbone:
      raise
    raise torch_rules.ConversionError(
        f'{e}\nIts backbone looks like {pretrained.describe(backbone)}; this config has '
        f'model.backbone={config.model.backbone!r}.') from None


def load_variables(path: str, config: ml_collections.ConfigDict | None = None
                   ) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) from an upstream .pth, a converted dir or a training checkpoint."""
  path = os.fspath(path)
  if os.path.isfile(path):
    if config is None:
      raise ValueError(f'{path} is a PyTorch checkpoint: pass config= (e.g. '
                       "config_lib.load_config('configs/dvcd.py')) describing its variant")
    return config, convert_torch_state_dict(config, torch_pickle.load(path), source=path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  if os.path.isdir(os.path.join(path, VARIABLES_DIR)):
    if config is None:
      with open(os.path.join(path, CONFIG_FILE)) as f:
        config = config_lib.config_from_dict(json.load(f))
    return config, restore_tree(os.path.join(path, VARIABLES_DIR))
  step_dir = find_step_dir(path)
  if step_dir is None:
    raise FileNotFoundError(
        f'{path} is not a checkpoint: expected a .pth file, a directory with {VARIABLES_DIR}/ and '
        f'{CONFIG_FILE} (convert_torch output) or a training checkpoints directory')
  if config is None:
    config = config_lib.config_from_dict(_read_json_item(os.path.join(step_dir, 'config')))
  state = restore_tree(step_dir / 'state', keys=('params', 'model_state'))
  variables = {'params': state['params'], **dict(state.get('model_state') or {})}
  return config, variables


def load_checkpoint(path: str, config=None):
  """(config, variables), checking the variables fit the config's model."""
  if not path or not os.path.exists(path):
    raise CheckpointError(f'--checkpoint {path!r} does not exist')
  try:
    config, variables = load_variables(path, config)
  except (FileNotFoundError, ValueError) as e:
    raise CheckpointError(f'--checkpoint {path}: {e}') from e
  want = segchange.variable_shapes(segchange.build_model(config))
  got_paths = {jax.tree_util.keystr(k): np.shape(v)
               for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want_paths = {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(want)}
  if got_paths != want_paths:
    diff = sorted(set(got_paths.items()) ^ set(want_paths.items()))[:3]
    raise CheckpointError(f'--checkpoint {path} does not fit the config\'s model (first '
                          f'differences (path, shape): {diff}); pass the --config it was trained '
                          'with')
  return config, variables
