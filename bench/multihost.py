r"""Multi-host cost on CPU: the demo train step on P local processes x D devices vs 1 x 8.

  python bench/multihost.py                                # 1x8 and 2x4, 3 timed steps each
  python bench/multihost.py --layouts 1x8 2x4 4x2 --iters 2 --cache_dir /tmp/jax_cache
  python bench/multihost.py --layouts 2x4 --xla_flags=--xla_cpu_multi_thread_eigen=false
  python bench/multihost.py --layouts 1x8 2x4 --grad_reductions per_param flat --profile

Times the bare jitted train step (the one bench/train_step.py builds: configs/demo.py, random
weights and inputs, --batch global examples at --size px, data-parallel over all devices) on 1
process with 8 simulated CPU devices and on P processes of D devices each, which join one JAX
cluster through segchange_jax.train.distributed (jax.distributed on 127.0.0.1; XLA:CPU runs the
cross-process collectives with gloo over TCP), as `python -m segchange_jax.train
--num_processes P` does. Every process compiles, runs one warm-up step, then --iters timed
steps; process 0 reports.

Also printed, from the compiled step's optimized HLO (`compiled.as_text()`):
- the collectives by kind (all-reduce, all-gather, reduce-scatter, collective-permute,
  all-to-all): instructions in the HLO, instructions run per step (one in a while loop's body
  runs once per iteration: XLA's known trip count), and arrays moved per step (XLA:CPU's gloo
  collectives move each array of a tuple instruction in its own round trip);
- where they come from: the JAX op_name of each (flax module path; `jvp` forward, `transpose`
  backward; loops are the written-out VJPs of segchange_jax/models/kernels.py);
- the latency of one small all-reduce and one collective-permute on the same cluster: arrays
  moved per step x that latency estimates the step's collective time;
- with --profile, one step under jax.profiler: op time by kind on process 0.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

from _common import REPO
from _common import image_size
from _common import positive_int

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_COLLECTIVE = re.compile(r'\s(%s)(?:-start)?\(' % '|'.join(KINDS))
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WHILE = re.compile(r'body=%?([\w.\-]+).*?"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r'(?:calls|to_apply|body|branch_computations)=\{?%?([\w.\-]+)')


def _computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines (ENTRY under the key 'ENTRY')."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      head = line.split('(', 1)[0].split()
      name = 'ENTRY' if head[0] == 'ENTRY' else head[-1].lstrip('%')
      comps[name] = []
    elif name is not None and line.startswith('  '):
      comps[name].append(line)
  return comps


def _origin(line: str, in_loop: bool, arrays: int) -> str:
  """A short label for where a collective comes from, from its JAX op_name."""
  m = _OP_NAME.search(line)
  name = m.group(1) if m else '?'
  top = '(model, top level)' if 'SegChangeModel' in name else '(step: loss, metrics, optimizer)'
  name = name.replace('jit(train_step)/', '')
  phase = 'bwd' if 'transpose(' in name else 'fwd'
  path = re.sub(r'transpose\(|jvp\(|\)|SegChangeModel/?', '', name)
  path = re.sub(r'/(while/body/closed_call|checkpoint|remat)', '', path)
  parts = [p for p in path.split('/') if p]
  prim = parts[-1] if parts else '?'
  module = '/'.join(parts[:-1][:3]) or top
  if in_loop:
    kind = 'loop in a written-out VJP'
  elif arrays >= 16 and phase == 'bwd':
    return f'parameter gradients ({arrays} arrays in one combined instruction)'
  elif re.search(r'_bn$|norm', parts[-2] if len(parts) > 1 else ''):
    kind = 'normalisation statistics'
  elif prim in ('slice', 'pad', 'concatenate', 'dynamic_slice', 'dynamic_update_slice'):
    kind = 'batch re-layout (slice/pad/concat of the batch axis)'
  else:
    kind = prim
  return f'{kind}: {module} ({phase})'


def collective_counts(hlo: str) -> dict:
  """Collectives of an optimized HLO module: static and per-step counts by kind, and origins."""
  comps = _computations(hlo)
  mult = collections.Counter({'ENTRY': 1})
  order, seen = ['ENTRY'], {'ENTRY'}
  while order:  # breadth-first from ENTRY; a while body runs trip-count times per call
    name = order.pop(0)
    for line in comps.get(name, ()):
      loops = {m.group(1): int(m.group(2)) for m in _WHILE.finditer(line)}
      for callee in _CALLS.findall(line):
        if callee in comps:
          mult[callee] += mult[name] * loops.get(callee, 1)
          if callee not in seen:
            seen.add(callee)
            order.append(callee)
  static, per_step, arrays = collections.Counter(), collections.Counter(), collections.Counter()
  origins = collections.Counter()
  for name, lines in comps.items():
    for line in lines:
      m = _COLLECTIVE.search(line.split(' metadata=')[0])
      if not m:
        continue
      kind = m.group(1)
      # A tuple collective (XLA's combiner merges small ones) still moves each array on its
      # own in XLA:CPU's gloo collectives: count the arrays too.
      n = max(1, len(re.findall(r'[a-z]+\d*\[', line[:m.start()].split(' = ', 1)[-1])))
      static[kind] += 1
      per_step[kind] += mult[name]
      arrays[kind] += n * mult[name]
      origins[f'{kind} <- {_origin(line, mult[name] > 1, n)}'] += n * mult[name]
  return {'static': dict(static), 'per_step': dict(per_step), 'arrays': dict(arrays),
          'origins': dict(origins.most_common())}


def _latency(mesh, iters: int) -> dict:
  """Seconds per call of one small all-reduce and one collective-permute over the mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from segchange_jax import jax_compat  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import sharding  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  spec = sharding.batch_sharding(mesh)
  x = jax.make_array_from_callback((n, 32), spec, lambda _: np.ones((1, 32), np.float32))
  ops = {'all-reduce f32[32]': jax.jit(lambda v: jnp.sum(v, 0),
                                       out_shardings=sharding.replicated(mesh)),
         'collective-permute f32[1,32]': jax.jit(lambda v: jnp.roll(v, 1, 0),
                                                 out_shardings=spec)}
  out = {}
  for label, fn in ops.items():
    fn = fn.lower(x).compile()
    jax_compat.wait_at_barrier(f'multihost_bench_{label}', 600)
    jax.block_until_ready(fn(x))
    start = time.perf_counter()
    for _ in range(iters):
      jax.block_until_ready(fn(x))
    out[label] = (time.perf_counter() - start) / iters
  return out


def _build(batch: int, size: int, grad_reduction: str):
  """bench/train_step.build_ours for a cluster: (compiled step, state, batch, table, compile s).

  Same config, model and step; the global batch and the text table are assembled from each
  process's part without a collective (a device_put of a host array would compare it across
  processes, a gloo collective that fails if the processes arrive 30 s apart, as they can while
  compiling on a loaded machine), and the processes meet at a barrier after compiling, as the
  trainer does (train/loop.py).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from segchange_jax import jax_compat  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import param_groups  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import train_step as ts  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  config = train_step._config('demo', 'float32', jax.device_count(), 1)  # pylint: disable=protected-access
  config.train.grad_reduction = grad_reduction
  model = segchange.build_model(config)
  mesh = sharding.create_mesh(config)
  shapes = {k: jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
            for k in ('image_a', 'image_b')}
  state, shardings = ts.create_train_state(
      model, config, jax.random.PRNGKey(0), shapes, mesh, steps_per_epoch=100,
      label_fn=param_groups.lr_label_fn(config), frozen_mask_fn=param_groups.frozen_mask_fn(config))
  step_fn = ts.make_train_step(model, config, mesh, shardings)
  # The global batch, identical on every process; each process passes its own rows.
  rng = np.random.default_rng(0)
  full = {'image_a': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          'image_b': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, 2, (batch, size, size)).astype(np.int32),
          'prompt_index': np.zeros(batch, np.int32), 'mask': np.ones(batch, np.float32)}
  rows = batch // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  spec = sharding.batch_sharding(mesh)
  arrays = {k: jax.make_array_from_process_local_data(spec, v[mine]) for k, v in full.items()}
  emb = rng.normal(size=(1, train_step.TEXT_TOKENS, config.text.dim)).astype(np.float32)
  table = jax.make_array_from_callback(emb.shape, sharding.replicated(mesh), lambda i: emb[i])
  start = time.perf_counter()
  compiled = step_fn.lower(state, arrays, table).compile()
  compile_s = time.perf_counter() - start
  jax_compat.wait_at_barrier('multihost_bench_compiled', 1800)
  return compiled, state, arrays, table, compile_s


def child(args) -> None:
  """One process: join the cluster (if several), compile, time, print RESULT on process 0."""
  from segchange_jax.train import distributed  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    distributed.maybe_initialize(args.coordinator, args.num_processes, args.process_id)
  import jax  # pylint: disable=g-import-not-at-top

  compiled, state, arrays, table, compile_s = _build(args.batch, args.size, args.grad_reduction)
  counts = collective_counts(compiled.as_text())
  holder = {'state': state}

  def one():
    holder['state'], out = compiled(holder['state'], arrays, table)
    jax.block_until_ready(out['loss'])
  start = time.perf_counter()
  one()  # warm-up
  warm = time.perf_counter() - start
  times = []
  for _ in range(args.iters):
    start = time.perf_counter()
    one()
    times.append(time.perf_counter() - start)
  mesh = arrays['image_a'].sharding.mesh
  latency = _latency(mesh, args.latency_iters) if args.latency_iters else {}
  profile = _profile(one, compiled.as_text()) if args.profile else {}
  if jax.process_index() == 0:
    print('RESULT ' + json.dumps({
        'processes': jax.process_count(), 'devices': jax.device_count(),
        'local_devices': jax.local_device_count(), 'compile_s': compile_s, 'warmup_s': warm,
        'times': times, 'counts': counts, 'latency': latency, 'profile': profile}), flush=True)


def _profile(one, hlo: str) -> dict:
  """One step under jax.profiler: op seconds by opcode, per local device (summed over this
  process's device threads, divided by their number), and the step's wall time."""
  import jax  # pylint: disable=g-import-not-at-top

  import profile_step  # pylint: disable=g-import-not-at-top
  index = profile_step.hlo_index(hlo)
  with tempfile.TemporaryDirectory(prefix='segchange_multihost_') as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    one()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                            recursive=True))[-1]
    with gzip.open(path) as f:
      data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  by_kind = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in index:
      opcode = index[e['name']][0]
      kind = opcode if opcode.replace('-start', '').replace('-done', '') in KINDS else (
          'while (loop)' if opcode == 'while' else 'compute')
      by_kind[kind] += e.get('dur', 0) / 1e6 / jax.local_device_count()
  return {'wall_s': wall, 'seconds_by_kind': dict(by_kind.most_common())}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_layout(processes: int, devices: int, args) -> tuple[dict | None, str]:
  """Starts `processes` children of `devices` CPU devices each; (process 0's result, logs)."""
  flags = f'--xla_force_host_platform_device_count={devices} {args.xla_flags}'.strip()
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
         'XLA_FLAGS': flags, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  if args.cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=args.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  coordinator = f'127.0.0.1:{_free_port()}'
  base = [sys.executable, os.path.abspath(__file__), '--child', '--batch', str(args.batch),
          '--size', str(args.size), '--iters', str(args.iters), '--latency_iters',
          str(args.latency_iters), '--coordinator', coordinator, '--num_processes',
          str(processes), '--grad_reduction', args.grad_reduction] + (
              ['--profile'] if args.profile else [])
  with tempfile.TemporaryDirectory() as logdir:
    logs = [open(os.path.join(logdir, f'p{i}.txt'), 'w+') for i in range(processes)]
    procs = [subprocess.Popen(base + ['--process_id', str(i)], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT) for i, f in enumerate(logs)]
    deadline = time.monotonic() + args.timeout
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pass
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    texts = []
    for f in logs:
      f.seek(0)
      texts.append(f.read())
      f.close()
  line = [l for l in texts[0].splitlines() if l.startswith('RESULT ')]
  why = '\n'.join(f'--- process {i} (rc {p.returncode}) ---\n{t[-2000:]}'
                  for i, (p, t) in enumerate(zip(procs, texts)))
  if any(p.returncode for p in procs) or not line:
    return None, why
  return json.loads(line[0][len('RESULT '):]), why


def _layout(text: str) -> tuple[int, int]:
  try:
    p, d = (int(v) for v in text.lower().split('x'))
  except ValueError:
    p = d = 0
  if p < 1 or d < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not PROCESSESxDEVICES (e.g. 2x4)')
  return p, d


def _print(name: str, r: dict, ref: dict | None) -> None:
  s = min(r['times'])
  ratio = f', {s / min(ref["times"]):.2f}x the first layout' if ref and ref is not r else ''
  print(f'{name}: {s:.2f} s/step (median {sorted(r["times"])[len(r["times"]) // 2]:.2f}, '
        f'{r["devices"]} devices){ratio}; compile {r["compile_s"]:.0f} s, warm-up step '
        f'{r["warmup_s"]:.1f} s', flush=True)
  c = r['counts']
  print('  collectives per step: instructions run (in the HLO), arrays moved: ' + ', '.join(
      f'{k} {c["per_step"].get(k, 0)} ({c["static"].get(k, 0)}), {c["arrays"].get(k, 0)}'
      for k in KINDS), flush=True)
  classes = collections.Counter()
  for origin, n in c['origins'].items():
    classes[re.split(r'[:(]', origin.split(' <- ', 1)[1], maxsplit=1)[0].strip()] += n
  print('  arrays moved per step by class: ' + ', '.join(
      f'{k} {n}' for k, n in classes.most_common()), flush=True)
  print('  arrays moved per step by origin (largest first):', flush=True)
  for origin, n in list(c['origins'].items())[:12]:
    print(f'    {n:4d}  {origin}', flush=True)
  for label, sec in r['latency'].items():
    print(f'  one {label}: {sec * 1e3:.2f} ms', flush=True)
  if r.get('profile'):
    prof = r['profile']
    print(f'  profiled step {prof["wall_s"]:.2f} s; op seconds per local device: ' + ', '.join(
        f'{k} {v:.2f}' for k, v in prof['seconds_by_kind'].items()), flush=True)
  if r['latency']:
    ar = r['latency'].get('all-reduce f32[32]', 0.0)
    total = sum(c['arrays'].values())
    print(f'  {total} arrays x {ar * 1e3:.2f} ms (one small all-reduce) = '
          f'{total * ar:.2f} s of the {s:.2f} s step', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--layouts', type=_layout, nargs='+', default=[(1, 8), (2, 4)],
                 help='PROCESSESxDEVICES per row; ratios are to the first (default 1x8 2x4)')
  p.add_argument('--batch', type=positive_int, default=8, help='global batch')
  p.add_argument('--size', type=image_size, default=128)
  p.add_argument('--iters', type=positive_int, default=3)
  p.add_argument('--latency_iters', type=int, default=20,
                 help='calls per collective latency measurement (0: skip)')
  p.add_argument('--xla_flags', default='', help='extra XLA_FLAGS for every process')
  p.add_argument('--cache_dir', default='', help='JAX persistent compilation cache directory')
  p.add_argument('--profile', action='store_true',
                 help='also run one step under jax.profiler: op time by kind (collectives, '
                 'loops, compute) per local device of process 0')
  p.add_argument('--timeout', type=positive_int, default=1800, help='seconds per layout')
  p.add_argument('--grad_reductions', nargs='+', default=['per_param'],
                 choices=['per_param', 'flat'],
                 help="config.train.grad_reduction of the step; each is timed on every layout "
                      "and compared with its first layout")
  p.add_argument('--grad_reduction', default='per_param', help=argparse.SUPPRESS)
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--coordinator', default='', help=argparse.SUPPRESS)
  p.add_argument('--num_processes', type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args)
    return
  for procs, devices in args.layouts:
    if args.batch % (procs * devices):
      p.error(f'--batch {args.batch} must be a multiple of the {procs * devices} devices of '
              f'layout {procs}x{devices}')
  for reduction in args.grad_reductions:
    first = None
    for procs, devices in args.layouts:
      name = (f'{procs} process{"es" if procs > 1 else ""} x {devices} devices, '
              f'grad_reduction={reduction}')
      print(f'== {name}', flush=True)
      r, logs = run_layout(procs, devices, argparse.Namespace(**{**vars(args),
                                                                 'grad_reduction': reduction}))
      if r is None:
        print(f'{name} failed:\n{logs}', flush=True)
        continue
      first = first or r
      _print(name, r, first)
      print('RESULT ' + json.dumps({'layout': f'{procs}x{devices}', 'grad_reduction': reduction,
                                    **r}), flush=True)


if __name__ == '__main__':
  main()
