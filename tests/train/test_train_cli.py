"""`python -m segchange_jax.train` as a user runs it: SIGTERM saves a checkpoint, a rerun
resumes."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.conftest import tiny_overrides

TIMEOUT_S = 600  # generous: a loaded 2-core machine compiles slowly


def _command(workdir, dataset, **overrides):
  flags = [f'--config.{o}' for o in tiny_overrides(dataset, **overrides)]
  return [sys.executable, '-m', 'segchange_jax.train', '--config', 'configs/demo.py',
          '--workdir', str(workdir), *flags]


def _env(repo_root):
  # One CPU device: the subprocess does not inherit conftest's 8 simulated devices.
  return {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def _train_steps(workdir):
  path = os.path.join(workdir, 'metrics.csv')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [int(r['step']) for r in csv.DictReader(f) if r['split'] == 'train']


def _latest_checkpoint_steps(workdir):
  d = os.path.join(workdir, 'checkpoints', 'latest')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# Slow (two demo-model compilations in subprocesses: 5.5 min of a 2-core CI run, a third of the
# default budget). Preemption is covered by the slow tests only: this one,
# tests/train/test_trainer.py (preempted + resumed == uninterrupted) and tests/multihost (SIGTERM
# on one of two processes).
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(repo_root, dataset, tmp_path):
  workdir = tmp_path / 'run'
  # 400 steps would take minutes: the run is interrupted long before.
  log_path = tmp_path / 'train.log'
  with open(log_path, 'w') as log_file:  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(_command(workdir, dataset, **{'train.max_steps': 400}),
                            cwd=repo_root, env=_env(repo_root), stdout=log_file,
                            stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + TIMEOUT_S
      while not _train_steps(workdir):  # wait until the loop is running
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, 'no training step logged in time'
        time.sleep(0.5)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
  log = log_path.read_text()
  assert proc.returncode == 0, log[-3000:]
  assert 'SIGTERM received' in log and 'stopping after step' in log, log[-3000:]
  stopped = _latest_checkpoint_steps(workdir)[-1]
  assert 1 <= stopped < 400
  assert max(_train_steps(workdir)) == stopped  # nothing trained after the checkpoint
  assert not os.path.exists(workdir / 'eval_test.json')  # a stopped run is not presented as done

  # The same command, with a nearer end, continues from the saved step and finishes.
  rerun = subprocess.run(_command(workdir, dataset, **{'train.max_steps': stopped + 1}),
                         cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resumed from step {stopped}' in rerun.stderr, rerun.stderr[-3000:]
  assert _train_steps(workdir) == list(range(1, stopped + 2))
  assert os.path.isfile(workdir / 'eval_test.json')
