"""JAX's persistent compilation cache: compiled executables kept on disk between processes.

Compiling the Swin-B train step takes minutes; a restarted or resumed run (a preempted VM, a
new learning rate, an evaluation job) compiles the same step again. With the cache on, XLA's
executable is written under `cache_dir` keyed by the computation, the compile options, the
devices and the jax / jaxlib versions, and a later process with the same key loads it instead of
compiling. A changed model, shape, dtype, mesh or jax version is a new key, so a stale entry is
never used, only left behind.

The directory must be trusted: loading an entry runs the code in it (jax's warning).
"""

from __future__ import annotations

import pathlib


def enable(cache_dir: str) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on in `cache_dir` (created); '' leaves it off.

  Call before the first jitted function compiles in this process (a later call works too, but
  what compiled before it is not cached). Returns the absolute cache directory, or None when
  `cache_dir` is ''.
  """
  if not cache_dir:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(cache_dir).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f'compilation cache dir {path} is a file: give a directory '
                             "(config.train.compilation_cache_dir, or '' for no cache)")
  path.mkdir(parents=True, exist_ok=True)
  current = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', str(path))
  # jax's defaults skip executables that compiled in under a second; the cache is for whole
  # programs we run again (train and eval steps), so keep every one: small ones cost little disk.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  if current and current != str(path):
    # jax opens its cache once per process at the first compile: point it at the new directory.
    from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
    cc.reset_cache()
  return path
