r"""Where the train step's time goes: per-XLA-op timings of our compiled step, grouped.

  python bench/profile_step.py                                   # Swin-B, 256 px, batch 2
  python bench/profile_step.py --size 128 --batch 1 --variant demo --top 15

Method (bench/README.md): compile the real train step (bench/train_step.build_ours), run it
once, then run --steps steps under `jax.profiler` trace. XLA:CPU records one trace event per
executed op ("thunk": a fusion, a dot, a convolution, a copy...), named like the HLO
instruction. Each instruction's metadata in the compiled HLO (`compiled.as_text()`) carries
the JAX op_name: its flax module path, the primitive, and `jvp(...)` (forward) or
`transpose(...)` (backward, the VJP). Joining the two gives the time per phase (forward /
backward / optimizer), per primitive family and per module. Also printed: XLA's compiled cost
analysis (FLOPs, bytes accessed) of the whole step.

Fractions are of the summed op time, so they hold on a loaded machine too; absolute times
are only meaningful on a quiet one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from _common import positive_int
from _common import xla_cost
import train_step

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z\-]+)\(.*'
                    r'metadata=\{[^}]*op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_TOP = ('backbone', 'conv_list', 'bev', 'feature_diff', 'fpn', 'mask_head')


def hlo_index(hlo: str) -> dict[str, tuple[str, str, str]]:
  """instruction name -> (opcode, op_name, heavy ops inside a fusion) from compiled HLO text."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if m and not line.startswith(' '):
      cur = comps.setdefault(m.group(1), [])
    elif cur is not None:
      cur.append(line)
  heavy_ops = ('convolution', 'dot', 'scatter', 'gather', 'reduce-window', 'reduce', 'transpose',
               'select-and-scatter', 'erf', 'exponential', 'tanh')
  out = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      name, opcode, op_name = m.groups()
      called = _CALLS.search(line)
      called = called.group(1) if called else None
      inner = ''
      if called and called in comps:
        body = '\n'.join(comps[called])
        inner = ','.join(h for h in heavy_ops if re.search(rf' {h}\(', body))
      out[name] = (opcode, op_name, inner)
  return out


def classify(op_name: str) -> tuple[str, str, str]:
  """(phase, module, primitive) of one op_name."""
  phase = 'backward' if 'transpose(' in op_name else (
      'forward' if 'jvp(' in op_name else 'optimizer/other')
  parts = op_name.split('/')
  prim = parts[-1] if parts else '?'
  module = 'other'
  for i, p in enumerate(parts):
    key = re.sub(r'^(transpose\(|jvp\()+|\)+$', '', p)
    if any(key.startswith(t) for t in _TOP):
      sub = [re.sub(r'^(transpose\(|jvp\()+|\)+$', '', q) for q in parts[i + 1:-1]]
      # backbone/layers_2/blocks_3/attn -> backbone/attn (blocks merged); others: top level.
      leaf = [q for q in sub if not re.match(r'(layers|blocks|scale|stages|stage)_?\d+$', q)]
      module = key.split('_')[0] if key.startswith('bev') else key
      if leaf:
        module += '/' + leaf[0]
      break
  return phase, module, prim


def family(opcode: str, inner: str, prim: str) -> str:
  if opcode == 'fusion':
    for h in ('convolution', 'dot', 'scatter', 'gather', 'select-and-scatter', 'reduce-window',
              'reduce', 'transpose'):
      if h in inner.split(','):
        return f'fusion[{h}]'
    return 'fusion[elementwise]'
  return opcode


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  train_step.add_step_args(p, size=256, remat=None)
  p.add_argument('--steps', type=positive_int, default=2)
  p.add_argument('--top', type=positive_int, default=25)
  p.add_argument('--trace_dir', default='')
  p.add_argument('--ops_tsv', default='',
                 help='also write every op (s/step, name, opcode, fused heavy ops, op_name) to '
                      'this tab-separated file, for queries the groups above do not answer')
  args = p.parse_args()
  if args.ops_tsv:  # checked before the minutes of compiling and profiling, not after
    target = os.path.abspath(args.ops_tsv)
    if os.path.isdir(target) or not os.path.isdir(os.path.dirname(target)):
      p.error(f'--ops_tsv {args.ops_tsv}: needs a file path in an existing directory')
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, arrays, table, compile_s = train_step.build_ours(
      args.variant, args.batch, args.size, args.dtype, remat=args.remat)
  cost = xla_cost(compiled)
  print(f'compile {compile_s:.0f} s; XLA cost analysis: {cost.get("flops", 0) / 1e9:.1f} GFLOP, '
        f'{cost.get("bytes accessed", 0) / 1e9:.1f} GB accessed per step', flush=True)
  index = hlo_index(compiled.as_text())
  holder = {'state': state}

  def one():
    holder['state'], out = compiled(holder['state'], arrays, table)
    jax.block_until_ready(out['loss'])
  one()
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='segchange_profile_')
  import time  # pylint: disable=g-import-not-at-top
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(args.steps):
    one()
  wall = (time.perf_counter() - start) / args.steps
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
  data = json.load(gzip.open(path))
  events = data['traceEvents'] if isinstance(data, dict) else data
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in index:
      per_op[e['name']] += e.get('dur', 0) / 1e6 / args.steps
  total = sum(per_op.values())
  # Summed op time exceeds wall time where XLA runs independent ops on parallel threads.
  print(f'{len(per_op)} distinct ops ran; summed op time {total:.2f} s/step; wall {wall:.2f} '
        f's/step under the profiler (trace {path})')
  groups = {'phase': collections.Counter(), 'phase x family': collections.Counter(),
            'phase x module': collections.Counter(), 'phase x primitive': collections.Counter()}
  for name, t in per_op.items():
    opcode, op_name, inner = index[name]
    phase, module, prim = classify(op_name)
    fam = family(opcode, inner, prim)
    groups['phase'][phase] += t
    groups['phase x family'][(phase, fam)] += t
    groups['phase x module'][(phase, module)] += t
    groups['phase x primitive'][(phase, prim)] += t
  for title, counter in groups.items():
    print(f'\n== by {title} (s/step, % of op time)')
    for key, t in counter.most_common(args.top):
      label = ' | '.join(key) if isinstance(key, tuple) else key
      print(f'{t:8.3f} {100 * t / total:5.1f}%  {label}')
  if args.ops_tsv:
    with open(args.ops_tsv, 'w') as f:
      f.write('seconds_per_step\tname\topcode\tfused\top_name\n')
      for name, t in per_op.most_common():
        opcode, op_name, inner = index[name]
        f.write(f'{t:.6f}\t{name}\t{opcode}\t{inner}\t{op_name}\n')
  print(f'\n== top {args.top} single ops')
  for name, t in per_op.most_common(args.top):
    opcode, op_name, inner = index[name]
    print(f'{t:8.3f} {100 * t / total:5.1f}%  {name} [{opcode}{":" + inner if inner else ""}] '
          f'{op_name[-150:]}')


if __name__ == '__main__':
  main()
