"""bench/memory_peak.py: reads XLA's peak-usage breakdown; end to end on the demo model (slow).
Also: the bench scripts refuse bad flag values in one argparse line, before any work;
bench/parts.py and profile_step.py --ops_tsv run on the demo model."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / 'bench'))
import memory_peak  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA's live-range dump, verbatim (its lines are longer than ours).
_LIVE_RANGE = '\n'.join([
    'HloLiveRange (max 3):',
    '  Live ranges at 2 (peak):',
    '    a{}: 536870912 bytes (cumulative: 536870912 bytes)',
    '  Stack trace breakdown for peak usage: 1 610 612 736 bytes',
    '    main.1'
    ' (100.0%, total: 1 610 612 736 bytes, current: 0 bytes, remaining: 1 610 612 736 bytes)',
    '      ├── jit(train_step)/jvp(M)/fpn/ega/add'
    ' (66.7%, total: 1 073 741 824 bytes, current: 1 bytes, remaining: 1 bytes)',
    '      ├── jit(train_step)/transpose(jvp(M))/head/dot_general'
    ' (33.3%, total: 536 870 912 bytes, current: 1 bytes, remaining: 1 bytes)',
]) + '\n'


def test_peak_breakdown_reads_xla_live_ranges(tmp_path):
  (tmp_path / 'module_0012.jit_train_step.cpu_after_optimizations-live-range.txt').write_text(
      _LIVE_RANGE)
  out = memory_peak.peak_breakdown(str(tmp_path), 5)
  assert out[0].startswith('alive at the peak: 1.50 GiB')
  assert out[1].split() == ['1.00', 'GiB', '66.7%', 'jvp(M)/fpn/ega/add']
  assert out[2].split() == ['0.50', 'GiB', '33.3%', 'transpose(jvp(M))/head/dot_general']
  with pytest.raises(SystemExit, match='no .*live-range'):
    memory_peak.peak_breakdown(str(tmp_path / 'empty'), 5)


@pytest.mark.slow
def test_memory_peak_runs_on_the_demo_model():
  # One CPU device, as a user runs it (conftest simulates 8, which batch 2 cannot be split over).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, 'bench/memory_peak.py', '--variant', 'demo', '--size', '64',
                        '--top', '5'], capture_output=True, text=True, cwd=REPO, timeout=900,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'XLA temp' in out.stdout and 'alive at the peak' in out.stdout
  assert 'jvp(' in out.stdout, out.stdout


def test_a_non_empty_dump_dir_is_refused_and_kept(tmp_path):
  (tmp_path / 'precious.txt').write_text('user data')
  out = subprocess.run([sys.executable, 'bench/memory_peak.py', '--dump_dir', str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2 and 'is not empty' in out.stderr, out.stderr[-2000:]
  assert (tmp_path / 'precious.txt').read_text() == 'user data'


def test_a_file_as_dump_dir_is_refused_and_kept(tmp_path):
  target = tmp_path / 'notes.txt'
  target.write_text('user data')
  out = subprocess.run([sys.executable, 'bench/memory_peak.py', '--dump_dir', str(target)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2 and 'is a file' in out.stderr, out.stderr[-2000:]
  assert target.read_text() == 'user data'


_NOT_POSITIVE = 'is not a positive integer'
_OFF_STRIDE = 'is not a multiple of 32 (the backbone stride)'


@pytest.mark.parametrize('script,flag,value,why', [
    ('train_step.py', '--sizes', '0', _NOT_POSITIVE),
    ('train_step.py', '--batch', '-3', _NOT_POSITIVE),
    ('profile_step.py', '--steps', 'x', _NOT_POSITIVE),
    ('memory_peak.py', '--top', '0', _NOT_POSITIVE),
    ('forward.py', '--iters', '0', _NOT_POSITIVE),
    ('bf16_curve.py', '--size', '-64', _NOT_POSITIVE),
    ('parts.py', '--iters', '0', _NOT_POSITIVE),
    ('train_step.py', '--sizes', '100', _OFF_STRIDE),
    ('train_step.py', '--device_size', '80', _OFF_STRIDE),
    ('forward.py', '--size', '50', _OFF_STRIDE),
    ('bf16_curve.py', '--size', '65', _OFF_STRIDE),
    ('memory_peak.py', '--size', '100', _OFF_STRIDE),
    ('parts.py', '--size', '80', _OFF_STRIDE)])
def test_bench_scripts_refuse_bad_counts_and_sizes_in_one_line(script, flag, value, why):
  out = subprocess.run([sys.executable, f'bench/{script}', flag, value], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].endswith(f"argument {flag}: '{value}' {why}")


def _run_bench(*argv, timeout=300):
  # One CPU device, as a user runs it (conftest simulates 8 for the in-process tests).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=timeout)


@pytest.mark.parametrize('variant,parts', [
    ('demo', ['backbone', 'ega', 'head', 'matmul', 'neck']),
    # HGNetv2's neck ends in the token connector (128 wide); ~20 s, so not in the default run.
    pytest.param('hgnetv2', ['head', 'neck'], marks=pytest.mark.slow)])
def test_parts_times_every_part(variant, parts):
  out = _run_bench('bench/parts.py', '--variant', variant, '--size', '64', '--iters', '1',
                   '--parts', *parts)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
  assert sorted(rows) == parts, out.stdout
  for name, row in rows.items():
    seconds, gflop = float(row[1]), float(row[row.index('GFLOP') - 1])
    assert seconds > 0 and gflop > 0, (name, row)
  bad = _run_bench('bench/parts.py', '--variant', 'demo', '--size', '80')
  assert bad.returncode == 2 and 'multiple of 32' in bad.stderr.splitlines()[-1], bad.stderr


@pytest.mark.slow  # two rounds of ours and torch on the demo model (~3 min)
def test_train_step_rounds_alternate_and_summarise():
  out = _run_bench('bench/train_step.py', '--variant', 'demo', '--sizes', '64', '--iters', '1',
                   '--rounds', '2')
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  starts = [line.split()[0] for line in lines if line.startswith(('ours ', 'torch '))]
  assert starts == ['ours', 'torch', 'ours', 'torch'], out.stdout
  summary = [line for line in lines if 'over 2 alternating rounds' in line]
  assert len(summary) == 1 and 'median' in summary[0] and 'best times' in summary[0], out.stdout


@pytest.mark.slow  # compiles and profiles the demo train step (~45 s)
def test_profile_step_writes_every_op_to_a_table(tmp_path):
  tsv = tmp_path / 'ops.tsv'
  out = _run_bench('bench/profile_step.py', '--variant', 'demo', '--size', '64', '--steps', '1',
                   '--top', '3', '--ops_tsv', str(tsv))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = tsv.read_text().splitlines()
  assert lines[0].split('\t') == ['seconds_per_step', 'name', 'opcode', 'fused', 'op_name']
  rows = [line.split('\t') for line in lines[1:]]
  assert len(rows) > 50 and all(float(r[0]) >= 0 for r in rows)
  assert any('backbone' in r[4] and 'transpose(' in r[4] for r in rows)  # backward ops, named


def test_profile_step_refuses_an_unwritable_table_before_compiling(tmp_path):
  for target in (tmp_path, tmp_path / 'missing' / 'ops.tsv'):
    out = _run_bench('bench/profile_step.py', '--variant', 'demo', '--ops_tsv', str(target),
                     timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert 'needs a file path in an existing directory' in out.stderr.splitlines()[-1]
