"""Config overrides for tiny runs on the `dataset` fixture (defined in tests/conftest.py)."""

import pathlib

PROMPTS_DIM = 16  # the width of the `dataset` fixture's prompt embeddings


def tiny_overrides(dataset: pathlib.Path, **overrides) -> list[str]:
  """`field=value` overrides turning configs/demo.py into a 64 px run on `dataset`."""
  over = {
      'data.shards_dir': str(dataset / 'shards'), 'data.source_root': '',
      'data.synthetic.n': 0, 'data.image_size': 64, 'model.img_size': 64,
      'text.embeddings': str(dataset / 'emb.npz'), 'text.dim': PROMPTS_DIM,
      'train.batch_size': 8, 'train.scheduler': 'step', 'train.epochs': 4,
      'train.progress_bar': False, 'train.log_every_steps': 1, 'eval.batch_size': 8,
      'data.augment.enabled': False, 'checkpoint.async_save': False,
  }
  over.update(overrides)
  return [f'{k}={v}' for k, v in over.items()]
