r"""What is alive at the train step's memory peak: XLA's own buffer live ranges, by JAX op.

  python bench/memory_peak.py                                  # Swin-B, 512 px, batch 2
  python bench/memory_peak.py --size 256 --remat block --top 40
  python bench/memory_peak.py --variant demo --size 64 --batch 2

Compiles the real train step (bench/train_step.build_ours, nothing runs, so sizes that do not
fit in memory work too) with `XLA_FLAGS=--xla_dump_to=DIR`. XLA then writes, per compiled
module, `*-live-range.txt`: the scheduled instruction sequence, each buffer's live range, the
buffers live at the peak, and a "stack trace breakdown for peak usage" that sums the bytes
alive at the peak by the JAX op_name that created them (flax module path, primitive, `jvp(...)`
forward or `transpose(...)` backward). This script prints XLA's temp / argument sizes and the
largest entries of that breakdown. How to read it: forward ops listed at the peak are residuals
kept for the backward pass; backward ops are gradients in flight. The dump stays in --dump_dir.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile


def peak_breakdown(dump_dir: str, top: int) -> list[str]:
  """The first `top` lines under 'Stack trace breakdown for peak usage' of the train step."""
  files = glob.glob(os.path.join(dump_dir, '*train_step*live-range.txt'))
  if not files:
    raise SystemExit(f'no *train_step*live-range.txt in {dump_dir}: this XLA did not dump live '
                     'ranges (needs XLA with --xla_dump_to support for them)')
  path = max(files, key=os.path.getmtime)
  lines = open(path).read().splitlines()
  start = next((i for i, l in enumerate(lines) if 'Stack trace breakdown for peak usage' in l),
               None)
  if start is None:
    raise SystemExit(f'{path} has no peak-usage breakdown')
  total = int(re.sub(r'\D', '', lines[start].split(':')[-1]) or 0)
  out = [f"alive at the peak: {total / 2**30:.2f} GiB; the largest by the JAX op that made them:"]
  for l in lines[start + 2:start + 2 + top]:
    m = re.search(r'[├└]── (.*?) \(([\d.]+)%, total: ([\d ]+) bytes', l)
    if m:
      out.append(f'{int(m.group(3).replace(" ", "")) / 2**30:7.2f} GiB {float(m.group(2)):5.1f}%  '
                 f'{m.group(1).replace("jit(train_step)/", "")}')
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from _common import positive_int  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  train_step.add_step_args(p, size=512, remat='none')
  p.add_argument('--top', type=positive_int, default=25)
  p.add_argument('--dump_dir', default='', help='default: a new temporary directory')
  args = p.parse_args()
  dump = args.dump_dir or tempfile.mkdtemp(prefix='segchange_xla_dump_')
  if os.path.exists(dump) and not os.path.isdir(dump):
    p.error(f'--dump_dir {dump} is a file: give a new or empty directory')
  if args.dump_dir and os.path.isdir(dump) and os.listdir(dump):
    # Never delete a user's directory; the newest live-range file would also be ambiguous.
    p.error(f'--dump_dir {dump} exists and is not empty: give a new or empty directory')
  # Only the train step's module, and no per-pass HLO: the dump stays a few hundred MB.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump}'
                             ' --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_pass_re=^$')
  compiled, *_ = train_step.build_ours(args.variant, args.batch, args.size, args.dtype,
                                       remat=args.remat)
  mem = compiled.memory_analysis()
  print(f'{args.variant}, {args.size} px, batch {args.batch}, remat {args.remat}: XLA temp '
        f'{mem.temp_size_in_bytes / 2**30:.2f} GiB + arguments '
        f'{mem.argument_size_in_bytes / 2**30:.2f} GiB (dump: {dump})')
  print('\n'.join(peak_breakdown(dump, args.top)))


if __name__ == '__main__':
  main()
