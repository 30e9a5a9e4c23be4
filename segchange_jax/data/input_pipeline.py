"""Grain input pipeline over the ArrayRecord shards written by `data_prep.convert`.

Batches are dicts of numpy arrays for one process:
  image_a, image_b: float32 [b, H, W, 3], RGB / 255 then ImageNet mean/std;
  label: int32 [b, H, W], raw class values (K > 1) or (raw > 0) for num_classes == 1;
  prompt_index: int32 [b] row of the prompt-embedding table (`prompt_to_index`);
  mask: float32 [b], 1 for real examples, 0 for eval padding.
A record with an empty prompt uses config.data.prompt when '' is not in `prompt_to_index`.

With config.data.targets = 'prompts' (the records' per-prompt targets, `records.decode`) each
example asks several prompts, laid out like the model's logits [b, H, W, K]:
  label: uint8 [b, H, W, K], 0/1, slot k the mask of prompt_index[:, k] (uint8: evaluation
    asks every target prompt, which can be dozens of masks per example);
  prompt_index: int32 [b, K].
Training: K = config.data.prompts_per_example slots drawn from (seed, global position) alone
(`sample_prompts`): each slot is negative with probability config.data.negative_rate (a prompt
of the dataset's target_prompts the record does not carry, all-zero mask; a share
config.data.hard_negative_share of them sharing a word with a carried prompt), else one of the
record's own targets; the K masks share the example's crop and augmentation. Evaluation: K = P,
every prompt of dataset_info.json's target_prompts (sorted) on every example, so per-prompt
metrics are defined. A record without targets carries one: (its prompt, its label).

Sizes: records larger than config.data.image_size are randomly cropped (same window for A, B
and label) for training; evaluation always uses whole records, which must then all have one
size, a multiple of 32. Records smaller than image_size are an error (re-convert with --tile).
Training iterates forever over one global stream (epoch e = a permutation seeded by (seed, e),
remainder dropped) that the processes split batch by batch; every example's crop and
augmentation draw comes from (seed, global position). A run is therefore reproducible, its
batches are the same on any number of processes, and the iterator state {'step': t}
(get_state/set_state) resumes it exactly, also on another process count. Reading and
augmenting run on 2 * max(1, config.data.num_workers) threads; with
config.data.worker_processes = k > 0 they run in k grain worker processes instead (each with
those threads; worker w makes batches w, w + k, ...), for hosts with more cores than the GIL
lets threads use. The batches are the same either way: every draw depends on the position only.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable, Iterable

import grain.python as grain
import numpy as np

from segchange_jax import config_lib
from segchange_jax.data import augment
from segchange_jax.data import imagery
from segchange_jax.data import records

# Separate random streams for the epoch permutations, the per-example augmentations and the
# prompt-slot draws (config.data.targets='prompts').
_PERMUTATION_STREAM, _AUGMENT_STREAM, _TARGET_STREAM = 0, 1, 2
_ENDLESS = 2**40   # training steps; MapDataset.range needs an end
_MIN_SHM_BYTES = 1 << 16
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


def shard_paths(shards_dir: str, split_info: dict) -> list[str]:
  """Paths of the shards a split's dataset_info.json entry lists; a missing one is named."""
  paths = [os.path.join(shards_dir, n) for n in split_info['shards']]
  for p in paths:
    if not os.path.isfile(p):
      raise InputError(f'shard {p} listed in dataset_info.json is missing; re-run the conversion')
  return paths


def _split_info(config, split: str) -> tuple[dict, list[str]]:
  info = load_dataset_info(config.data.shards_dir)
  if split not in info['splits'] or not info['splits'][split]['num_examples']:
    have = {k: v['num_examples'] for k, v in info['splits'].items()}
    raise InputError(f'split {split!r} has no records in {config.data.shards_dir} (have {have}); '
                     'convert it with data_prep.convert --splits')
  s = info['splits'][split]
  paths = shard_paths(config.data.shards_dir, s)
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
    if any(side % config_lib.STRIDE for side in sizes[0]):
      raise InputError(f'split {split!r} records are {sizes[0]}, not a multiple of '
                       f'{config_lib.STRIDE} (the model stride); re-convert with --tile 512 '
                       '(or 256)')


def target_prompts(config, info: dict | None = None) -> list[str]:
  """Prompts every config.data.targets='prompts' example is asked in evaluation (dataset_info's
  target_prompts, sorted); one InputError naming the shards and the fix when it has none."""
  shards_dir = config.data.shards_dir
  info = load_dataset_info(shards_dir) if info is None else info
  names = list(info.get('target_prompts') or [])
  if not names:
    raise InputError(
        f"config.data.targets='prompts' trains on per-prompt targets, but "
        f'{os.path.join(shards_dir, "dataset_info.json")} lists no target_prompts (shards '
        'converted before targets existed, or a layout without them): re-convert with '
        'data_prep.convert from a layout that has targets (synthetic scenes: delete the shards '
        'and config.data.source_root, they are regenerated with targets), or set '
        "--config.data.targets=label")
  return sorted(names)


def prompt_table_info(config, info: dict) -> dict:
  """`info` whose 'prompts' also list the target prompts when config.data.targets='prompts', so
  that `prompts.dataset_table` embeds every prompt the batches can index."""
  if config.data.targets != 'prompts':
    return info
  names = list(info.get('prompts') or [])
  names += [p for p in target_prompts(config, info) if p not in set(names)]
  return {**info, 'prompts': names}


def _words(prompt: str) -> set[str]:
  return set(prompt.lower().replace('->', ' ').split())


def sample_prompts(rng: np.random.Generator, carried: list[str], vocabulary: list[str], k: int,
                   negative_rate: float, hard_share: float = 0.0) -> list[str]:
  """K prompts for one training example, in random slot order.

  The number of negatives (prompts of `vocabulary` not in `carried`) is Binomial(k,
  negative_rate); the rest are drawn from `carried` (the record's own targets) without
  replacement. A record carrying fewer targets than its positive slots gets negatives in the
  slots left over rather than a repeated target (a repeat teaches nothing new, a negative
  teaches the prompt to switch off); prompts repeat only when the vocabulary has fewer than K.
  With no negatives available every slot is a carried prompt; with nothing carried every slot
  is a negative.

  `hard_share`: the share of negative slots drawn from the hard negatives, those that share a
  word with a carried prompt ("demolished buildings" or "new roads" for a record carrying "new
  buildings"): the same kind in the other direction or the same direction of another kind,
  which the model can only reject by reading the whole prompt (Binomial draw; the rest, and any
  shortfall, from all negatives).
  """
  carried_set = set(carried)
  negatives = [p for p in vocabulary if p not in carried_set]
  if not carried and not negatives:
    raise InputError('an example carries no target and the dataset lists no target_prompts; '
                     "re-convert the data with targets or set --config.data.targets=label")
  n_neg = int(rng.binomial(k, negative_rate))
  if not carried:
    n_neg = k
  if not negatives:
    n_neg = 0
  if negatives and k - n_neg > len(carried):
    n_neg = k - len(carried)
  n_pos = k - n_neg
  pos = [carried[i] for i in rng.choice(len(carried), n_pos, replace=n_pos > len(carried))
         ] if n_pos else []
  neg = []
  if n_neg and hard_share > 0:
    words = set().union(*(_words(p) for p in carried)) if carried else set()
    hard = [p for p in negatives if _words(p) & words]
    n_hard = min(int(rng.binomial(n_neg, hard_share)), len(hard))
    neg = [hard[i] for i in rng.choice(len(hard), n_hard, replace=False)] if n_hard else []
    negatives = [p for p in negatives if p not in set(neg)] or negatives
    n_neg -= n_hard
  neg += [negatives[i] for i in rng.choice(len(negatives), n_neg, replace=n_neg > len(negatives))
          ] if n_neg else []
  slots = pos + neg
  return [slots[i] for i in rng.permutation(k)]


def _record_targets(ex: dict, default_prompt: str) -> dict[str, np.ndarray]:
  """{prompt: mask} of a decoded record; one without targets carries (prompt, label)."""
  if ex['targets']:
    return dict(ex['targets'])
  return {ex['prompt'] or default_prompt: ex['label']}


def _pack_bits(masks: list[np.ndarray | None], shape: tuple[int, int]) -> np.ndarray:
  """K masks (None = empty) -> one uint16 map, bit k set where mask k is non-zero.

  The augmentations move the label with nearest-neighbour warps and flips, which move each bit
  exactly as they would move that mask alone: one draw, one warp, K masks.
  """
  packed = np.zeros(shape, np.uint16)
  for k, m in enumerate(masks):
    if m is not None:
      packed |= (m > 0).astype(np.uint16) << k
  return packed


def _unpack_bits(packed: np.ndarray, k: int) -> np.ndarray:
  """[H, W] uint16 -> uint8 [H, W, k] of 0/1."""
  return ((packed[..., None] >> np.arange(k, dtype=np.uint16)) & 1).astype(np.uint8)


def _prompt_index(prompt: str, prompt_to_index: dict[str, int], default: str) -> int:
  if prompt in prompt_to_index:
    return prompt_to_index[prompt]
  if not prompt and default in prompt_to_index:
    return prompt_to_index[default]
  raise InputError(f'prompt {prompt!r} is not in the prompt table ({len(prompt_to_index)} '
                   'prompts); build prompt_to_index from dataset_info.json["prompts"]')


def _to_example(a, b, label, prompt, binary, prompt_to_index, default, mask=1.0) -> dict:
  label = (label > 0) if binary else label
  return {'image_a': imagery.normalize(a), 'image_b': imagery.normalize(b),
          'label': label.astype(np.int32),
          'prompt_index': np.int32(_prompt_index(prompt, prompt_to_index, default)),
          'mask': np.float32(mask)}


def _slot_masks(record: bytes, slots: Callable[[list[str]], list[str]], default_prompt: str
                ) -> tuple[dict, list[str], np.ndarray]:
  """A record's images, its K slot prompts and their masks packed (`_pack_bits`).

  Only the masks of the drawn prompts are decoded: a record may carry many targets.
  """
  raw = records.parse(record)
  ex = {'image_a': records.decode_png(raw['image_a'], 3),
        'image_b': records.decode_png(raw['image_b'], 3)}
  label = records.decode_png(raw['label'], 1)
  carried = dict(raw['targets']) or {raw['prompt'] or default_prompt: None}   # None: the label
  prompts = slots(list(carried))
  chosen = {p: (label if carried[p] is None else records.decode_png(carried[p], 1))
            for p in dict.fromkeys(prompts) if p in carried}
  records.check_targets(raw['file_name'], list(chosen), ex['image_a'].shape[:2],
                        [m.shape[:2] for m in chosen.values()])
  return ex, prompts, _pack_bits([chosen.get(p) for p in prompts], label.shape)


def _train_example(record: bytes, rng: np.random.Generator, size: int, augment_cfg: dict,
                   binary: bool, prompt_to_index: dict[str, int], default_prompt: str,
                   slots: Callable[[list[str]], list[str]] | None = None) -> dict:
  """Record bytes -> randomly cropped, augmented, normalised example.

  `slots`: None (the record's label and prompt), or a function of the prompts the record
  carries giving the K prompts to ask (a prompt it does not carry gets an empty mask).
  """
  if slots is None:
    ex = records.decode(record, targets=False)
    a, b, label = ex['image_a'], ex['image_b'], ex['label']
  else:
    ex, prompts, label = _slot_masks(record, slots, default_prompt)
    a, b = ex['image_a'], ex['image_b']
  h, w = label.shape
  if (h, w) != (size, size):
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    win = np.s_[y:y + size, x:x + size]
    a, b, label = (np.ascontiguousarray(v[win]) for v in (a, b, label))
  a, b, label = augment.augment_pair(a, b, label, rng, augment_cfg)
  if slots is not None:
    return {'image_a': imagery.normalize(a), 'image_b': imagery.normalize(b),
            'label': _unpack_bits(label, len(prompts)),
            'prompt_index': np.asarray([_prompt_index(p, prompt_to_index, default_prompt)
                                        for p in prompts], np.int32),
            'mask': np.float32(1.0)}
  return _to_example(a, b, label, ex['prompt'], binary, prompt_to_index, default_prompt)


class _GlobalOrder:
  """Global stream position -> record index: epoch e is a permutation seeded by (seed, e).

  Each epoch holds steps_per_epoch * B positions (the remainder of the permutation is dropped),
  so epoch boundaries fall on step boundaries whatever the number of processes.
  """

  def __init__(self, num_examples: int, epoch_len: int, seed: int, shuffle: bool):
    self.num_examples, self.epoch_len, self.seed, self.shuffle = (
        num_examples, epoch_len, seed, shuffle)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    # Grain pickles the dataset into its worker processes: locks do not pickle, and each
    # process rebuilds the permutations it needs.
    return {k: v for k, v in self.__dict__.items() if k not in ('_cache', '_lock')}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _cache={}, _lock=threading.Lock())

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:   # Grain reads with several threads
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch]).permutation(
            self.num_examples)
        self._cache = {e: v for e, v in self._cache.items() if e >= epoch - 1}
        self._cache[epoch] = perm
      return perm

  def __call__(self, position: int) -> int:
    epoch, offset = divmod(position, self.epoch_len)
    return int(self._permutation(epoch)[offset]) if self.shuffle else offset


class _SlotDraw:
  """A record's targets -> its K prompts, drawn from (seed, global position); picklable."""

  def __init__(self, seed: int, position: int, vocabulary: list[str], k: int, rate: float,
               hard_share: float = 0.0):
    self._rng = np.random.default_rng([seed, _TARGET_STREAM, position])
    self._vocabulary, self._k, self._rate, self._hard = vocabulary, k, rate, hard_share

  def __call__(self, carried: list[str]) -> list[str]:
    return sample_prompts(self._rng, carried, self._vocabulary, self._k, self._rate, self._hard)


class _TrainLoad:
  """Global stream position -> training example; picklable for grain's worker processes.

  `prompts`: None (train on the label), or (vocabulary, K, negative_rate, hard_share) for
  config.data.targets='prompts'. The slot draw has its own random stream, so the crop and
  augmentation of a position are the same in both modes.
  """

  def __init__(self, source, order: _GlobalOrder, seed: int, kwargs: dict,
               prompts: tuple[list[str], int, float, float] | None = None):
    self._source, self._order, self._seed, self._kwargs = source, order, seed, kwargs
    self._prompts = prompts

  def __call__(self, position: int) -> dict:
    rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, position])
    slots = None if self._prompts is None else _SlotDraw(self._seed, position, *self._prompts)
    return _train_example(self._source[self._order(position)], rng, slots=slots, **self._kwargs)


class _AtPosition:
  """This process's local element index -> load(global stream position); picklable."""

  def __init__(self, load: Callable[[int], dict], global_batch: int, local_batch: int,
               offset: int):
    self._load, self._global_batch, self._local_batch, self._offset = (
        load, global_batch, local_batch, offset)

  def __call__(self, i: int) -> dict:
    step, j = divmod(int(i), self._local_batch)
    return self._load(step * self._global_batch + self._offset + j)


def _own_arrays(batch: dict) -> dict:
  """A worker's batch copied out of shared memory into ordinary arrays.

  grain hands the arrays over as views of shared-memory blocks that are unlinked only when the
  view is collected; a private copy frees each block at once, so none outlives the iterator and
  the consumer (device transfer, checkpoint, tests) sees plain numpy arrays.
  """
  return {k: np.array(v) for k, v in batch.items()}


def _to_iter(ds: grain.MapDataset, read: grain.ReadOptions, worker_processes: int
             ) -> grain.IterDataset:
  """Reader threads, and with worker_processes > 0 that many processes, each with the threads.

  grain's mp_prefetch gives worker w of k the elements w, w + k, ... (here batches) and
  interleaves them round-robin, so the order is that of the thread path.
  """
  it = ds.to_iter_dataset(read)
  if worker_processes > 0:
    # Small arrays (prompt index, mask) travel pickled: a shared-memory block each costs more.
    it = grain.experimental.WithOptionsIterDataset(
        it, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES))
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_processes, per_worker_buffer_size=read.prefetch_buffer_size))
    it = it.map(_own_arrays)
  return it


class TrainIterator:
  """This process's training batches; checkpointable with a process-count independent state.

  Global step t covers global stream positions [t B, (t + 1) B); process p of P yields the
  positions [t B + p b, t B + (p + 1) b) with b = B / P. Every example's crop and augmentation
  draw from (seed, global position). The state is {'step': t} (JSON), so a checkpoint written
  by any number of processes resumes exactly on any other number.
  """

  def __init__(self, load: Callable[[int], dict], global_batch: int, process_index: int,
               process_count: int, num_threads: int, prefetch: int, worker_processes: int = 0):
    self._global_batch = global_batch
    self._local_batch = global_batch // process_count
    self._map = _AtPosition(load, global_batch, self._local_batch,
                            process_index * self._local_batch)
    self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._worker_processes = worker_processes
    self._it = None
    self.set_state({'step': 0})

  def set_state(self, state: dict) -> None:
    """Continues at global step state['step'] (what get_state returned, on any process count)."""
    if not isinstance(state, dict) or not isinstance(state.get('step'), int) or state['step'] < 0:
      raise InputError(f'training iterator state {state!r} is not {{"step": t}}; the checkpoint '
                       'was written by an older segchange_jax: restart training or set '
                       'config.init_from to it')
    self._step = state['step']
    # The stream restarts lazily at the next batch: a restore right after construction then
    # starts the worker processes once, not twice.
    self.close()

  def get_state(self) -> dict:
    return {'step': self._step}

  def close(self) -> None:
    """Stops the reader threads and worker processes; iterating again restarts them."""
    it, self._it = getattr(self, '_it', None), None   # also from __del__ of a failed __init__
    if it is not None:
      it.close()

  def _start(self):
    b = self._local_batch
    # Local element i <-> local batch i // b == global step; the range is endless in practice.
    ds = grain.MapDataset.range(self._step * b, _ENDLESS * b).map(self._map).batch(b)
    return iter(_to_iter(ds, self._read, self._worker_processes))

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self._step += 1
    return batch

  def __del__(self) -> None:
    self.close()


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


def _read_threads(config) -> int:
  """Reader threads: decoding (PNG, OpenCV) releases the GIL, so threads scale on one host."""
  return max(1, int(config.data.num_workers)) * 2


def _worker_processes(config) -> int:
  """grain worker processes (config.data.worker_processes); 0 keeps everything in this one."""
  return int(config.data.worker_processes)


def create_train_iterator(config, prompt_to_index: dict[str, int], process_index=None,
                          process_count=None) -> tuple[TrainIterator, int]:
  """Endless, checkpointable iterator of this process's training batches; steps per epoch."""
  process_index, process_count = _process(process_index, process_count)
  split = config.data.train_split
  s, paths = _split_info(config, split)
  size = config.data.image_size
  _check_sizes(s, size, split, train=True)
  batch = config.train.batch_size
  _per_process(batch, process_count, 'config.train.batch_size')
  n = s['num_examples']
  steps = n // batch
  if steps == 0:
    raise InputError(f'split {split!r} has {n} examples, fewer than one global batch '
                     f'(config.train.batch_size={batch})')
  seed = int(config.seed)
  order = _GlobalOrder(n, steps * batch, seed, bool(config.data.shuffle))
  source = grain.ArrayRecordDataSource(paths)
  kwargs = dict(size=size, augment_cfg=config.data.augment.to_dict(),
                binary=config.model.num_classes == 1, prompt_to_index=dict(prompt_to_index),
                default_prompt=config.data.prompt)

  prompts = None
  if config.data.targets == 'prompts':
    prompts = (target_prompts(config), int(config.data.prompts_per_example),
               float(config.data.negative_rate),
               float(config.data.get('hard_negative_share', 0.0)))
  load = _TrainLoad(source, order, seed, kwargs, prompts)
  it = TrainIterator(load, batch, process_index, process_count, _read_threads(config),
                     max(1, int(config.data.prefetch_buffer)), _worker_processes(config))
  return it, steps


class _EvalLoad:
  """This process's local eval element -> example, or mask-0 padding past the end; picklable."""

  def __init__(self, source, num_examples: int, global_batch: int, local_batch: int, offset: int,
               shape: tuple[int, int], binary: bool, prompt_to_index: dict[str, int],
               default_prompt: str, prompts: list[str] | None = None):
    self._source, self._n, self._global_batch, self._local_batch, self._offset = (
        source, num_examples, global_batch, local_batch, offset)
    self._shape, self._binary, self._table, self._default = (
        tuple(shape), binary, prompt_to_index, default_prompt)
    self._prompts = prompts   # config.data.targets='prompts': every target prompt, in order

  def __call__(self, i: int) -> dict:
    step, j = divmod(int(i), self._local_batch)
    g = step * self._global_batch + self._offset + j
    slots = () if self._prompts is None else (len(self._prompts),)
    if g >= self._n:
      zero = np.zeros((*self._shape, 3), np.uint8)
      return {'image_a': imagery.normalize(zero), 'image_b': imagery.normalize(zero),
              'label': np.zeros((*self._shape, *slots), np.uint8 if slots else np.int32),
              'prompt_index': np.zeros(slots, np.int32), 'mask': np.float32(0.0)}
    ex = records.decode(self._source[g], targets=self._prompts is not None)
    if self._prompts is None:
      return _to_example(ex['image_a'], ex['image_b'], ex['label'], ex['prompt'], self._binary,
                         self._table, self._default)
    targets = _record_targets(ex, self._default)
    label = np.zeros((*self._shape, len(self._prompts)), np.uint8)
    for k, p in enumerate(self._prompts):
      if p in targets:
        label[..., k] = targets[p] > 0
    return {'image_a': imagery.normalize(ex['image_a']),
            'image_b': imagery.normalize(ex['image_b']), 'label': label,
            'prompt_index': np.asarray([_prompt_index(p, self._table, self._default)
                                        for p in self._prompts], np.int32),
            'mask': np.float32(1.0)}


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
  prompts = target_prompts(config) if config.data.targets == 'prompts' else None
  load = _EvalLoad(grain.ArrayRecordDataSource(paths), n, batch_size, b, process_index * b,
                   (h, w), config.model.num_classes == 1, dict(prompt_to_index),
                   config.data.prompt, prompts)
  ds = grain.MapDataset.range(steps * b).map(load).batch(b)
  return _to_iter(ds, grain.ReadOptions(num_threads=_read_threads(config), prefetch_buffer_size=4),
                  _worker_processes(config))
