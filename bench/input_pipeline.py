r"""Input-pipeline throughput at 512x512 with the default augmentations, and the cores it needs.

    python bench/input_pipeline.py [--workers 0,2] [--processes 0,2] [--batches 10]
    python bench/input_pipeline.py --processes 0,4,8 --flops_per_example 1.37e12

Builds synthetic 512x512 shards in a temp folder, then times `create_train_iterator` after a
warm-up batch per worker process, for each pair (config.data.num_workers: reader threads,
config.data.worker_processes: grain processes). Each setting prints examples/s, that rate per
core of this host (os.cpu_count(), whether or not the pipeline kept them all busy), and the CPU
time it used per example (this process's threads plus its worker processes, from getrusage and
/proc), which other work on the machine does not dilute.

Cores per chip: a chip running the Swin-B 512 px train step at 40 % of its bf16 peak
(segchange_jax.train.mfu.peak_tflops: H100 SXM, TPU v5e) consumes 0.4 x peak / (train-step
FLOPs per example) examples/s; feeding it takes that rate x the measured CPU seconds per
example. The FLOPs per example are XLA's cost analysis of the lowered (not compiled) Swin-B
512 px batch-2 bf16 step that bench/train_step.py times (`build_ours`), computed after the
timings (building the state takes a minute or two on CPU) unless --flops_per_example is given.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

from _common import xla_cost
from configs import base
from segchange_jax.data import convert
from segchange_jax.data import input_pipeline
from segchange_jax.data import synthetic
from segchange_jax.train import mfu

FLAGS = flags.FLAGS
flags.DEFINE_list('workers', ['0', '2'], 'config.data.num_workers values to time (reader threads '
                  '= 2 * max(1, n), in each worker process when there are any).')
flags.DEFINE_list('processes', ['0', '2'], 'config.data.worker_processes values to time (grain '
                  'worker processes; 0 = threads in this process only).')
flags.DEFINE_integer('batches', 10, 'Timed batches per setting.')
flags.DEFINE_integer('batch_size', 4, 'Batch size.')
flags.DEFINE_integer('size', 512, 'Image size.')
flags.DEFINE_float('flops_per_example', None, 'Train-step FLOPs per example; default: XLA cost '
                   'analysis of the lowered Swin-B step at --size, batch 2, bf16.')

UTILIZATION = 0.4   # the share of the chip's bf16 peak the train step is assumed to reach
CHIPS = (('H100', 'NVIDIA H100 80GB HBM3'), ('TPU v5e', 'TPU v5 lite'))   # (name, device_kind)
FLOPS_BATCH = 2


def _children_cpu_s() -> dict[int, float]:
  """CPU seconds (user + system) so far of each live multiprocessing child (grain workers)."""
  tick = os.sysconf('SC_CLK_TCK')
  out = {}
  for p in multiprocessing.active_children():
    try:
      with open(f'/proc/{p.pid}/stat', encoding='ascii') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:   # exited in between
      continue
    out[p.pid] = (int(fields[11]) + int(fields[12])) / tick
  return out


def time_setting(config, table, workers: int, processes: int) -> dict:
  """examples/s and CPU seconds per example of one (num_workers, worker_processes) setting."""
  with config.unlocked():
    config.data.num_workers = workers
    config.data.worker_processes = processes
  it, _ = input_pipeline.create_train_iterator(config, table, 0, 1)
  for _ in range(max(1, processes)):   # every worker started and warm
    next(it)
  cpu0, kids0 = time.process_time(), _children_cpu_s()
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  wall = time.perf_counter() - start
  cpu, kids = time.process_time() - cpu0, _children_cpu_s()
  cpu += sum(kids[pid] - kids0.get(pid, 0.0) for pid in kids)
  it.close()
  n = FLAGS.batches * FLAGS.batch_size
  return {'workers': workers, 'processes': processes, 'rate': n / wall,
          'cpu_per_example': cpu / n, 'busy_cores': cpu / wall}


def swin_b_flops_per_example(size: int) -> float:
  """XLA cost analysis of the lowered Swin-B train step (bf16, batch 2) at `size`, per example."""
  import train_step  # pylint: disable=g-import-not-at-top
  step, state, arrays, table, _ = train_step.build_ours(
      'swin_base_patch4_window7_224', FLOPS_BATCH, size, 'bfloat16', compile_step=False)
  cost = xla_cost(step.lower(state, arrays, table))
  if not cost.get('flops'):
    raise SystemExit('XLA gave no FLOP count for the lowered step; pass --flops_per_example')
  return float(cost['flops']) / FLOPS_BATCH


def main(argv: Sequence[str]) -> None:
  del argv
  cores = os.cpu_count() or 1
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(f'{tmp}/raw', n=20, size=FLAGS.size, seed=0)
    convert.convert('segchange-default', f'{tmp}/raw', f'{tmp}/shards', ['train'], workers=2)
    info = input_pipeline.load_dataset_info(f'{tmp}/shards')
    table = {p: i for i, p in enumerate(info['prompts'])}
    c = base.get_config()
    with c.unlocked():
      c.data.shards_dir = f'{tmp}/shards'
      c.data.image_size = FLAGS.size
      c.train.batch_size = FLAGS.batch_size
    for processes in map(int, FLAGS.processes):
      for workers in map(int, FLAGS.workers):
        r = time_setting(c, table, workers, processes)
        results.append(r)
        print(f'workers={workers} processes={processes}: {r["rate"]:.1f} examples/s '
              f'({FLAGS.size}x{FLAGS.size}, augmented); {r["rate"] / cores:.1f} per core over '
              f'the {cores} cores of this host; {1000 * r["cpu_per_example"]:.0f} ms of CPU per '
              f'example ({1 / r["cpu_per_example"]:.1f} examples per CPU-second, '
              f'{r["busy_cores"]:.2f} cores busy)', flush=True)

  flops = FLAGS.flops_per_example
  source = '--flops_per_example'
  if flops is None:
    flops = swin_b_flops_per_example(FLAGS.size)
    source = f'XLA cost analysis, lowered Swin-B step, batch {FLOPS_BATCH}, bf16'
  print(f'Swin-B {FLAGS.size} px train step: {flops / 1e9:.0f} GFLOP per example ({source})')
  for name, kind in CHIPS:
    peak = mfu.peak_tflops(kind, 'bfloat16')
    need = UTILIZATION * peak * 1e12 / flops
    per_setting = ', '.join(
        f'{need * r["cpu_per_example"]:.1f} (workers={r["workers"]} processes={r["processes"]})'
        for r in results)
    print(f'{name} at {UTILIZATION:.0%} of {peak:g} TFLOP/s bf16: {need:.0f} examples/s; CPU '
          f'cores to feed it (measured CPU time per example): {per_setting}')


if __name__ == '__main__':
  app.run(main)
