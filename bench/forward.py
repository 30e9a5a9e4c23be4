r"""Forward latency and peak memory: our jitted model vs the PyTorch reference, same machine.

  python bench/forward.py                       # upstream default (Swin-B), 512 px, batch 1 and 4
  python bench/forward.py --variant resnet50 --size 256 --batches 1 --iters 3

Each (implementation, batch) runs in its own subprocess so that peak memory is per run: on GPU
the device allocator's peak (jax memory_stats / torch.cuda.max_memory_allocated), on CPU the
process's peak RSS growth over the model build. Random weights (timing does not depend on them).
Ours is timed after a warm-up call (compilation excluded; compile time printed separately).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import VARIANTS
from _common import image_size
from _common import positive_int
from _common import random_model
from _common import rss_mb as _rss_mb
from _common import run_child
from _common import timed
from _common import variant_config as _config


def run_ours(variant: str, batch: int, size: int, iters: int, dtype: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  config, model, variables, rng = random_model(variant, dtype)
  a = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(batch, 8, config.text.dim)), jnp.float32)
  base_rss = _rss_mb()
  fwd = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t))
  start = time.perf_counter()
  compiled = fwd.lower(variables, a, a, t).compile()
  compile_s = time.perf_counter() - start
  run = lambda: compiled(variables, a, a, t).block_until_ready()
  run()  # warm-up
  times = timed(run, iters)
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  mem = compiled.memory_analysis()
  peak = stats.get('peak_bytes_in_use')
  return {'impl': 'ours', 'device': dev.device_kind, 'batch': batch, 'ms': 1e3 * min(times),
          'ms_median': 1e3 * sorted(times)[len(times) // 2], 'compile_s': compile_s,
          'peak_mb': peak / 2**20 if peak else _rss_mb() - base_rss,
          'xla_temp_mb': getattr(mem, 'temp_size_in_bytes', 0) / 2**20}


def run_torch(variant: str, batch: int, size: int, iters: int, dtype: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  from tests.torch_ref import segchange as ref  # pylint: disable=g-import-not-at-top
  config = _config(variant)
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  model = ref.build_change_model(config).eval().to(device)
  cast = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  a = torch.randn(batch, 3, size, size, device=device)
  t = torch.randn(batch, 8, config.text.dim, device=device)
  base_rss = _rss_mb()
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  with torch.no_grad(), torch.autocast(device, dtype=cast, enabled=dtype == 'bfloat16'):
    model(a, a, t)
    sync()
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    times = timed(lambda: (model(a, a, t), sync()), iters)
  peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb() - base_rss
  return {'impl': 'torch', 'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'batch': batch, 'ms': 1e3 * min(times),
          'ms_median': 1e3 * sorted(times)[len(times) // 2], 'peak_mb': peak}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variant', default='swin_base_patch4_window7_224',
                 choices=VARIANTS)
  p.add_argument('--size', type=image_size, default=512)
  p.add_argument('--batches', type=positive_int, nargs='+', default=[1, 4])
  p.add_argument('--iters', type=positive_int, default=5)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--impls', nargs='+', default=['ours', 'torch'], choices=['ours', 'torch'])
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    fn = run_ours if args.child == 'ours' else run_torch
    print('RESULT ' + json.dumps(fn(args.variant, args.batches[0], args.size, args.iters,
                                    args.dtype)))
    return
  results = {}
  for batch in args.batches:
    for impl in args.impls:
      r, err = run_child(__file__, ['--child', impl, '--variant', args.variant, '--size',
                                    str(args.size), '--batches', str(batch), '--iters',
                                    str(args.iters), '--dtype', args.dtype])
      if r is None:
        print(f'{impl} batch {batch} failed:\n{err}')
        continue
      results[(impl, batch)] = r
      print(f"{impl:5s} batch {batch}: {r['ms']:.0f} ms (median {r['ms_median']:.0f}), "
            f"peak {r['peak_mb']:.0f} MB" + (f", compile {r['compile_s']:.1f} s, XLA temp "
                                            f"{r['xla_temp_mb']:.0f} MB" if impl == 'ours' else '')
            + f" [{r['device']}]", flush=True)
  for batch in args.batches:
    if ('ours', batch) in results and ('torch', batch) in results:
      o, t = results[('ours', batch)], results[('torch', batch)]
      print(f"batch {batch}: speed-up torch/ours {t['ms'] / o['ms']:.2f}x, "
            f"memory ours/torch {o['peak_mb'] / max(t['peak_mb'], 1e-9):.2f}")


if __name__ == '__main__':
  main()
