"""Inference API: load any SegChange checkpoint and predict change logits.

    det = ChangeDetector.from_checkpoint('best_iou.pth', config=load_config('configs/dvcd.py'))
    logits = det.predict_logits(image_a, image_b, text_embeddings)  # [B, H, W, K]

Checkpoints: an upstream PyTorch `.pth` (converted on the fly; needs `config`), a directory
written by `python -m segchange_jax.convert_torch` (`variables/` + `config.json`), or a training
checkpoint directory of `segchange_jax.train` (`state/` + `config/` under a step directory).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segchange_jax import config_lib
from segchange_jax import torch_pickle
from segchange_jax.models import segchange

VARIABLES_DIR = 'variables'
CONFIG_FILE = 'config.json'


# ---------------------------------------------------------------------------- config I/O


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """Base config updated with `values` (e.g. a saved config.json); validated."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()

  def update(node, vals, prefix):
    for key, value in vals.items():
      dotted = f'{prefix}{key}'
      if key not in node:
        raise config_lib.ConfigError(f'saved config has field {dotted!r}, which this version of '
                                     'segchange_jax does not know; update segchange_jax')
      if isinstance(node[key], ml_collections.ConfigDict):
        update(node[key], value, dotted + '.')
      else:
        if isinstance(node[key], tuple) and isinstance(value, list):
          value = tuple(value)
        if dotted == 'model.pretrained' and isinstance(value, bool):
          # Runs saved before `pretrained` was implemented: the flag was read by nothing and
          # every backbone started from random weights.
          value = ''
        with node.unlocked():
          node[key] = value

  update(config, values, '')
  return config_lib.validate_config(config)


def save_variables(directory: str, config: ml_collections.ConfigDict, variables: dict) -> None:
  """Writes `variables/` (Orbax) and `config.json` under `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
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


def _restore_tree(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)  # Orbax refuses relative paths (`--checkpoint runs/x/checkpoints`)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  meta = getattr(meta, 'tree', meta)
  # jax.devices()[0] belongs to process 0; in a multi-process run use one of ours.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          meta, is_leaf=lambda x: hasattr(x, 'shape'))
  return jax.tree.map(np.asarray, ckptr.restore(path, abstract))


def _training_step_dir(path: str) -> str | None:
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  for sub in ('best_iou', 'best_f1', 'latest'):
    if os.path.isdir(os.path.join(path, sub)):
      return _training_step_dir(os.path.join(path, sub))
  steps = [int(d) for d in os.listdir(path) if d.isdigit()]
  return os.path.join(path, str(max(steps))) if steps else None


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


def load_variables(path: str, config: ml_collections.ConfigDict | None = None
                   ) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) from an upstream .pth, a converted dir or a training checkpoint."""
  path = os.fspath(path)
  if os.path.isfile(path):
    if config is None:
      raise ValueError(f'{path} is a PyTorch checkpoint: pass config= (e.g. '
                       "config_lib.load_config('configs/dvcd.py')) describing its variant")
    sd = torch_pickle.load(path)
    return config, segchange.load_torch_state_dict(config, sd, source=path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  if os.path.isdir(os.path.join(path, VARIABLES_DIR)):
    if config is None:
      with open(os.path.join(path, CONFIG_FILE)) as f:
        config = config_from_dict(json.load(f))
    return config, _restore_tree(os.path.join(path, VARIABLES_DIR))
  step_dir = _training_step_dir(path)
  if step_dir is None:
    raise FileNotFoundError(
        f'{path} is not a checkpoint: expected a .pth file, a directory with {VARIABLES_DIR}/ and '
        f'{CONFIG_FILE} (convert_torch output) or a training checkpoints directory')
  if config is None:
    config = config_from_dict(_read_json_item(os.path.join(step_dir, 'config')))
  state = _restore_tree(os.path.join(step_dir, 'state'))
  variables = {'params': state['params'], **dict(state.get('model_state') or {})}
  return config, variables


# ------------------------------------------------------------------------------- predictor


class ChangeDetector:
  """A loaded model with a jitted forward pass (compiled once per input shape)."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict):
    self.config = config
    self.model = segchange.build_model(config)
    self.variables = jax.tree.map(jnp.asarray, variables)
    self._forward = jax.jit(lambda v, a, b, t: self.model.apply(v, a, b, t, train=False))

  @classmethod
  def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict | None = None
                      ) -> 'ChangeDetector':
    return cls(*load_variables(path, config))

  def predict_logits(self, image_a: Any, image_b: Any, text_embeddings: Any) -> np.ndarray:
    """Logits [B, H, W, K] for ImageNet-normalised NHWC float images (H, W multiples of 32).

    A single image [H, W, 3] and text [T, L] are accepted too (batch of one).
    """
    a, b = np.asarray(image_a, np.float32), np.asarray(image_b, np.float32)
    t = np.asarray(text_embeddings, np.float32)
    single = a.ndim == 3
    if single:
      a, b = a[None], b[None]
    if t.ndim == 2:
      t = np.broadcast_to(t[None], (a.shape[0], *t.shape))
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape != b.shape:
      raise ValueError(f'images must both be [B, H, W, 3] (got {a.shape} and {b.shape})')
    if a.shape[1] % 32 or a.shape[2] % 32:
      raise ValueError(f'image size {a.shape[1:3]} must be a multiple of 32 (pad or crop)')
    if t.shape[0] != a.shape[0] or t.shape[-1] != self.config.text.dim:
      raise ValueError(f'text embeddings {t.shape} must be [B={a.shape[0]}, T, '
                       f'{self.config.text.dim}] (config text.dim)')
    out = np.asarray(self._forward(self.variables, a, b, t))
    return out[0] if single else out
