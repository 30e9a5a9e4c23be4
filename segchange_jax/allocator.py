"""Host memory allocator check: XLA:CPU and PyTorch's CPU steps allocate their multi-GB working
set afresh on every step. glibc's malloc serves such blocks with mmap and returns them on free,
so each step page-faults and zeroes the whole working set again. tcmalloc or jemalloc with
decay off keep the pages, and both frameworks' steps run faster (bench/README.md, "Host
allocator (CPU)", has the figures). Preloading is the user's choice (an environment variable
set before Python starts); this module only detects it and says how.
"""

from __future__ import annotations

import glob

# What `bench/train_step.py --allocator` and the README use; both keep freed pages.
PRELOAD_ENV = {
    'tcmalloc': {'TCMALLOC_RELEASE_RATE': '0'},
    'jemalloc': {'MALLOC_CONF': 'dirty_decay_ms:-1,muzzy_decay_ms:-1'},
}
_LIBS = {'tcmalloc': 'libtcmalloc_minimal.so.4', 'jemalloc': 'libjemalloc.so.2'}
_DEBIAN = {'tcmalloc': 'libtcmalloc-minimal4', 'jemalloc': 'libjemalloc2'}


def library_path(name: str) -> str | None:
  """Installed shared library of allocator `name` ('tcmalloc' or 'jemalloc'), or None."""
  hits = sorted(glob.glob(f'/usr/lib/*/{_LIBS[name]}') + glob.glob(f'/usr/lib/{_LIBS[name]}') +
                glob.glob(f'/usr/local/lib/{_LIBS[name]}'))
  return hits[0] if hits else None


def preload_env(name: str) -> dict[str, str]:
  """Environment for a child process that runs with allocator `name` ('system': none)."""
  if name == 'system':
    return {}
  path = library_path(name)
  if path is None:
    raise FileNotFoundError(f'{_LIBS[name]} not found: install it (Debian/Ubuntu: apt-get install '
                            f'{_DEBIAN[name]}) or choose another allocator')
  return {'LD_PRELOAD': path, **PRELOAD_ENV[name]}


def loaded(maps_file: str = '/proc/self/maps') -> str:
  """'tcmalloc', 'jemalloc' or 'system': the allocator this process runs with."""
  try:
    with open(maps_file) as f:
      maps = f.read()
  except OSError:
    return 'system'
  for name, lib in _LIBS.items():
    if lib.split('.so')[0] in maps:
      return name
  return 'system'


def hint(working_set_bytes: float, platform: str, maps_file: str = '/proc/self/maps') -> str | None:
  """A one-line suggestion when a CPU step with a large working set runs on glibc malloc."""
  if platform != 'cpu' or working_set_bytes < 2**30 or loaded(maps_file) != 'system':
    return None
  lib = library_path('tcmalloc')
  how = (f'LD_PRELOAD={lib} TCMALLOC_RELEASE_RATE=0' if lib else
         'apt-get install libtcmalloc-minimal4, then LD_PRELOAD=<its libtcmalloc_minimal.so.4> '
         'TCMALLOC_RELEASE_RATE=0')
  return (f'the step allocates a {working_set_bytes / 2**30:.1f} GB working set on every call and '
          f'glibc malloc page-faults all of it each time; start with {how} for faster CPU steps '
          '(README "Performance")')
