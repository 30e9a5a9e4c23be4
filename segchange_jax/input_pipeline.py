"""Grain input pipeline over the ArrayRecord shards written by `data_prep.convert`.

Batches are dicts of numpy arrays for one process:
  image_a, image_b: float32 [b, H, W, 3], RGB / 255 then ImageNet mean/std;
  label: int32 [b, H, W], raw class values (K > 1) or (raw > 0) for num_classes == 1;
  prompt_index: int32 [b] row of the prompt-embedding table (`prompt_to_index`);
  mask: float32 [b], 1 for real examples, 0 for eval padding.
A record with an empty prompt uses config.data.prompt when '' is not in `prompt_to_index`.

Sizes: records larger than config.data.image_size are randomly cropped (same window for A, B
and label) for training; evaluation always uses whole records, which must then all have one
size, a multiple of 32. Records smaller than image_size are an error (re-convert with --tile).
Training iterates forever (the sampler reshuffles at each epoch; batches flow across epoch
boundaries); every example's augmentation draw comes from (seed, global index), so a run is
reproducible and the iterator state (get_state/set_state) resumes it exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import grain.python as grain
import numpy as np

from segchange_jax import augment
from segchange_jax import records

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CONVERT_HINT = 'create it with `python -m data_prep.convert --layout ... --root RAW --out DIR`'


class InputError(ValueError):
  """The shards do not fit the config; the message names the field or file and the fix."""


def load_dataset_info(shards_dir: str) -> dict:
  """Reads `shards_dir/dataset_info.json` written by data_prep.convert."""
  path = os.path.join(shards_dir or '.', 'dataset_info.json')
  if not shards_dir or not os.path.isdir(shards_dir):
    raise InputError(f'shards folder {shards_dir!r} (config.data.shards_dir) does not exist; '
                     + _CONVERT_HINT)
  if not os.path.isfile(path):
    raise InputError(f'{path} is missing (conversion unfinished or not a shards folder); '
                     + _CONVERT_HINT)
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> float32 ImageNet-normalised."""
  return (image.astype(np.float32) * (1.0 / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def _split_info(config, split: str) -> tuple[dict, list[str]]:
  info = load_dataset_info(config.data.shards_dir)
  if split not in info['splits'] or not info['splits'][split]['num_examples']:
    have = {k: v['num_examples'] for k, v in info['splits'].items()}
    raise InputError(f'split {split!r} has no records in {config.data.shards_dir} (have {have}); '
                     'convert it with data_prep.convert --splits')
  s = info['splits'][split]
  paths = [os.path.join(config.data.shards_dir, n) for n in s['shards']]
  for p in paths:
    if not os.path.isfile(p):
      raise InputError(f'shard {p} listed in dataset_info.json is missing; re-run the conversion')
  num_classes = config.model.num_classes
  if num_classes > 1 and s['label_values'] and max(s['label_values']) >= num_classes:
    raise InputError(f'split {split!r} has label values {s["label_values"]} but '
                     f'config.model.num_classes={num_classes}; use num_classes=1 for binary '
                     '0/255 labels or remap the labels')
  return s, paths


def _check_sizes(s: dict, size: int, split: str, train: bool) -> None:
  sizes = [tuple(x) for x in s['image_sizes']]
  small = [x for x in sizes if x[0] < size or x[1] < size]
  if train and small:
    raise InputError(f'split {split!r} has records of size {small} smaller than '
                     f'config.data.image_size={size}; lower image_size or re-convert with '
                     f'--tile {size}')
  if not train:
    if len(sizes) != 1:
      raise InputError(f'split {split!r} mixes record sizes {sizes}; evaluation batches whole '
                       'records: re-convert with --tile')
    if sizes[0][0] % 32 or sizes[0][1] % 32:
      raise InputError(f'split {split!r} records are {sizes[0]}, not a multiple of 32 (the '
                       'model needs stride-32 maps); re-convert with --tile 512 (or 256)')


def _prompt_index(prompt: str, prompt_to_index: dict[str, int], default: str) -> int:
  if prompt in prompt_to_index:
    return prompt_to_index[prompt]
  if not prompt and default in prompt_to_index:
    return prompt_to_index[default]
  raise InputError(f'prompt {prompt!r} is not in the prompt table ({len(prompt_to_index)} '
                   'prompts); build prompt_to_index from dataset_info.json["prompts"]')


def _to_example(a, b, label, prompt, binary, prompt_to_index, default, mask=1.0) -> dict:
  label = (label > 0) if binary else label
  return {'image_a': normalize(a), 'image_b': normalize(b), 'label': label.astype(np.int32),
          'prompt_index': np.int32(_prompt_index(prompt, prompt_to_index, default)),
          'mask': np.float32(mask)}


class _TrainTransform(grain.RandomMapTransform):
  """Record bytes -> augmented, normalised example (picklable for Grain workers)."""

  def __init__(self, size: int, augment_cfg: dict, binary: bool,
               prompt_to_index: dict[str, int], default_prompt: str):
    self.size, self.augment_cfg, self.binary = size, augment_cfg, binary
    self.prompt_to_index, self.default_prompt = prompt_to_index, default_prompt

  def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
    ex = records.decode(element)
    a, b, label = ex['image_a'], ex['image_b'], ex['label']
    h, w = label.shape
    if (h, w) != (self.size, self.size):
      y = int(rng.integers(0, h - self.size + 1))
      x = int(rng.integers(0, w - self.size + 1))
      win = np.s_[y:y + self.size, x:x + self.size]
      a, b, label = (np.ascontiguousarray(v[win]) for v in (a, b, label))
    a, b, label = augment.augment_pair(a, b, label, rng, self.augment_cfg)
    return _to_example(a, b, label, ex['prompt'], self.binary, self.prompt_to_index,
                       self.default_prompt)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise InputError(f'process_index={process_index} not in [0, {process_count})')
  return process_index, process_count


def _per_process(batch_size: int, process_count: int, field: str) -> int:
  if batch_size % process_count:
    raise InputError(f'{field}={batch_size} is not divisible by the {process_count} processes')
  return batch_size // process_count


def create_train_iterator(config, prompt_to_index: dict[str, int], process_index=None,
                          process_count=None) -> tuple[Any, int]:
  """Infinite, checkpointable iterator of this process's training batches; steps per epoch."""
  process_index, process_count = _process(process_index, process_count)
  split = config.data.train_split
  s, paths = _split_info(config, split)
  size = config.data.image_size
  _check_sizes(s, size, split, train=True)
  b = _per_process(config.train.batch_size, process_count, 'config.train.batch_size')
  n = s['num_examples']
  steps = n // config.train.batch_size
  if steps == 0:
    raise InputError(f'split {split!r} has {n} examples, fewer than one global batch '
                     f'(config.train.batch_size={config.train.batch_size})')
  shard = grain.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.IndexSampler(n, shard_options=shard, shuffle=bool(config.data.shuffle),
                               num_epochs=None, seed=int(config.seed))
  transform = _TrainTransform(size, config.data.augment.to_dict(),
                              config.model.num_classes == 1, dict(prompt_to_index),
                              config.data.prompt)
  loader = grain.DataLoader(
      data_source=grain.ArrayRecordDataSource(paths), sampler=sampler,
      operations=[transform, grain.Batch(b, drop_remainder=True)],
      worker_count=int(config.data.num_workers),
      worker_buffer_size=int(config.data.prefetch_buffer))
  return iter(loader), steps


def create_eval_iterator(config, split: str, prompt_to_index: dict[str, int], batch_size: int,
                         process_index=None, process_count=None) -> Iterable[dict]:
  """Every example of `split` exactly once over all processes; padding has mask 0.

  `batch_size` is global. Step t covers global indexes [t B, (t + 1) B); process p takes the
  slice [t B + p b, t B + (p + 1) b). All processes yield the same number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  s, paths = _split_info(config, split)
  _check_sizes(s, config.data.image_size, split, train=False)
  b = _per_process(batch_size, process_count, 'eval batch_size')
  n = s['num_examples']
  steps = -(-n // batch_size)
  h, w = s['image_size']
  source = grain.ArrayRecordDataSource(paths)
  binary = config.model.num_classes == 1
  table, default = dict(prompt_to_index), config.data.prompt

  def load(i: int) -> dict:
    step, j = divmod(int(i), b)
    g = step * batch_size + process_index * b + j
    if g >= n:
      zero = np.zeros((h, w, 3), np.uint8)
      pad = {'image_a': normalize(zero), 'image_b': normalize(zero),
             'label': np.zeros((h, w), np.int32), 'prompt_index': np.int32(0),
             'mask': np.float32(0.0)}
      return pad
    ex = records.decode(source[g])
    return _to_example(ex['image_a'], ex['image_b'], ex['label'], ex['prompt'], binary, table,
                       default)

  ds = grain.MapDataset.range(steps * b).map(load).batch(b)
  threads = max(1, int(config.data.num_workers)) * 2
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))
