"""The training loop keeps the device busy: no host read between log points, batches placed
ahead, mid-epoch resume exact with them, stop agreement only at boundaries, profiles and
throughput columns. A toy model (tests/train/traincore_toy.py) keeps each run to seconds."""

import csv
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.train import checkpointing
from segchange_jax.train import loop
from segchange_jax.train import train_step
from tests.train.conftest import tiny_overrides
from tests.train.traincore_toy import ToyModel


@pytest.fixture
def toy_loop(monkeypatch):
  """The loop with the toy model on one CPU device (batch 2: 6 steps per 12-example epoch)."""
  real_mesh = loop.sharding.create_mesh
  monkeypatch.setattr(loop.sharding, 'create_mesh',
                      lambda config: real_mesh(config, jax.devices()[:1]))
  monkeypatch.setattr(loop.segchange, 'build_model', lambda config: ToyModel(use_bn=True))


def _config(repo_root, dataset, **overrides):
  over = {'train.batch_size': 2, 'eval.batch_size': 2, 'train.log_every_steps': 100,
          'train.start_eval': 100, 'checkpoint.keep_best': False,
          'train.compilation_cache_dir': '', **overrides}
  return config_lib.load_config(str(repo_root / 'configs/demo.py'),
                                tiny_overrides(dataset, **over))


def _rows(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.csv')) as f:
    return [r for r in csv.DictReader(f) if r['split'] == split]


def test_device_prefetch_state_is_that_of_the_batches_handed_out():
  class Counting:
    def __init__(self):
      self.i = 0

    def __iter__(self):
      return self

    def __next__(self):
      self.i += 1
      return {k: np.full((1, 1), self.i, np.float32) for k in train_step.BATCH_KEYS}

    def get_state(self):
      return {'step': self.i}

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  batches = loop.DevicePrefetch(Counting(), mesh, depth=2)
  assert batches.get_state() == {'step': 0}
  first, _ = batches.next()
  batches.fill()   # two more batches read and placed ahead
  assert float(first['label'][0, 0]) == 1
  assert batches.get_state() == {'step': 1}, 'a checkpoint must resume at batch 2, not 4'
  second, _ = batches.next()
  assert float(second['label'][0, 0]) == 2 and batches.get_state() == {'step': 2}


def test_stop_agreement_is_due_at_boundaries_only_on_several_processes(monkeypatch):
  assert all(loop.stop_check_due(s, 10, False) for s in range(1, 25))   # one process: always
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  due = [s for s in range(1, 25) if loop.stop_check_due(s, 10, boundary=(s == 7))]
  assert due == [7, 10, 20]


def _burn(x, n=60):
  return jax.lax.fori_loop(0, n, lambda i, v: jnp.tanh(v @ v), x)


def _slow_steps(monkeypatch, n: int = 60) -> float:
  """Makes every train step do extra device work (`_burn`); returns that work's time alone."""
  x = jnp.full((384, 384), 1e-3, jnp.float32)
  burn = jax.jit(functools.partial(_burn, n=n))
  burn(x).block_until_ready()
  start = time.perf_counter()
  burn(x).block_until_ready()
  burn_s = time.perf_counter() - start
  real_make = train_step.make_train_step

  def make(model, config, mesh, shardings):
    step = real_make(model, config, mesh, shardings)

    def slow(state, batch, table):
      new_state, out = step(state, batch, table)
      return new_state, {**out, 'burn': jnp.sum(_burn(x + 0.0 * out['loss'], n))}
    return jax.jit(slow, donate_argnums=(0,))

  monkeypatch.setattr(loop.train_step, 'make_train_step', make)
  return burn_s


def test_loop_does_not_wait_for_the_device_between_log_points(toy_loop, monkeypatch, repo_root,
                                                              dataset, tmp_path):
  """Each step does extra device work (`_burn`, timed alone first). Between log points the host
  must dispatch steps as fast as it can place their batches, not one per finished step: a loop
  reading a value back (float(loss), device_get(cm)) after each step dispatches at most one
  step per burn time. (A host callback would time the device directly, but it makes XLA:CPU
  run the whole step synchronously.)"""
  burn_s = _slow_steps(monkeypatch)
  dispatched = []
  real_accumulate = loop._accumulate_train  # pylint: disable=protected-access

  def accumulate(window, out):
    dispatched.append(time.perf_counter())   # right after step n's dispatch
    return real_accumulate(window, out)

  monkeypatch.setattr(loop, '_accumulate_train', accumulate)
  config = _config(repo_root, dataset, **{'train.max_steps': 6})
  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert len(dispatched) == 6
  # Steps 3-6 (steps 1 and 2 compile the step and the window sums; the log, evaluation and
  # save come after step 6's dispatch). A blocking loop needs >= 3 burn_s between the first
  # and the last of these dispatches; this one only places three batches of 2.
  span = dispatched[5] - dispatched[2]
  assert span < 1.0 * burn_s, (
      f'dispatching steps 3-6 took {span:.3f} s, a step burns {burn_s:.3f} s: the host waited '
      f'for the device (dispatch times {dispatched})')


def test_step_time_keeps_the_device_time_of_steps_before_an_epoch_end(toy_loop, monkeypatch,
                                                                      repo_root, dataset,
                                                                      tmp_path):
  """An epoch end inside a log window (here step 6 of 12, a checkpoint save) waits for the
  steps still running on the device; that wait is step time, not 'other' time (saving,
  evaluating) left out of step_time_s. Counted as other, the window's step time came out at
  about half a step's device work. Each step's device work is made long against the host's
  per-step work, so that steps are still queued when the epoch ends."""
  burn_s = _slow_steps(monkeypatch, n=400)
  config = _config(repo_root, dataset, **{'train.max_steps': 12})
  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = _rows(tmp_path / 'run')
  assert [int(r['step']) for r in rows] == [12]
  step_time = float(rows[0]['step_time_s'])
  assert step_time > 0.75 * burn_s, (step_time, burn_s)


def test_log_rows_carry_throughput_and_a_profile_is_written(toy_loop, repo_root, dataset,
                                                            tmp_path):
  config = _config(repo_root, dataset, **{'train.max_steps': 6, 'train.log_every_steps': 2,
                                          'train.profile_steps': (2, 4)})
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(config, str(workdir))
  rows = _rows(workdir)
  assert [int(r['step']) for r in rows] == [2, 4, 6]
  for r in rows:
    for column in ('loss', 'grad_norm', 'step_time_s', 'examples_per_s', 'goodput',
                   'tflops_per_device', 'host_input_frac'):
      assert np.isfinite(float(r[column])), (column, r)
    assert 0 < float(r['goodput']) <= 1 and 0 <= float(r['host_input_frac']) <= 1
    assert float(r['examples_per_s']) == pytest.approx(2 / float(r['step_time_s']))
    assert not r.get('mfu'), 'a CPU has no known peak: no MFU column value'
  traces = list((workdir / 'tb' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1, 'TensorBoard reads the trace from tb/plugins/profile/<run>/'


def test_mid_epoch_stop_resumes_exactly_with_batches_placed_ahead(toy_loop, repo_root, dataset,
                                                                 tmp_path):
  """Stop after step 2 of a 6-step epoch (batches 3 and 4 already read and placed): the resumed
  run must train on batch 3 next and end with the uninterrupted run's parameters."""
  config = _config(repo_root, dataset, **{'train.max_steps': 5, 'train.log_every_steps': 1,
                                          'data.augment.enabled': True})
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  loop.train_and_evaluate(config, full)
  calls = {'n': 0}

  def stop_after_two():
    calls['n'] += 1
    return calls['n'] >= 2
  assert loop.train_and_evaluate(config, resumed, should_stop=stop_after_two) == {
      'stopped_at_step': 2}
  loop.train_and_evaluate(config, resumed)

  def params(workdir):
    path = os.path.join(workdir, 'checkpoints', 'latest', '5')
    return jax.tree.map(np.asarray, checkpointing.restore_params(path))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       params(full), params(resumed)))
  assert max(diffs) == 0.0, f'resumed params differ by {max(diffs)}'
  losses = lambda w: {int(r['step']): float(r['loss']) for r in _rows(w)}
  assert [losses(full)[s] for s in (3, 4, 5)] == [losses(resumed)[s] for s in (3, 4, 5)]


def test_bad_profile_steps_and_stop_check_every_are_config_errors(repo_root, dataset):
  with pytest.raises(config_lib.ConfigError, match='profile_steps'):
    _config(repo_root, dataset, **{'train.profile_steps': (5, 2)})
  with pytest.raises(config_lib.ConfigError, match='stop_check_every'):
    _config(repo_root, dataset, **{'train.stop_check_every': 0})


def test_a_file_as_compilation_cache_dir_is_a_training_error(repo_root, dataset, tmp_path):
  """The train CLI turns TrainingError into one line (exit 2), not a traceback."""
  f = tmp_path / 'not_a_dir'
  f.write_text('x')
  config = _config(repo_root, dataset, **{'train.compilation_cache_dir': str(f)})
  with pytest.raises(loop.TrainingError, match='is a file: give a directory'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
