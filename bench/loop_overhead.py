r"""Goodput of the training loop: how much of its wall time the compiled step gets.

  python -m bench.loop_overhead          # demo model, 64 and 128 px, 1 and 8 devices
  python -m bench.loop_overhead --variant demo --sizes 128 --steps 30 --devices 1 --json out.json

goodput = steps x the bare jitted step's time / the loop's wall time for those steps.

- The bare step is `train_step.make_train_step` on one placed random batch, `steps` calls
  dispatched back to back and waited for once at the end: what the device does when nothing
  else runs (bench/train_step.py's `build_ours`).
- The loop is `segchange_jax.train.loop.train_and_evaluate` on synthetic scenes of that size,
  logging every `--steps` steps: after a first window (compile, warm-up), the next windows'
  step time (metrics.csv `step_time_s`, or batch / `examples_per_s` for a loop that logs no
  step time) is the loop's wall time per step, input pipeline, placement, dispatch and logging
  included, evaluation and saving (at the end) excluded. The scenes fit one epoch, so no
  evaluation or checkpoint falls inside a timed window.

Each (size, devices) pair runs in its own process (the simulated device count is fixed when JAX
starts). On a 2-core CPU the "device" and the host share the cores, so the loop's host work
competes with the step itself; on an accelerator the same host work overlaps the step.
Run against an older checkout (`--repo PATH`, a git worktree) for a before / after pair.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ''):   # run as a file: PYTHONPATH (--repo) still comes first
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import REPO  # noqa: E402
from bench._common import image_size  # noqa: E402
from bench._common import positive_int  # noqa: E402
from bench._common import run_child  # noqa: E402


def _bare_step_s(variant: str, batch: int, size: int, steps: int) -> float:
  """Seconds per step of the jitted step alone, `steps` calls pipelined."""
  import jax  # pylint: disable=g-import-not-at-top

  from bench.train_step import build_ours  # pylint: disable=g-import-not-at-top
  compiled, state, arrays, table, _ = build_ours(variant, batch, size, 'float32')
  for _ in range(2):   # warm-up
    state, out = compiled(state, arrays, table)
  jax.block_until_ready(out)
  best = float('inf')
  for _ in range(2):
    start = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state, arrays, table)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def _loop_step_s(variant: str, batch: int, size: int, steps: int, windows: int,
                 tmp: str) -> tuple[float, list[float]]:
  """The loop's seconds per step over `windows` timed log windows of `steps` steps."""
  from bench._common import variant_config  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import convert  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import loop  # pylint: disable=g-import-not-at-top
  total = steps * (1 + windows)
  # One epoch covers every step, so that no epoch end (training metrics, a save) falls inside a
  # timed window; val / test get the generator's share for the final evaluation.
  n = batch * (total + 1)
  while synthetic.split_sizes(n)[0][1] < batch * (total + 1):
    n += batch
  synthetic.generate(f'{tmp}/raw', n=n, size=size, seed=0)
  convert.convert('segchange-default', f'{tmp}/raw', f'{tmp}/shards',
                  ['train', 'val', 'test'], workers=2)
  c = variant_config(variant)
  with c.unlocked():
    c.data.shards_dir, c.data.source_root, c.data.synthetic.n = f'{tmp}/shards', '', 0
    c.data.image_size = c.model.img_size = size
    c.train.batch_size = c.eval.batch_size = batch
    c.train.max_steps = total
    c.train.log_every_steps = steps
    c.train.progress_bar = False
    c.train.start_eval = 10**6
    c.checkpoint.keep_best = False
    c.eval.num_images = 0
    if 'compilation_cache_dir' in c.train:
      c.train.compilation_cache_dir = ''
  workdir = f'{tmp}/run'
  loop.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, 'metrics.csv')) as f:
    rows = [r for r in csv.DictReader(f) if r['split'] == 'train']
  per_step = [float(r['step_time_s']) if r.get('step_time_s')
              else batch / float(r['examples_per_s']) for r in rows[1:]]
  return statistics.median(per_step), per_step


def child(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  bare = _bare_step_s(args.variant, args.batch, args.child_size, args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    looped, windows = _loop_step_s(args.variant, args.batch, args.child_size, args.steps,
                                   args.windows, tmp)
  return {'variant': args.variant, 'size': args.child_size, 'batch': args.batch,
          'devices': jax.device_count(), 'bare_step_s': bare, 'loop_step_s': looped,
          'loop_windows_s': windows, 'goodput': bare / looped}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', default='demo')
  p.add_argument('--sizes', type=image_size, nargs='+', default=[64, 128])
  p.add_argument('--devices', type=positive_int, nargs='+', default=[1, 8])
  p.add_argument('--batch', type=positive_int, default=8, help='global batch (a multiple of '
                 'every --devices value)')
  p.add_argument('--steps', type=positive_int, default=20, help='steps per timed window')
  p.add_argument('--windows', type=positive_int, default=2, help='timed windows (after one '
                 'untimed window that compiles)')
  p.add_argument('--repo', default=REPO, help='the checkout whose loop is timed (this one by '
                 'default; another worktree gives a before / after pair)')
  p.add_argument('--json', help='write the rows to this file')
  p.add_argument('--child_size', type=int, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child_size:
    print('RESULT ' + json.dumps(child(args)), flush=True)
    return
  for n in args.devices:
    if args.batch % n:
      p.error(f'--batch {args.batch} is not a multiple of --devices {n}')
  rows = []
  script = os.path.abspath(__file__)
  for size in args.sizes:
    for n in args.devices:
      env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}', 'JAX_PLATFORMS': 'cpu',
             'PYTHONPATH': os.path.abspath(args.repo) + os.pathsep + REPO}
      r, err = run_child(script, ['--variant', args.variant, '--batch', str(args.batch),
                                  '--steps', str(args.steps), '--windows', str(args.windows),
                                  '--child_size', str(size)], env)
      if r is None:
        print(f'{args.variant} {size} px x{n} devices failed:\n{err}', flush=True)
        continue
      rows.append(r)
      print(f'{r["variant"]} {size} px batch {r["batch"]}, {n} device(s): bare step '
            f'{r["bare_step_s"] * 1e3:.1f} ms, loop {r["loop_step_s"] * 1e3:.1f} ms/step '
            f'(windows {", ".join(f"{w * 1e3:.1f}" for w in r["loop_windows_s"])}), '
            f'goodput {r["goodput"]:.3f}', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
