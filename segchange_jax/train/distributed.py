"""Multi-process start-up: `jax.distributed.initialize` when the environment asks for it.

Three ways a launch says "this is one process of many":
- explicit flags / config fields (`--coordinator_address host:port --num_processes N
  --process_id i`, or `config.distributed.*`),
- SLURM (`SLURM_NTASKS` > 1 inside an srun step) or Open MPI,
- a Cloud TPU VM slice (`TPU_WORKER_HOSTNAMES` with several hosts, or `MEGASCALE_*`).
In the last two cases jax.distributed.initialize() discovers everything itself.
"""

from __future__ import annotations

import os

from absl import logging
import jax


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_STEP_ID' in env:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return True
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def maybe_initialize(coordinator_address: str = '', num_processes: int = 0,
                     process_id: int = -1, initialization_timeout: int = 300,
                     heartbeat_timeout: int = 100) -> bool:
  """Initialises jax.distributed if asked to or if a cluster is detected; True if it did.

  Must run before any other JAX call that touches devices. `initialization_timeout`: seconds
  to wait for all processes to join; `heartbeat_timeout`: seconds after which a silent
  (killed) process makes the others fail rather than hang.
  """
  timeouts = dict(initialization_timeout=int(initialization_timeout),
                  heartbeat_timeout_seconds=int(heartbeat_timeout))
  if coordinator_address or num_processes > 0 or process_id >= 0:
    if not (coordinator_address and num_processes > 0 and process_id >= 0):
      raise ValueError('multi-process launch needs all three of coordinator_address, '
                       'num_processes and process_id (flags --coordinator_address, '
                       '--num_processes, --process_id or config.distributed.*); got '
                       f'{coordinator_address!r}, {num_processes}, {process_id}')
    if process_id >= num_processes:
      raise ValueError(f'process_id={process_id} must be < num_processes={num_processes}')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **timeouts)
  elif _cluster_detected():
    jax.distributed.initialize(**timeouts)
  else:
    return False
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
