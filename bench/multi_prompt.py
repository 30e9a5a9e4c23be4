r"""Cost of several prompts in one pass vs one prompt: forward time and XLA FLOPs.

  python bench/multi_prompt.py                          # Swin-B default and demo, 512 px, 1 vs 4
  python bench/multi_prompt.py --variants demo --size 256 --prompts 1 2 4 8 --iters 5
  python bench/multi_prompt.py --conditionings none film_head dynamic_head

text [B, P, T, L] runs the backbone, BEV, difference and neck once per pair and the mask head's
per-prompt tail as one batch of B * P maps (models/segchange.py). Per variant, one process
compiles the model for every P, then times them interleaved (round robin, `iters` rounds after
one warm-up call each) so that load on a shared machine hits all of them alike; the minimum
of each is reported, with the time ratio and the FLOP ratio (XLA cost analysis of the compiled
call) against the first P. Eval mode, jitted, random weights, batch `--batch`. Several
`--conditionings` (config.model.prompt_conditioning) are measured one after the other, each in
its own interleaved rounds.
"""

from __future__ import annotations

import argparse
import time

from _common import image_size
from _common import positive_int
from _common import random_model
from _common import xla_cost


def measure(variant: str, size: int, batch: int, prompts: list[int], iters: int,
            dtype: str, conditioning: str = 'none') -> list[dict]:
  """[{'prompts', 'ms', 'gflops', 'compile_s'}] per entry of `prompts`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  config, model, variables, rng = random_model(variant, dtype, conditioning)
  a = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  fwd = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t))
  runs = []
  for p in prompts:
    t = jnp.asarray(rng.normal(size=(batch, p, 8, config.text.dim)), jnp.float32)
    start = time.perf_counter()
    compiled = fwd.lower(variables, a, b, t).compile()
    compile_s = time.perf_counter() - start
    compiled(variables, a, b, t).block_until_ready()  # warm-up
    runs.append(dict(prompts=p, call=lambda c=compiled, t=t: c(variables, a, b, t),
                     gflops=float(xla_cost(compiled).get('flops', 0.0)) / 1e9,
                     compile_s=compile_s, times=[]))
  for _ in range(iters):
    for r in runs:
      start = time.perf_counter()
      r['call']().block_until_ready()
      r['times'].append(time.perf_counter() - start)
  return [dict(prompts=r['prompts'], ms=1e3 * min(r['times']), gflops=r['gflops'],
               compile_s=r['compile_s']) for r in runs]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variants', nargs='+', default=['swin_base_patch4_window7_224', 'demo'],
                 choices=['swin_base_patch4_window7_224', 'resnet50', 'hgnetv2', 'demo'])
  p.add_argument('--size', type=image_size, default=512)
  p.add_argument('--batch', type=positive_int, default=1)
  p.add_argument('--prompts', type=positive_int, nargs='+', default=[1, 4])
  p.add_argument('--iters', type=positive_int, default=3)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--conditionings', nargs='+', default=['none'],
                 choices=['none', 'film_head', 'film_neck', 'dynamic_head'],
                 help='config.model.prompt_conditioning (models/prompt_film.py)')
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  print(f'device: {jax.devices()[0].device_kind}, {args.size} px, batch {args.batch}, '
        f'{args.dtype}', flush=True)
  for variant in args.variants:
    for conditioning in args.conditionings:
      results = measure(variant, args.size, args.batch, args.prompts, args.iters, args.dtype,
                        conditioning)
      base = results[0]
      for r in results:
        print(f"{variant:30s} {conditioning:12s} P={r['prompts']:2d}: {r['ms']:9.1f} ms "
              f"({r['ms'] / base['ms']:.2f}x P={base['prompts']}), {r['gflops']:8.1f} GFLOP "
              f"({r['gflops'] / base['gflops']:.2f}x), compile {r['compile_s']:.1f} s", flush=True)


if __name__ == '__main__':
  main()
