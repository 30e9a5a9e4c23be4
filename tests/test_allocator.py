"""segchange_jax.allocator: which allocator a process runs with, and the CPU advice."""

import os
import subprocess
import sys

import pytest

from segchange_jax import allocator


def _maps(tmp_path, *libs):
  p = tmp_path / 'maps'
  p.write_text(''.join(f'7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/{l}\n' for l in libs))
  return str(p)


def test_loaded_reads_the_mapped_libraries(tmp_path):
  assert allocator.loaded(_maps(tmp_path, 'libc.so.6')) == 'system'
  tcmalloc = _maps(tmp_path, 'libc.so.6', 'libtcmalloc_minimal.so.4.5.10')
  assert allocator.loaded(tcmalloc) == 'tcmalloc'
  assert allocator.loaded(_maps(tmp_path, 'libjemalloc.so.2')) == 'jemalloc'
  assert allocator.loaded(str(tmp_path / 'missing')) == 'system'


def test_hint_only_for_large_cpu_steps_on_glibc(tmp_path):
  glibc, tc = _maps(tmp_path, 'libc.so.6'), None
  msg = allocator.hint(8 * 2**30, 'cpu', glibc)
  assert msg and 'TCMALLOC_RELEASE_RATE=0' in msg and '8.0 GB' in msg and 'LD_PRELOAD' in msg
  assert allocator.hint(8 * 2**30, 'gpu', glibc) is None  # device memory has its own allocator
  assert allocator.hint(100 * 2**20, 'cpu', glibc) is None  # small steps: not worth a warning
  tc = _maps(tmp_path, 'libtcmalloc_minimal.so.4')
  assert allocator.hint(8 * 2**30, 'cpu', tc) is None


def test_missing_library_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(allocator, 'library_path', lambda name: None)
  with pytest.raises(FileNotFoundError, match='apt-get install libjemalloc2'):
    allocator.preload_env('jemalloc')
  assert allocator.preload_env('system') == {}


@pytest.mark.parametrize('name', ['tcmalloc', 'jemalloc'])
def test_preloaded_child_reports_it(name):
  if allocator.library_path(name) is None:
    pytest.skip(f'{name} is not installed on this machine')
  code = 'from segchange_jax import allocator; print(allocator.loaded())'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, **allocator.preload_env(name)}).stdout
  assert out.strip() == name
