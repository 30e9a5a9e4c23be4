"""Tiny demo-family model, random checkpoint and synthetic dataset for eval/export/infer tests.

The variables are random draws on the shapes of `segchange.build_model(config)` (numpy, so no
jitted init has to compile, which takes ~15 s on 2 cores).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from segchange_jax import config_lib
from segchange_jax.interop import checkpoints
from segchange_jax.models import segchange

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZE = 64
TEXT_DIM = 32


def tiny_config(shards_dir: str = '', embeddings: str = ''):
  """configs/demo.py at 64 px with 32-dim text (prompt embeddings from `embeddings`)."""
  return config_lib.load_config(str(REPO / 'configs' / 'demo.py'), [
      f'data.image_size={SIZE}', f'model.img_size={SIZE}', f'text.dim={TEXT_DIM}',
      f'data.shards_dir={shards_dir}', f'text.embeddings={embeddings}', 'eval.batch_size=8',
      f'infer.window={SIZE}', 'infer.overlap=16'])


def random_variables(config, seed: int = 0, size: int = SIZE) -> dict:
  """Random variables with the model's tree and shapes (fan-in scaled kernels, random biases)."""
  shapes = segchange.variable_shapes(segchange.build_model(config), size)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name or 'scale' in name:
      # Norm scales stay 1 like flax's init: random scales make this untrained model so
      # ill-conditioned that batch size alone changes logits by ~1e-3.
      return np.ones(s.shape, np.float32)
    n = rng.standard_normal(s.shape).astype(np.float32)
    if 'bias' in name or 'mean' in name or len(s.shape) < 2:
      return (0.1 * n).astype(np.float32)
    return (0.5 * n / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def save_checkpoint(directory, config, seed: int = 0) -> dict:
  variables = random_variables(config, seed)
  checkpoints.save_variables(str(directory), config, variables)
  return variables


def write_embeddings(path, prompts, dim: int = TEXT_DIM, tokens: int = 8, seed: int = 0) -> str:
  """An .npz in the embed_prompts format (prompts, embeddings) with random embeddings."""
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((len(prompts), tokens, dim)).astype(np.float32)
  np.savez(path, prompts=np.asarray(list(prompts), dtype=str), embeddings=emb)
  return str(path)


def make_dataset(root, n: int = 30) -> tuple[str, str, dict]:
  """Synthetic 64 px scenes converted to shards; (shards_dir, embeddings npz, dataset_info)."""
  from segchange_jax.data import convert  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  synthetic.generate(str(root / 'raw'), n, SIZE, seed=0)
  info = convert.convert('segchange-default', str(root / 'raw'), str(root / 'shards'))
  prompts = sorted(set(info['prompts']) | {tiny_config().data.prompt})
  npz = write_embeddings(root / 'prompts.npz', prompts)
  return str(root / 'shards'), npz, info


def prompt_detector(root, prompts: list[str]):
  """(embeddings npz, ChangeDetector) of a random tiny model saved under `root`, with
  embeddings for `prompts` and 32 px windows (compiles in about half the time of 64 px)."""
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  npz = write_embeddings(root / 'p.npz', prompts)
  config = tiny_config(embeddings=npz)
  config.infer.window, config.infer.overlap = 32, 8
  save_checkpoint(root / 'ckpt', config)
  return npz, predictor.ChangeDetector.from_checkpoint(str(root / 'ckpt'))
