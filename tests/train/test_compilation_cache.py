"""The persistent compilation cache: a second process loads the step the first one compiled."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from segchange_jax.train import compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[2]

# One process: enable the cache, compile a small jitted function, and report jax's own cache
# events (counted by a monitoring listener, so the signal is jax's lookup, not a timing).
CHILD = r'''
import json, sys
import jax
import jax.numpy as jnp
from segchange_jax.train import compilation_cache
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(
    name, events.get(name, 0) + 1))
path = compilation_cache.enable(sys.argv[1])

@jax.jit
def step(x, w):
  for _ in range(3):
    x = jnp.tanh(x @ w)
  return x.sum()

print(step(jnp.ones((8, 16)), jnp.ones((16, 16))))
if len(sys.argv) > 2:  # switch directories: what compiles next goes to the second one
  compilation_cache.enable(sys.argv[2])
  print(step(jnp.ones((4, 16)), jnp.ones((16, 16))))
print('RESULT ' + json.dumps({
    'path': str(path), 'hits': events.get('/jax/compilation_cache/cache_hits', 0),
    'misses': events.get('/jax/compilation_cache/cache_misses', 0)}))
'''


def _run(*cache_dirs: str) -> dict:
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', CHILD, *cache_dirs], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


def test_second_process_hits_the_cache(tmp_path):
  cache = tmp_path / 'new' / 'xla'  # not there yet: enable() creates it
  first = _run(str(cache))
  assert first['path'] == str(cache.resolve())
  assert first['hits'] == 0 and first['misses'] >= 1
  entries = sorted(p.name for p in cache.iterdir())
  assert entries, 'the first process wrote nothing to the cache'
  second = _run(str(cache))
  assert second['hits'] >= 1 and second['misses'] == 0
  assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new compiled


def test_switching_directories(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  _run(str(one), str(two))
  steps = [[p for p in d.iterdir() if p.name.startswith('jit_step-')] for d in (one, two)]
  assert [len(s) for s in steps] == [1, 1]  # one shape each: the switch took effect


def test_empty_dir_means_off():
  assert compilation_cache.enable('') is None


def test_a_file_is_not_a_cache_dir(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(NotADirectoryError, match='compilation_cache_dir'):
    compilation_cache.enable(str(f))

