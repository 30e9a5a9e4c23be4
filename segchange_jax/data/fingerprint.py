"""A converted dataset's fingerprint: which data a model was trained and scored on.

The fingerprint is the SHA-256 of dataset_info.json (without the fields that change when the
same raw data is converted again: the conversion time and the absolute source path) and of
the shard index (every shard's name and size in bytes). It is cheap (no shard is read) and it
changes when splits, counts, skipped pairs, prompts, label values, tiling or any shard's bytes
count change. Model cards record it; `evaluate --verify` and `report` compare it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from segchange_jax.data import input_pipeline

# dataset_info.json fields that differ between two conversions of the same data.
VOLATILE = ('created', 'source_root')


def shard_index(shards_dir: str, info: dict) -> list[tuple[str, str, int]]:
  """(split, shard name, size in bytes) of every shard dataset_info.json lists, in order."""
  return [(split, os.path.basename(path), os.path.getsize(path))
          for split, s in sorted(info['splits'].items())
          for path in input_pipeline.shard_paths(shards_dir, s)]


def fingerprint(shards_dir: str, info: dict | None = None) -> dict[str, Any]:
  """{'sha256', 'splits': {split: num_examples}} of the converted dataset in `shards_dir`.

  `info`: its dataset_info.json when the caller has read it already.
  """
  if info is None:
    info = input_pipeline.load_dataset_info(shards_dir)
  stable = {k: v for k, v in info.items() if k not in VOLATILE}
  h = hashlib.sha256()
  h.update(json.dumps(stable, sort_keys=True, separators=(',', ':')).encode())
  for split, name, size in shard_index(shards_dir, info):
    h.update(f'\n{split}/{name}:{size}'.encode())
  return {'sha256': h.hexdigest(),
          'splits': {k: int(v['num_examples']) for k, v in sorted(info['splits'].items())}}
