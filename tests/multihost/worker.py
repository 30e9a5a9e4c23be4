"""One process of a cheap multi-process check (no model): `python tests/multihost/worker.py
SHARDS OUT COORDINATOR NUM_PROCESSES PROCESS_ID`.

Joins the cluster with segchange_jax.train.distributed, builds this process's training batches at
global steps 0 and 3, assembles them into global jax.Arrays exactly as the trainer does, and
writes per-example checksums of the global batch (computed by one jitted, sharded program) plus
the result of the stop agreement (only process 1 asks to stop) to OUT/result_<id>.json.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from segchange_jax.data import input_pipeline
from segchange_jax.train import distributed
from segchange_jax.train import loop
from segchange_jax.train import sharding


def main(shards: str, out: str, coordinator: str, num_processes: int, process_id: int) -> None:
  distributed.maybe_initialize(coordinator, num_processes, process_id, heartbeat_timeout=60)
  config = base.get_config()
  with config.unlocked():
    config.data.shards_dir = shards
    config.data.image_size = 64
    config.data.num_workers = 0
    config.train.batch_size = 8
  info = input_pipeline.load_dataset_info(shards)
  table = {p: i for i, p in enumerate(info['prompts'])}
  mesh = sharding.create_mesh(config)
  it, _ = input_pipeline.create_train_iterator(config, table)
  checksum = jax.jit(lambda b: jnp.sum(b['image_a'], axis=(1, 2, 3)) + jnp.sum(
      b['label'], axis=(1, 2)).astype(jnp.float32),
                     out_shardings=sharding.replicated(mesh))
  sums = {}
  for step in (0, 3):
    it.set_state({'step': step})
    batch = loop._host_batch_to_global(next(it), mesh)   # pylint: disable=protected-access
    sums[step] = np.asarray(jax.device_get(checksum(batch))).tolist()
  stop = loop._all_agree_to_stop(process_id == 1)   # pylint: disable=protected-access
  result = {'process': jax.process_index(), 'processes': jax.process_count(),
            'devices': jax.device_count(), 'sums': sums, 'stop': stop}
  with open(os.path.join(out, f'result_{process_id}.json'), 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
