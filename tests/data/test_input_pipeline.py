"""segchange_jax.data.input_pipeline: determinism, sharding, resume, eval padding, size checks."""

import hashlib
import multiprocessing
import os

import numpy as np
import pytest

from configs import base
from segchange_jax import config_lib
from segchange_jax.data import convert
from segchange_jax.data import imagery
from segchange_jax.data import input_pipeline as ip
from segchange_jax.data import records
from tests.data.conftest import data_config as _config


def _table(shards_dir):
  return {p: i for i, p in enumerate(ip.load_dataset_info(shards_dir)['prompts'])}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(x, y):
  for bx, by in zip(x, y):
    for k in bx:
      np.testing.assert_array_equal(bx[k], by[k])


def test_batch_format_and_determinism(shards):
  c = _config(shards)
  it, steps = ip.create_train_iterator(c, _table(shards), 0, 1)
  assert steps == 2
  batches = _take(it, 3)
  b = batches[0]
  assert b['image_a'].shape == (4, 64, 64, 3) and b['image_a'].dtype == np.float32
  assert b['label'].shape == (4, 64, 64) and b['label'].dtype == np.int32
  assert set(np.unique(b['label'])) <= {0, 1}
  assert b['prompt_index'].dtype == np.int32 and b['mask'].tolist() == [1.0] * 4
  assert abs(float(b['image_a'].mean())) < 2.0
  again, _ = ip.create_train_iterator(c, _table(shards), 0, 1)
  _assert_batches_equal(batches, _take(again, 3))
  with c.unlocked():
    c.seed = 7
  other, _ = ip.create_train_iterator(c, _table(shards), 0, 1)
  assert not np.array_equal(next(other)['image_a'], b['image_a'])


def _hashes(batches):
  return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
          for b in batches for x in b['image_b']]


def _by_hash(batches):
  """{sha1 of image_b: (image_a, image_b, label)} over every example of `batches`."""
  out = {}
  for b in batches:
    for i in range(len(b['image_b'])):
      key = hashlib.sha1(np.ascontiguousarray(b['image_b'][i]).tobytes()).hexdigest()
      out[key] = tuple(b[k][i] for k in ('image_a', 'image_b', 'label'))
  return out


@pytest.mark.parametrize('step', [0, 3])   # 2 steps per epoch: step 3 is in the second epoch
def test_any_process_count_yields_the_same_global_batch(shards, step):
  """Union over P processes of their batches at global step t: the same examples, same pixels
  (augmentation on), whatever P; set_state({'step': t}) jumps straight there."""
  c = _config(shards)
  table = _table(shards)
  single, _ = ip.create_train_iterator(c, table, 0, 1)
  reference = _take(single, step + 1)[step]
  want = _by_hash([reference])
  assert len(want) == 4
  for count in (2, 4):
    parts = []
    for p in range(count):
      it, _ = ip.create_train_iterator(c, table, p, count)
      it.set_state({'step': step})
      parts.append(next(it))
      assert it.get_state() == {'step': step + 1}
      assert parts[-1]['image_a'].shape[0] == 4 // count
    got = _by_hash(parts)
    assert got.keys() == want.keys()
    for key, arrays in got.items():
      for x, y in zip(arrays, want[key]):
        np.testing.assert_array_equal(x, y)
    # Process order is the global order: concatenating the parts gives the P = 1 batch.
    np.testing.assert_array_equal(np.concatenate([x['label'] for x in parts]), reference['label'])


def test_epochs_are_permutations_and_processes_disjoint(shards):
  c = _config(shards)
  with c.unlocked():
    c.data.augment.enabled = False
  table = _table(shards)
  seen = [_hashes(_take(ip.create_train_iterator(c, table, p, 2)[0], 2)) for p in range(2)]
  assert len(seen[0]) == len(seen[1]) == 4
  assert not set(seen[0]) & set(seen[1])
  info = ip.load_dataset_info(shards)
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  src = array_record_data_source.ArrayRecordDataSource(
      [os.path.join(shards, n) for n in info['splits']['train']['shards']])
  everything = _hashes([{'image_b': [imagery.normalize(records.decode(src[i])['image_b'])
                                     for i in range(len(src))]}])
  assert set(seen[0]) | set(seen[1]) == set(everything)
  epoch2 = _hashes(_take(ip.create_train_iterator(c, table, 0, 1)[0], 4)[2:])
  assert sorted(epoch2) == sorted(everything)      # the next epoch: every example once more
  assert epoch2 != seen[0] + seen[1]                 # ... in another order (reshuffled)
  with pytest.raises(ip.InputError, match='divisible'):
    ip.create_train_iterator(c, table, 0, 3)


def test_save_restore_mid_epoch(shards):
  c = _config(shards)
  with c.unlocked():
    c.train.batch_size = 2
  it, _ = ip.create_train_iterator(c, _table(shards), 0, 1)
  _take(it, 3)
  state = it.get_state()
  assert state == {'step': 3}
  expected = _take(it, 4)   # crosses the epoch boundary (4 steps per epoch)
  fresh, _ = ip.create_train_iterator(c, _table(shards), 0, 1)
  fresh.set_state(state)
  _assert_batches_equal(expected, _take(fresh, 4))
  with pytest.raises(ip.InputError, match='older segchange_jax'):
    fresh.set_state(b'grain-bytes')


@pytest.mark.slow
def test_reader_threads_do_not_change_batches(shards):
  """config.data.num_workers sets the reader threads; batches stay identical."""
  c = _config(shards)
  ref = _take(ip.create_train_iterator(c, _table(shards), 0, 1)[0], 4)
  with c.unlocked():
    c.data.num_workers = 3
  it, _ = ip.create_train_iterator(c, _table(shards), 0, 1)
  _assert_batches_equal(ref, _take(it, 4))


def test_eval_each_example_once_with_padding(tmp_path, helpers):
  raw = tmp_path / 'raw'
  pairs = helpers.write_folder(str(raw / 'val'), [f'e{i}.png' for i in range(5)])
  out = str(tmp_path / 'out')
  convert.convert('opencd', str(raw), out, ['val'])
  c = _config(out, image_size=32)
  per_proc = [list(ip.create_eval_iterator(c, 'val', {'': 0}, 2, p, 2)) for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == 3
  labels = []
  for step in range(3):
    for p in range(2):
      batch = per_proc[p][step]
      assert batch['label'].shape == (1, 32, 32)
      if batch['mask'][0]:
        labels.append(batch['label'][0])
  assert len(labels) == 5
  assert float(sum(b['mask'].sum() for proc in per_proc for b in proc)) == 5.0
  expected = [(pairs[f'e{i}.png'][2] > 0).astype(np.int32) for i in range(5)]
  # Order over (step, process) is the record order; records follow the sorted names.
  for got, want in zip(labels, expected):
    np.testing.assert_array_equal(got, want)


def test_size_and_label_checks(shards, tmp_path):
  c = _config(shards, image_size=128)
  with pytest.raises(ip.InputError, match='--tile 128'):
    ip.create_train_iterator(c, _table(shards), 0, 1)
  c = _config(shards, image_size=32)
  batch = next(ip.create_train_iterator(c, _table(shards), 0, 1)[0])
  assert batch['image_a'].shape == (4, 32, 32, 3)   # random paired crop
  c = _config(shards)
  with c.unlocked():
    c.model.num_classes = 2
  with pytest.raises(ip.InputError, match='label values'):
    ip.create_train_iterator(c, _table(shards), 0, 1)
  with pytest.raises(ip.InputError, match='data_prep.convert'):
    ip.load_dataset_info(str(tmp_path))
  with pytest.raises(ip.InputError, match='not in the prompt table'):
    next(ip.create_train_iterator(_config(shards), {'x': 0}, 0, 1)[0])


def _workers_alive() -> set[int]:
  """Live multiprocessing children of this process (grain's worker processes)."""
  return {p.pid for p in multiprocessing.active_children()}


def test_worker_processes_same_batches_and_exact_resume(shards):
  """config.data.worker_processes=2 decodes and augments in 2 grain processes: the same batches
  as the threads (across the epoch boundary), get_state/set_state resumes mid-stream, and
  rebuilding or closing the iterator stops its processes."""
  c = _config(shards)
  with c.unlocked():
    c.train.batch_size = 2        # 4 steps per epoch
  table = _table(shards)
  reference = _take(ip.create_train_iterator(c, table, 0, 1)[0], 6)
  before = _workers_alive()
  with c.unlocked():
    c.data.worker_processes = 2
  it, _ = ip.create_train_iterator(c, table, 0, 1)
  assert _workers_alive() == before          # started lazily, at the first batch
  first = _take(it, 3)
  workers = _workers_alive() - before
  assert len(workers) == 2
  state = it.get_state()
  assert state == {'step': 3}
  rest = _take(it, 3)
  _assert_batches_equal(reference, first + rest)
  assert all(type(x) is np.ndarray for b in first for x in b.values())   # not shared memory
  it.set_state(state)                        # rebuilds the stream: the old workers stop
  assert not workers & _workers_alive()
  _assert_batches_equal(reference[3:], _take(it, 3))
  it.close()
  assert _workers_alive() == before


def test_worker_processes_eval_matches_threads(tmp_path, helpers):
  raw = tmp_path / 'raw'
  helpers.write_folder(str(raw / 'val'), [f'e{i}.png' for i in range(5)])
  out = str(tmp_path / 'out')
  convert.convert('opencd', str(raw), out, ['val'])
  c = _config(out, image_size=32)
  want = list(ip.create_eval_iterator(c, 'val', {'': 0}, 2, 0, 1))
  with c.unlocked():
    c.data.worker_processes = 2
  got = list(ip.create_eval_iterator(c, 'val', {'': 0}, 2, 0, 1))
  assert len(got) == len(want) == 3
  _assert_batches_equal(want, got)


def test_worker_processes_must_be_a_count():
  c = base.get_config()
  with c.unlocked():
    c.data.worker_processes = -1
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.worker_processes=-1'):
    config_lib.validate_config(c)
