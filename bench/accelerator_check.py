r"""One accelerator check, sized for a short GPU / TPU lease: run by bench/accelerator_check.sh.

  bash bench/accelerator_check.sh --out results.txt               # on the GPU / TPU VM, < 8 min
  bash bench/accelerator_check.sh --dry_run --out /tmp/r.txt      # tiny sizes, on CPU, ~1 min
  bash bench/accelerator_check.sh --out r.txt --dtypes bfloat16 --no_torch --budget_s 300

In order, each measurement in its own process (an out-of-memory error cannot poison the rest):
1. Environment: jax.print_environment_info() (jax, jaxlib, devices, nvidia-smi when present),
   every device's kind and memory limit, torch's version and CUDA availability.
2. Our Swin-B train step (bench/train_step.py's child: forward A/B, losses, backward, AdamW) at
   --size px for each --dtypes, at the LARGEST batch that fits (per device: the step is
   data-parallel over every local device, batch = per-device batch x devices, so the search
   runs over the per-device batch and peak memory is device 0's): batches grow by doubling (or
   jump to the batch that the measured peak memory predicts, when the device reports its
   memory), and a failure with RESOURCE_EXHAUSTED / out of memory bisects between the largest
   batch that ran and the smallest that did not, until they are within 1/8 of each other.
   Every try that ran is timed (warm-up, then --iters steps); the largest one's figures are
   kept: step time, examples/s, peak device memory, XLA compile time, XLA-counted TFLOP/s per
   device and MFU against segchange_jax/train/mfu.py's peak for the device and dtype.
3. The PyTorch reference step (bench/train_step.py's torch child) at the same batch when
   torch.cuda.is_available() and jax sees one device, on out-of-memory at the next smaller
   batch ours ran at; and torch / ours step time at that batch.
4. The training loop's goodput on the demo model, `python -m bench.loop_overhead`: steps x
   bare jitted step time / loop wall time (1.0 = no loop overhead).

The whole run keeps to --budget_s: a search starts no try it expects to overrun its share, and
a child still running at the end of the budget is killed. Every figure is printed and appended
as ONE line to --out:  `name value unit device`  (the device name, which may contain spaces,
is the rest of the line; a run starts with a `#` line saying when, where and with what).
Names: `<variant>.<size>px.<impl>.<dtype>.<figure>`, e.g.
`swin_base_patch4_window7_224.512px.ours.bfloat16.step_time 0.231 s NVIDIA H100 80GB HBM3`.
Exit status 1 when a measurement failed for a reason other than memory (printed), else 0.

float32 caveat: on NVIDIA GPUs JAX runs float32 matmuls and convolutions as TF32 (its default
precision); torch runs float32 matmuls in full float32 (torch.backends.cuda.matmul.allow_tf32
is off by default) and convolutions as TF32. So the float32 torch / ours ratio favours ours;
the bfloat16 one compares like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

from _common import REPO
from _common import VARIANTS
from _common import image_size
from _common import positive_int
from _common import run_child

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_STEP = os.path.join(HERE, 'train_step.py')
LOOP_OVERHEAD = os.path.join(HERE, 'loop_overhead.py')  # run as `python -m bench.loop_overhead`
# Lower case: XLA's RESOURCE_EXHAUSTED, CUDA_ERROR_OUT_OF_MEMORY, torch's "CUDA out of memory" /
# OutOfMemoryError, and the kernel's OOM killer as bench/_common.run_child reports it.
OOM_MARKERS = ('resource_exhausted', 'out of memory', 'out_of_memory', 'outofmemoryerror',
               'killed by sigkill')


# ----------------------------------------------------------------------------- results lines


def result_line(name: str, value: float, unit: str, device: str) -> str:
  """One figure as `name value unit device` (name and unit without spaces; device may have them)."""
  for what, text in (('name', name), ('unit', unit)):
    if not text or any(c.isspace() for c in text):
      raise ValueError(f'{what} {text!r} must be one word')
  return f'{name} {value:.6g} {unit} {device or "unknown"}'


def parse_line(line: str) -> tuple[str, float, str, str]:
  """The inverse of result_line: (name, value, unit, device)."""
  name, value, unit, device = line.split(maxsplit=3)
  return name, float(value), unit, device


class Results:
  """Prints each figure and appends it to the results file as it is measured (a run cut short
  keeps what it had)."""

  def __init__(self, path: str, device: str):
    self.path, self.device, self.lines = path, device, []

  def header(self, text: str) -> None:
    self._write(f'# {text}')

  def add(self, name: str, value: float, unit: str) -> None:
    self._write(result_line(name, value, unit, self.device))

  def _write(self, line: str) -> None:
    print('RESULT LINE ' + line, flush=True)
    self.lines.append(line)
    with open(self.path, 'a') as f:
      f.write(line + '\n')


# ------------------------------------------------------------------- the largest-batch search


@dataclasses.dataclass
class Try:
  """One child run at one batch: status 'ok', 'oom', 'error' or 'timeout'."""
  batch: int
  status: str
  result: dict | None
  seconds: float
  error: str = ''


@dataclasses.dataclass
class Search:
  """What the search found: the largest batch that ran (0: none) and why it stopped."""
  best: int
  tries: list[Try]
  stop: str

  def result(self, batch: int | None = None) -> dict | None:
    """The figures of the try at `batch` (default: the best one), if it ran."""
    batch = self.best if batch is None else batch
    return next((t.result for t in self.tries if t.batch == batch and t.status == 'ok'), None)


def classify(error: str) -> str:
  """'oom' when a failed child's output says it ran out of memory, 'timeout', else 'error'."""
  if '(timed out after' in error:
    return 'timeout'
  low = error.lower()
  return 'oom' if any(m in low for m in OOM_MARKERS) else 'error'


def _predict(tries: list[Try], limit_bytes: float | None, headroom: float) -> int | None:
  """The largest batch whose peak memory stays under headroom x limit, by a line through the
  two largest batches that ran (through the origin with one): None without memory figures."""
  ok = sorted((t.batch, t.result.get('peak_mb', float('nan')) * 2**20) for t in tries
              if t.status == 'ok' and t.result)
  ok = [(b, p) for b, p in ok if math.isfinite(p) and p > 0]
  if not limit_bytes or not ok:
    return None
  (b1, p1), (b2, p2) = ([(0, 0.0)] + ok)[-2:]
  per = (p2 - p1) / (b2 - b1)
  if per <= 0:
    return None
  return int((headroom * limit_bytes - (p2 - per * b2)) // per)


def largest_batch(try_batch: Callable[[int, float], Try], *, start: int, cap: int,
                  deadline: float, limit_bytes: float | None = None, headroom: float = 0.97,
                  first_timeout: float | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  log: Callable[[str], None] = print) -> Search:
  """Largest batch in [start, cap] for which try_batch(batch, timeout_s) returns status 'ok'.

  Grows by doubling, or, when the device reports its memory (`limit_bytes`), straight to the
  batch that the peaks measured so far predict (fewer compiles); bisects after an
  out-of-memory failure until the bounds are within 1/8 of each other. Starts no try that the
  slowest try so far says would end after `deadline` (seconds on `clock`), and gives each try
  the time left as its timeout (the first try at least `first_timeout`). Stops at the first
  failure that is not out-of-memory.
  """
  tries: list[Try] = []
  lo, hi = 0, cap + 1  # lo ran; hi did not (or is past the cap)
  batch = min(start, cap)
  while True:
    left = deadline - clock()
    slowest = max((t.seconds for t in tries), default=0.0)
    if left <= 0 or (tries and slowest > left):
      return Search(lo, tries, f'time budget ({left:.0f} s left, a try takes ~{slowest:.0f} s)')
    t = try_batch(batch, left if tries or first_timeout is None else max(left, first_timeout))
    tries.append(t)
    log(f'  batch {batch}: {t.status} ({t.seconds:.0f} s)')
    if t.status == 'ok':
      lo = batch
    elif t.status == 'oom':
      hi = batch
    else:
      return Search(lo, tries, f'{t.status} at batch {batch}')
    if hi <= cap and hi - lo <= max(1, lo // 8):
      return Search(lo, tries, f'batch {hi} does not fit')
    if lo >= cap:
      return Search(lo, tries, f'the cap {cap}')
    if hi <= cap:  # bisect
      batch = (lo + hi) // 2
      continue
    pred = _predict(tries, limit_bytes, headroom)
    if pred is None:
      batch = min(cap, 2 * lo)
    elif pred <= lo and sum(x.status == 'ok' for x in tries) > 1:
      return Search(lo, tries, f'memory: the measured peaks predict {pred} is the most that fits')
    else:
      batch = min(cap, max(pred, lo + 1))


# --------------------------------------------------------------------------------- children


def _env_child() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  return {'info': jax.print_environment_info(return_string=True),
          'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
          'device_count': len(devices), 'process_count': jax.process_count(),
          'devices': [str(d) for d in devices],
          'bytes_limit': stats.get('bytes_limit'), 'jax': jax.__version__}


def _torch_child() -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'torch': None, 'why': str(e)}
  cuda = torch.cuda.is_available()
  return {'torch': torch.__version__, 'cuda': cuda, 'cuda_version': torch.version.cuda,
          'device': torch.cuda.get_device_name() if cuda else None}


# ------------------------------------------------------------------------------------ driver


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--out', required=True, help='results file: one line per figure is appended')
  p.add_argument('--dry_run', action='store_true',
                 help='tiny: demo model, 64 px, batch search capped at 2, 1 iteration (CPU test)')
  p.add_argument('--variant', default=VARIANTS[0], choices=VARIANTS)
  p.add_argument('--size', type=image_size, default=512)
  p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                 choices=['float32', 'bfloat16'])
  p.add_argument('--start_batch', type=positive_int, default=4,
                 help='first per-device batch tried (Swin-B at 512 px fits 4 on a 16 GB+ '
                 'accelerator)')
  p.add_argument('--max_batch', type=positive_int, default=128, help='per device')
  p.add_argument('--iters', type=positive_int, default=5, help='timed steps per try')
  p.add_argument('--budget_s', type=float, default=None,
                 help='the whole run, seconds (a child still running then is killed); default '
                 '420, with --dry_run 1800 (XLA:CPU compiles even the demo step slowly)')
  p.add_argument('--mem_fraction', default='0.92',
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION of our children on GPUs (jax's default "
                 'is 0.75: the largest batch is then smaller); ignored where already set')
  p.add_argument('--no_torch', action='store_true', help='skip the PyTorch reference')
  p.add_argument('--no_loop', action='store_true', help='skip bench/loop_overhead.py')
  p.add_argument('--child', default='', choices=['', 'env', 'torch'], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.dry_run:
    args.variant, args.size, args.start_batch, args.max_batch, args.iters = 'demo', 64, 1, 2, 1
  if args.budget_s is None:
    args.budget_s = 1800.0 if args.dry_run else 420.0
  if args.budget_s <= 0:
    p.error(f'--budget_s {args.budget_s}: give a positive number of seconds')
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  if args.child:
    print('RESULT ' + json.dumps(_env_child() if args.child == 'env' else _torch_child()))
    return 0
  start = time.monotonic()
  end = start + args.budget_s
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise SystemExit(f'--out {args.out}: directory {out_dir} does not exist')
  cache = tempfile.mkdtemp(prefix='segchange_check_xla_')
  # Our children share a compilation cache (GPU autotuning results are kept there too), and
  # take most of the GPU's memory so that the batch found is the one training could use.
  env = {'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'XLA_PYTHON_CLIENT_MEM_FRACTION': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION',
                                                          args.mem_fraction)}
  failures = []
  try:
    return _run(args, env, end, failures)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
    print(f'accelerator check: {time.monotonic() - start:.0f} s of {args.budget_s:.0f}; '
          f'results appended to {args.out}' + (f'; FAILED: {"; ".join(failures)}'
                                               if failures else ''), flush=True)


def _run(args, env: dict, end: float, failures: list[str]) -> int:
  def left() -> float:
    return end - time.monotonic()

  print('== environment', flush=True)
  info, err = run_child(__file__, ['--child', 'env', '--out', args.out], env,
                        timeout=max(left(), 1))
  if info is None:
    raise SystemExit(f'jax could not start: {err}')
  print(info['info'], flush=True)
  print(f"devices: {', '.join(info['devices'])}", flush=True)
  tinfo, terr = run_child(__file__, ['--child', 'torch', '--out', args.out],
                          timeout=max(min(left(), 300), 1))
  tinfo = tinfo or {'torch': None, 'why': (terr.strip().splitlines() or ['?'])[-1]}
  print(f"torch: {tinfo.get('torch')}, CUDA available: {tinfo.get('cuda')}"
        f"{', ' + str(tinfo['device']) if tinfo.get('device') else ''}"
        f"{' (' + str(tinfo['why']) + ')' if tinfo.get('why') else ''}", flush=True)
  device = info['device_kind']
  res = Results(args.out, device)
  res.header(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
             f"accelerator_check{' --dry_run' if args.dry_run else ''}: jax {info['jax']}, "
             f"{info['device_count']} x {device} ({info['platform']}), torch "
             f"{tinfo.get('torch')}, variant {args.variant}, {args.size} px")
  res.add('env.device_count', info['device_count'], 'devices')
  limit = info.get('bytes_limit')
  if limit:
    res.add('env.device_memory_limit', limit / 2**30, 'GiB')

  from segchange_jax.train import mfu  # pylint: disable=g-import-not-at-top
  prefix = f'{args.variant}.{args.size}px'
  # A dry run times torch on the CPU too, so that a CPU test covers the path the GPU run takes.
  n = info['device_count']
  run_torch = (bool(tinfo.get('cuda') or (args.dry_run and tinfo.get('torch')))
               and not args.no_torch and n == 1)
  loop_reserve = 0 if args.no_loop else min(90.0, 0.2 * args.budget_s)
  torch_reserve = (0.15 * args.budget_s) if run_torch else 0.0
  searches = {}
  for k, dtype in enumerate(args.dtypes):
    # Time an earlier search left over (or overran) goes to (or comes from) the later ones.
    share = max(left() - loop_reserve - torch_reserve, 0.0) / (len(args.dtypes) - k)
    deadline = time.monotonic() + share
    print(f'== ours, {args.variant}, {args.size} px, {dtype}: largest batch (up to '
          f'{args.max_batch}, {share:.0f} s)', flush=True)

    def try_ours(batch, timeout, dtype=dtype):
      t0 = time.monotonic()
      r, why = run_child(TRAIN_STEP, ['--child', 'ours', '--variant', args.variant, '--sizes',
                                      str(args.size), '--batch', str(batch * n), '--iters',
                                      str(args.iters), '--dtype', dtype], env,
                         timeout=min(timeout, max(left(), 1)))
      status = 'ok' if r else classify(why)
      if status == 'error':
        print(why, flush=True)
      return Try(batch, status, r, time.monotonic() - t0, why)

    # A first try may run past the share (a slow first compile), but not into the reserves:
    # one figure per dtype is worth more than a larger batch for another.
    s = largest_batch(try_ours, start=args.start_batch, cap=args.max_batch, deadline=deadline,
                      limit_bytes=limit, first_timeout=left() - loop_reserve - torch_reserve)
    searches[dtype] = s
    print(f'  stopped: {s.stop}', flush=True)
    if 'error' in s.stop:
      failures.append(f'ours {dtype}: {s.stop}')
    r = s.result()
    if not r:
      failures.append(f'ours {dtype}: no batch ran ({s.stop})')
      continue
    name = f'{prefix}.ours.{dtype}'
    res.add(f'{name}.max_batch_per_device', s.best, 'examples')
    res.add(f'{name}.step_time', r['s'], 's')
    res.add(f'{name}.step_time_median', r['s_median'], 's')
    res.add(f'{name}.examples_per_s', r['examples_per_s'], 'examples/s')
    res.add(f'{name}.peak_memory', r['peak_mb'] / 1024, 'GiB')
    res.add(f'{name}.compile_time', r['compile_s'], 's')
    res.add(f'{name}.gflop_per_step', r['gflop'], 'GFLOP')
    tp = mfu.throughput(r['gflop'] * 1e9, r['s'], mfu.peak_tflops(device, dtype))
    res.add(f'{name}.tflops', tp['tflops_per_device'], 'TFLOP/s')
    if 'mfu' in tp:
      res.add(f'{name}.mfu', tp['mfu'], 'fraction')
    else:
      print(f'  no MFU: segchange_jax/train/mfu.py has no peak for {device!r}', flush=True)

  if run_torch:
    torch_end = time.monotonic() + max(left() - loop_reserve, 0)
    for dtype, s in searches.items():
      # The batches ours ran at, largest first: on out-of-memory torch steps down to the next
      # one, so that its time has ours beside it at the same batch.
      batches = sorted({t.batch for t in s.tries if t.status == 'ok'}, reverse=True)
      batch = batches.pop(0) if batches else 0
      if batch and torch_end - time.monotonic() <= 5:
        print(f'== torch reference, {dtype}: skipped, no time left in --budget_s', flush=True)
      while batch >= 1 and torch_end - time.monotonic() > 5:
        print(f'== torch reference, {dtype}, batch {batch}', flush=True)
        t, why = run_child(TRAIN_STEP, ['--child', 'torch', '--variant', args.variant, '--sizes',
                                        str(args.size), '--batch', str(batch), '--iters',
                                        str(args.iters), '--dtype', dtype],
                           timeout=torch_end - time.monotonic())
        if t is None and classify(why) == 'oom':
          print(f'  batch {batch}: out of memory', flush=True)
          batch = batches.pop(0) if batches else batch // 2
          continue
        if t is None:
          print(why, flush=True)
          failures.append(f'torch {dtype} batch {batch}: {classify(why)}')
          break
        name = f'{prefix}.torch.{dtype}'
        res.add(f'{name}.batch', batch, 'examples')
        res.add(f'{name}.step_time', t['s'], 's')
        res.add(f'{name}.examples_per_s', t['examples_per_s'], 'examples/s')
        res.add(f'{name}.peak_memory', t['peak_mb'] / 1024, 'GiB')
        ours = s.result(batch)
        if ours:
          res.add(f'{prefix}.torch_over_ours.{dtype}.step_time', t['s'] / ours['s'], 'x')
        else:
          print(f'  (ours did not run at batch {batch}: no ratio)', flush=True)
        break
  elif not args.no_torch:
    why = f'jax sees {n} devices, torch runs on one' if n > 1 else 'no CUDA for torch'
    print(f'== torch reference: skipped ({why})', flush=True)

  if not args.no_loop:
    _loop_goodput(args, res, left(), failures)
  return 1 if failures else 0


def _loop_goodput(args, res: Results, timeout: float, failures: list[str]) -> None:
  size, steps = ('64', '5') if args.dry_run else ('128', '30')
  print(f'== training loop goodput, demo model, {size} px, {steps} steps', flush=True)
  if not os.path.exists(LOOP_OVERHEAD):
    print('  skipped: bench/loop_overhead.py does not exist in this checkout', flush=True)
    failures.append('loop goodput: bench/loop_overhead.py missing')
    return
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'loop.json')
    cmd = [sys.executable, '-m', 'bench.loop_overhead', '--variant', 'demo', '--sizes', size,
           '--steps', steps, '--devices', '1', '--json', out] + (
               ['--windows', '1'] if args.dry_run else [])
    try:
      proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            timeout=max(timeout, 1),
                            env={**os.environ, 'PYTHONPATH': REPO})
    except subprocess.TimeoutExpired:
      failures.append(f'loop goodput: timed out after {timeout:.0f} s')
      return
    print(proc.stdout[-2000:], end='', flush=True)
    if proc.returncode or not os.path.exists(out):
      print(proc.stderr[-3000:], flush=True)
      failures.append(f'loop goodput: {" ".join(cmd[1:4])} exited {proc.returncode}')
      return
    with open(out) as f:
      found = _find(json.load(f), 'goodput')
  if not found:
    failures.append(f'loop goodput: no "goodput" in the --json of {" ".join(cmd[1:4])}')
  for k, value in enumerate(found):
    res.add(f'loop.demo.{size}px.goodput' + (f'.{k}' if len(found) > 1 else ''), value,
            'fraction')


def _find(tree, key: str) -> list[float]:
  """Every number stored under `key` anywhere in a JSON tree, in document order."""
  if isinstance(tree, dict):
    return [float(v) for k, v in tree.items() if k == key and isinstance(v, (int, float))] + [
        x for k, v in tree.items() if k != key for x in _find(v, key)]
  if isinstance(tree, list):
    return [x for v in tree for x in _find(v, key)]
  return []


if __name__ == '__main__':
  sys.exit(main())
