r"""Compile time of our train step in a first and a second process sharing a compilation cache.

  python bench/compile_cache.py                          # Swin-B, 256 px, batch 1, CPU
  python bench/compile_cache.py --variant demo --size 64 --batch 2
  python bench/compile_cache.py --cache_dir /tmp/xla     # an existing cache: both runs may hit

Runs the same child twice, each a fresh process with segchange_jax.train.compilation_cache
enabled in one directory (a new temporary one unless --cache_dir): the child builds our train
step (bench/train_step.build_ours: random weights) and reports the step's trace + lowering
seconds and its compile seconds apart (only the compile is cached), the seconds from process
start to a compiled step (imports, model and optimizer initialisation, every small jit
included), and jax's own cache hit / miss counts. The first run compiles and writes the cache;
the second should load it (hits > 0, no misses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from _common import VARIANTS
from _common import image_size
from _common import positive_int
from _common import run_child

_START = time.perf_counter()


def child(variant: str, size: int, batch: int, dtype: str, cache_dir: str) -> dict:
  """One process: enable the cache, build and compile the step; seconds and cache events."""
  import jax  # pylint: disable=g-import-not-at-top

  from segchange_jax.train import compilation_cache  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  events, seconds = {}, {}
  jax.monitoring.register_event_listener(
      lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, s, **_: seconds.__setitem__(name, seconds.get(name, 0.0) + s))
  compilation_cache.enable(cache_dir)
  step_fn, state, arrays, table, _ = train_step.build_ours(variant, batch, size, dtype,
                                                          compile_step=False)
  start = time.perf_counter()
  lowered = step_fn.lower(state, arrays, table)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()  # a cache hit loads the executable here instead of running XLA
  return {'compile_s': time.perf_counter() - start, 'lower_s': lower_s,
          'to_compiled_s': time.perf_counter() - _START,
          'hits': events.get('/jax/compilation_cache/cache_hits', 0),
          'misses': events.get('/jax/compilation_cache/cache_misses', 0),
          # jax's own timing of reading entries from disk and deserialising them
          'retrieval_s': seconds.get('/jax/compilation_cache/cache_retrieval_time_sec', 0.0),
          'device': jax.devices()[0].device_kind}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variant', default='swin_base_patch4_window7_224', choices=VARIANTS)
  p.add_argument('--size', type=image_size, default=256)
  p.add_argument('--batch', type=positive_int, default=1)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--cache_dir', default='', help='default: a new temporary directory, removed')
  p.add_argument('--json', default='', help='also write both runs here')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print('RESULT ' + json.dumps(child(args.variant, args.size, args.batch, args.dtype,
                                       args.cache_dir)))
    return
  cache = args.cache_dir or tempfile.mkdtemp(prefix='segchange_xla_cache_')
  runs = []
  try:
    for k in ('first', 'second'):
      r, err = run_child(__file__, ['--child', '--variant', args.variant, '--size',
                                    str(args.size), '--batch', str(args.batch), '--dtype',
                                    args.dtype, '--cache_dir', cache])
      if r is None:
        raise SystemExit(f'{k} run failed:\n{err}')
      r['run'] = k
      runs.append(r)
      print(f"{k:6s} process: step lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} "
            f"s, start to compiled step {r['to_compiled_s']:.1f} s, cache hits {r['hits']}, "
            f"misses {r['misses']}, cache reads {r['retrieval_s']:.1f} s ({r['device']})",
            flush=True)
    size_mb = sum(f.stat().st_size for f in os.scandir(cache)) / 2**20
  finally:
    if not args.cache_dir:
      shutil.rmtree(cache, ignore_errors=True)
  a, b = runs
  print(f'{args.variant}, {args.size} px, batch {args.batch}, {args.dtype}: step compile '
        f"{a['compile_s']:.1f} -> {b['compile_s']:.1f} s, start to compiled step "
        f"{a['to_compiled_s']:.1f} -> {b['to_compiled_s']:.1f} s; cache {size_mb:.0f} MB")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'variant': args.variant, 'size': args.size, 'batch': args.batch,
                 'dtype': args.dtype, 'cache_mb': size_mb, 'runs': runs}, f, indent=1)


if __name__ == '__main__':
  main()
