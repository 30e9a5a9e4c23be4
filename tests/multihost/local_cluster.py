"""Runs `python -m segchange_jax.train` as N local CPU processes forming one JAX cluster.

Each process gets `devices` simulated CPU devices (XLA_FLAGS) and joins through a coordinator
on 127.0.0.1:<free port>, exactly like hosts of a TPU slice or SLURM nodes. Every wait has a
timeout, so a hang fails the caller instead of blocking it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
  out = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '2', 'HF_HUB_OFFLINE': '1'}
  if cache_dir:  # identical programs compile once across runs
    out.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return out


@dataclasses.dataclass
class Result:
  returncodes: list[int]
  logs: list[str]
  seconds: float
  timed_out: bool

  def tail(self, n: int = 3000) -> str:
    return '\n'.join(f'--- process {i} (rc {rc}) ---\n{log[-n:]}'
                     for i, (rc, log) in enumerate(zip(self.returncodes, self.logs)))


def run(args: Sequence[str], workdir: str | os.PathLike, *, num_processes: int, devices: int,
        timeout: float, cache_dir: str | None = None,
        monitor: Callable[[list[subprocess.Popen]], None] | None = None) -> Result:
  """`python -m segchange_jax.train --workdir WORKDIR ARGS` on `num_processes` processes."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  base = [sys.executable, '-m', 'segchange_jax.train', '--workdir', str(workdir), *args]
  if num_processes > 1:
    base += ['--coordinator_address', f'127.0.0.1:{free_port()}',
             '--num_processes', str(num_processes)]
  cmds = [base + (['--process_id', str(i)] if num_processes > 1 else [])
          for i in range(num_processes)]
  return run_commands(cmds, workdir, devices=devices, timeout=timeout, cache_dir=cache_dir,
                      monitor=monitor)


def run_commands(cmds: Sequence[Sequence[str]], logdir: str | os.PathLike, *, devices: int,
                 timeout: float, cache_dir: str | None = None,
                 monitor: Callable[[list[subprocess.Popen]], None] | None = None) -> Result:
  """Starts one process per command, optionally calls `monitor(procs)` (it may signal some),
  waits. Processes still running at `timeout` are killed (return code -9, `timed_out` set).
  """
  logdir = pathlib.Path(logdir)
  procs, files = [], []
  start = time.monotonic()
  for i, cmd in enumerate(cmds):
    f = open(logdir / f'log_p{i}_{int(time.time() * 1000)}.txt', 'w+')
    files.append(f)
    procs.append(subprocess.Popen(list(cmd), cwd=REPO, env=env(devices, cache_dir), stdout=f,
                                  stderr=subprocess.STDOUT))
  timed_out = False
  try:
    if monitor is not None:
      monitor(procs)
    for p in procs:
      left = timeout - (time.monotonic() - start)
      try:
        p.wait(timeout=max(left, 1))
      except subprocess.TimeoutExpired:
        pass
  finally:
    for p in procs:
      if p.poll() is None:
        timed_out = True
        p.send_signal(signal.SIGKILL)
        p.wait()
  logs = []
  for f in files:
    f.seek(0)
    logs.append(f.read())
    f.close()
  return Result([p.returncode for p in procs], logs, time.monotonic() - start, timed_out)
