"""Run directories on a local or shared filesystem, or on Google Cloud Storage (gs://).

Workdirs (metrics.csv, config.json, TensorBoard events, Orbax checkpoints) go through
`etils.epath`, so `--workdir gs://bucket/runs/x` works once a GCS backend is installed
(`pip install 'segchange_jax[gcs]'`: gcsfs for epath, google-cloud-storage for TensorBoard
events; Orbax writes the arrays through TensorStore). Training shards are read by ArrayRecord,
which opens local paths only: mount the bucket with gcsfuse and point data.shards_dir there.
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

REMOTE_PREFIXES = ('gs://',)
_GCS_HINT = "pip install 'segchange_jax[gcs]' (gcsfs and google-cloud-storage)"


def is_remote(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def resolve(path: str | os.PathLike) -> epath.Path:
  """An absolute local path or a gs:// path, as an epath.Path."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:   # a parent package is missing
    return False


def check_writable(path: str | os.PathLike, what: str) -> None:
  """Fails early, naming `what` and the fix, when `path` cannot become a run directory: a local
  path that is (or lies under) a file or an unwritable directory, a gs:// path with no backend."""
  if not is_remote(path):
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):  # the deepest part of the path that exists
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise ValueError(f'{what}={os.fspath(path)!r}: {existing} is a file, not a directory '
                       f'(left as it is); choose another {what}')
    if not os.access(existing, os.W_OK | os.X_OK):
      raise ValueError(f'{what}={os.fspath(path)!r}: directory {existing} is not writable by '
                       f'this user; choose another {what} or fix its permissions')
    return
  missing = []
  if not (_installed('gcsfs') or _installed('tensorflow')):
    missing.append('gcsfs (etils.epath: metrics.csv, config.json, checkpoint metadata)')
  if not _installed('google.cloud.storage'):
    missing.append('google-cloud-storage (TensorBoard events)')
  if missing:
    verb = 'is' if len(missing) == 1 else 'are'
    raise ValueError(f'{what}={os.fspath(path)!r} is on GCS but {" and ".join(missing)} '
                     f'{verb} not installed: {_GCS_HINT}, or use a local/shared path')


def check_local_readable(path: str | os.PathLike, what: str) -> None:
  """ArrayRecord shards cannot be read from gs:// directly: say how to mount them."""
  if is_remote(path):
    bucket = os.fspath(path)[len('gs://'):].split('/', 1)[0]
    raise ValueError(
        f'{what}={os.fspath(path)!r}: ArrayRecord shards are read from local paths only. '
        f'Mount the bucket on every host (gcsfuse --implicit-dirs {bucket} /mnt/{bucket}) '
        f'and pass the mounted folder, e.g. /mnt/{bucket}/...')
