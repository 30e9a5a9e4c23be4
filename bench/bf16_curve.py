r"""bfloat16 vs float32 training: loss curves of the same steps, same data, same init.

  python bench/bf16_curve.py                       # demo model, 20 steps, batch 2, 64 px
  python bench/bf16_curve.py --variant swin_base_patch4_window7_224 --size 256 --steps 3

Both runs start from the same initial state and see the same fixed random batch (the model
memorises it, so the loss falls); `model.dtype=bfloat16` computes in bfloat16 with float32
parameters, optimizer state, softmaxes and losses. Prints both curves, the largest relative
difference and the step time of each (min over the steps after the first).
"""

from __future__ import annotations

import argparse
import time

from _common import image_size
from _common import positive_int
import train_step


def curve(variant: str, size: int, batch: int, steps: int, dtype: str):
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, arrays, table, _ = train_step.build_ours(variant, batch, size, dtype)
  losses, times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = compiled(state, arrays, table)
    losses.append(float(jax.block_until_ready(out['loss'])))
    times.append(time.perf_counter() - start)
  return losses, min(times[1:] or times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variant', default='demo')
  p.add_argument('--size', type=image_size, default=64)
  p.add_argument('--batch', type=positive_int, default=2)
  p.add_argument('--steps', type=positive_int, default=20)
  args = p.parse_args()
  f32, t32 = curve(args.variant, args.size, args.batch, args.steps, 'float32')
  b16, t16 = curve(args.variant, args.size, args.batch, args.steps, 'bfloat16')
  rel = [abs(b - f) / abs(f) for f, b in zip(f32, b16)]
  for i, (f, b) in enumerate(zip(f32, b16)):
    print(f'step {i + 1:3d}: float32 {f:.5f}  bfloat16 {b:.5f}  rel diff {rel[i]:.4f}')
  print(f'max relative loss difference over {args.steps} steps: {max(rel):.4f} (mean '
        f'{sum(rel) / len(rel):.4f}); step time float32 {t32:.3f} s, bfloat16 {t16:.3f} s')


if __name__ == '__main__':
  main()
