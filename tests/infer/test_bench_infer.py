"""bench/infer.py runs as documented (its flags are its own, defaults from default_config)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_bench_infer_times_both_loops_on_a_small_scene(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-m', 'bench.infer', '--sizes', '256', '--window', '128',
                        '--overlap', '32', f'--workdir={tmp_path}'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split()[0] for line in out.stdout.splitlines() if 'MP/s' in line]
  assert rows == ['engine', 'upstream'], out.stdout
  assert (tmp_path / 'engine_256.tif').exists() and (tmp_path / 'upstream_256.tif').exists()
