"""bench/accelerator_check.{sh,py}: the largest-batch search, the results lines, the driver on
faked children (the GPU path: MFU, torch beside ours), and the whole script on CPU (slow)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / 'bench'))
import accelerator_check as ac  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2**30


class FakeDevice:
  """Runs a batch when 1 GiB + 2 GiB x batch fits in 24 GiB (batch <= 11); each try takes
  `seconds` on a fake clock."""

  def __init__(self, seconds=10.0, fail_at=None):
    self.now, self.seconds, self.fail_at = 0.0, seconds, fail_at
    self.batches, self.timeouts = [], []

  def clock(self):
    return self.now

  def __call__(self, batch, timeout):
    assert timeout > 0
    self.batches.append(batch)
    self.timeouts.append(timeout)
    self.now += self.seconds
    if batch == self.fail_at:
      return ac.Try(batch, 'error', None, self.seconds, 'ValueError: shapes')
    peak = GIB + 2 * GIB * batch
    if peak > 24 * GIB:
      return ac.Try(batch, 'oom', None, self.seconds, 'RESOURCE_EXHAUSTED: Out of memory')
    return ac.Try(batch, 'ok', {'peak_mb': peak / 2**20, 'batch': batch}, self.seconds)


def _search(dev, **kw):
  kw = {'start': 1, 'cap': 64, 'deadline': 1e9, **kw}
  return ac.largest_batch(dev, clock=dev.clock, log=lambda _: None, **kw)


def test_doubling_then_bisect_finds_the_largest_batch():
  dev = FakeDevice()
  s = _search(dev)
  assert s.best == 11 and dev.batches == [1, 2, 4, 8, 16, 12, 10, 11]
  assert s.result()['batch'] == 11 and s.result(4)['batch'] == 4 and s.result(16) is None
  assert s.stop == 'batch 12 does not fit'


def test_the_memory_limit_predicts_the_batch():
  dev = FakeDevice()
  s = _search(dev, start=4, limit_bytes=24 * GIB, headroom=1.0)
  # One peak (through the origin) predicts 10; two (4 and 10) give the line exactly: 11.
  assert s.best == 11 and dev.batches == [4, 10, 11]
  assert s.stop.startswith('memory')


def test_the_cap_and_the_smallest_batch():
  assert _search(FakeDevice(), cap=6).best == 6
  dev = FakeDevice()
  s = _search(dev, start=16)
  assert s.best == 11 and dev.batches == [16, 8, 12, 10, 11]
  s = ac.largest_batch(lambda b, t: ac.Try(b, 'oom', None, 1.0, 'out of memory'), start=4, cap=8,
                       deadline=1e9, log=lambda _: None)
  assert s.best == 0 and [t.batch for t in s.tries] == [4, 2, 1]


def test_the_deadline_stops_tries_that_would_overrun():
  dev = FakeDevice(seconds=30.0)
  s = _search(dev, deadline=100.0)
  assert dev.batches == [1, 2, 4]  # at t=90 a 30 s try would end past 100
  assert s.best == 4 and s.stop.startswith('time budget')
  assert dev.timeouts == [100, 70, 40]  # each try may use what is left, no more
  dev = FakeDevice(seconds=30.0)
  _search(dev, deadline=100.0, first_timeout=300.0)
  assert dev.timeouts == [300, 70, 40]  # a slow first compile may run past the share


def test_an_error_that_is_not_memory_stops_the_search():
  dev = FakeDevice(fail_at=4)
  s = _search(dev)
  assert s.best == 2 and dev.batches == [1, 2, 4] and s.stop == 'error at batch 4'


@pytest.mark.parametrize('text,status', [
    ('jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying', 'oom'),
    ('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', 'oom'),
    ('(killed by SIGKILL: without a traceback, usually the kernel\'s out-of-memory killer)', 'oom'),
    ('\n(timed out after 120 s)', 'timeout'),
    ('ValueError: operands could not be broadcast', 'error'),
])
def test_classify(text, status):
  assert ac.classify(text) == status


def test_result_lines():
  line = ac.result_line('swin.512px.ours.bfloat16.step_time', 0.2311234567, 's',
                        'NVIDIA H100 80GB HBM3')
  assert line == 'swin.512px.ours.bfloat16.step_time 0.231123 s NVIDIA H100 80GB HBM3'
  assert ac.parse_line(line) == ('swin.512px.ours.bfloat16.step_time', 0.231123, 's',
                                 'NVIDIA H100 80GB HBM3')
  with pytest.raises(ValueError, match='one word'):
    ac.result_line('step time', 1.0, 's', 'cpu')
  with pytest.raises(ValueError, match='one word'):
    ac.result_line('step_time', 1.0, '', 'cpu')


def test_find_goodput_in_any_json_shape():
  assert ac._find({'goodput': 0.9}, 'goodput') == [0.9]  # pylint: disable=protected-access
  tree = {'rows': [{'size': 128, 'goodput': 0.8}, {'size': 256, 'goodput': 0.95}], 'x': 'goodput'}
  assert ac._find(tree, 'goodput') == [0.8, 0.95]  # pylint: disable=protected-access


def _figures(path) -> dict:
  out = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if not line.startswith('#'):
      name, value, unit, device = ac.parse_line(line)
      out[name] = (value, unit, device)
  return out


def _fake_gpu(monkeypatch, tmp_path, device_count: int = 1) -> list:
  """Fakes every child: an H100 (x device_count) whose ours step runs up to batch 6 per device,
  torch up to batch 3, the loop bench reporting goodput 0.97. Returns the (child, dtype, batch)
  list of the ours / torch children run."""
  calls = []

  def fake_child(script, args, env=None, timeout=None):
    assert timeout is None or timeout > 0
    kind = args[args.index('--child') + 1]
    if kind == 'env':
      return {'info': 'jax: fake', 'platform': 'gpu', 'device_kind': 'NVIDIA H100 80GB HBM3',
              'device_count': device_count, 'process_count': 1, 'devices': ['cuda:0'],
              'bytes_limit': 70 * GIB, 'jax': '0.0'}, ''
    if kind == 'torch' and script.endswith('accelerator_check.py'):
      return {'torch': '2.x', 'cuda': True, 'cuda_version': '13', 'device': 'H100'}, ''
    batch = int(args[args.index('--batch') + 1])
    dtype = args[args.index('--dtype') + 1]
    calls.append((kind, dtype, batch))
    per_device = batch // device_count if kind == 'ours' else batch
    if per_device > (6 if kind == 'ours' else 3):
      return None, 'RESOURCE_EXHAUSTED: Out of memory'
    step = 0.1 * per_device * (1 if kind == 'ours' else 1.5)
    return {'s': step, 's_median': step * 1.01, 'examples_per_s': batch / step,
            'peak_mb': 1024.0 * per_device, 'compile_s': 30.0, 'gflop': 1000.0 * per_device}, ''

  def fake_run(cmd, **kw):
    json_path = cmd[cmd.index('--json') + 1]
    pathlib.Path(json_path).write_text(json.dumps({'rows': [{'goodput': 0.97}]}))
    return subprocess.CompletedProcess(cmd, 0, 'goodput 0.97\n', '')

  loop_script = tmp_path / 'loop_overhead.py'
  loop_script.write_text('')
  monkeypatch.setattr(ac, 'run_child', fake_child)
  monkeypatch.setattr(ac, 'LOOP_OVERHEAD', str(loop_script))
  monkeypatch.setattr(ac.subprocess, 'run', fake_run)
  return calls


def test_driver_on_faked_gpu_children(tmp_path, monkeypatch):
  """The GPU path without a GPU (_fake_gpu: ours runs at 2, 5 and 6, so torch at 2): checks
  every figure line, MFU and the torch / ours ratio."""
  calls = _fake_gpu(monkeypatch, tmp_path)
  out = tmp_path / 'r.txt'
  out.write_text('earlier line\n')  # appended to, never truncated
  assert ac.main(['--out', str(out), '--start_batch', '2', '--max_batch', '8']) == 0
  assert out.read_text().startswith('earlier line\n')
  lines = out.read_text().splitlines()[1:]
  assert lines[0].startswith('# ') and 'NVIDIA H100 80GB HBM3' in lines[0]
  figures = {}
  for line in lines[1:]:
    name, value, unit, device = ac.parse_line(line)
    assert math.isfinite(value) and device == 'NVIDIA H100 80GB HBM3'
    figures[name] = (value, unit)
  p = 'swin_base_patch4_window7_224.512px'
  for dtype in ('float32', 'bfloat16'):
    o = f'{p}.ours.{dtype}'
    assert figures[f'{o}.max_batch_per_device'] == (6, 'examples')
    assert figures[f'{o}.step_time'] == (pytest.approx(0.6), 's')
    assert figures[f'{o}.peak_memory'] == (6.0, 'GiB')
    assert figures[f'{o}.examples_per_s'] == (pytest.approx(10.0), 'examples/s')
    peak = {'float32': 494.7, 'bfloat16': 989.4}[dtype]  # mfu.py's H100 SXM
    assert figures[f'{o}.tflops'][0] == pytest.approx(6000 / 0.6 / 1e3)
    assert figures[f'{o}.mfu'] == (pytest.approx(10.0 / peak, rel=1e-5), 'fraction')
    t = f'{p}.torch.{dtype}'
    assert figures[f'{t}.batch'] == (2, 'examples')  # 6 and 5 ran out of memory
    assert figures[f'{t}.step_time'] == (pytest.approx(0.3), 's')
    assert figures[f'{p}.torch_over_ours.{dtype}.step_time'] == (pytest.approx(1.5), 'x')
  assert figures['loop.demo.128px.goodput'] == (0.97, 'fraction')
  assert figures['env.device_memory_limit'] == (70.0, 'GiB')
  # Searches: 2, then straight to the batch 70 GiB predicts (capped at 8), then bisect.
  assert [b for k, d, b in calls if k == 'ours' and d == 'float32'] == [2, 8, 5, 6, 7]
  assert [b for k, d, b in calls if k == 'torch' and d == 'float32'] == [6, 5, 2]


def test_several_devices_search_the_per_device_batch(tmp_path, monkeypatch):
  calls = _fake_gpu(monkeypatch, tmp_path, device_count=4)
  out = tmp_path / 'r.txt'
  assert ac.main(['--out', str(out), '--start_batch', '2', '--max_batch', '8',
                  '--dtypes', 'bfloat16', '--no_loop']) == 0
  assert calls == [('ours', 'bfloat16', 4 * b) for b in (2, 8, 5, 6, 7)]  # no torch
  figures = {ac.parse_line(l)[0]: ac.parse_line(l)[1]
             for l in out.read_text().splitlines() if not l.startswith('#')}
  o = 'swin_base_patch4_window7_224.512px.ours.bfloat16'
  assert figures[f'{o}.max_batch_per_device'] == 6
  assert figures[f'{o}.examples_per_s'] == pytest.approx(40.0)  # all four devices
  assert figures[f'{o}.tflops'] == pytest.approx(10.0)  # per device


@pytest.mark.slow
def test_dry_run_on_cpu(tmp_path):
  """The whole script, as a person runs it, with its tiny --dry_run sizes: every figure line."""
  out = tmp_path / 'results.txt'
  loop = (REPO / 'bench' / 'loop_overhead.py').exists()
  cmd = ['bash', str(REPO / 'bench' / 'accelerator_check.sh'), '--dry_run', '--out', str(out)]
  # One CPU device, as on a user's machine (tests/conftest.py simulates 8 for the sharding tests).
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env = {**os.environ, 'PYTHON': sys.executable, 'XLA_FLAGS': ' '.join(flags)}
  proc = subprocess.run(cmd + ([] if loop else ['--no_loop']), capture_output=True, text=True,
                        env=env, cwd='/', timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  print(proc.stdout)  # the search's log (pytest -s shows it)
  figures = _figures(out)
  assert all(math.isfinite(v) for v, _, _ in figures.values()), figures
  expected = ['env.device_count']
  for dtype in ('float32', 'bfloat16'):
    o = f'demo.64px.ours.{dtype}'
    expected += [f'{o}.{k}' for k in ('max_batch_per_device', 'step_time', 'step_time_median',
                                      'examples_per_s', 'peak_memory', 'compile_time',
                                      'gflop_per_step', 'tflops')]
    # The dry run times torch on the CPU too (the GPU run's path).
    expected += [f'demo.64px.torch.{dtype}.{k}' for k in ('batch', 'step_time', 'examples_per_s',
                                                         'peak_memory')]
    expected.append(f'demo.64px.torch_over_ours.{dtype}.step_time')
  if loop:  # the loop bench is written apart; until it exists, that one line is skipped
    expected.append('loop.demo.64px.goodput')
  assert sorted(figures) == sorted(expected)
  # The dry run's cap is 2; on a busy machine the time budget may stop the search after 1.
  assert figures['demo.64px.ours.float32.max_batch_per_device'][0] in (1, 2)
  assert {d for _, _, d in figures.values()} == {'cpu'}  # no MFU line: a CPU has no peak


def test_missing_python_or_module_is_one_line(tmp_path):
  script = str(REPO / 'bench' / 'accelerator_check.sh')
  proc = subprocess.run(['bash', script, '--out', str(tmp_path / 'r')], capture_output=True,
                        text=True, env={**os.environ, 'PYTHON': 'no-such-python'}, check=False)
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1
  assert "no 'no-such-python' on PATH" in proc.stderr
  fake = tmp_path / 'python'  # a Python without jax: a stand-in that hides it
  fake.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
  fake.chmod(0o755)
  proc = subprocess.run(['bash', script, '--out', str(tmp_path / 'r')], capture_output=True,
                        text=True, env={**os.environ, 'PYTHON': str(fake)}, check=False)
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
  assert "Python module 'jax' is missing" in proc.stderr
