"""Outputs that never destroy a user's file: checks before, temporary names while writing.

Every command that writes files (infer, evaluate, export, embed_prompts, convert_torch) goes
through this module:
- `check_output(path, inputs, overwrite)` refuses an output that resolves to any input
  (symlinks and hard links included) and an existing output unless `overwrite`;
  `check_output_dir` the same for an output folder, where an existing empty folder is fine.
- `atomic_path(path)` / `atomic_open(path)` / `atomic_dir(path)` hand out a temporary name in the
  output's own directory (same filesystem, so the final `os.replace` is atomic) and rename it
  only when the block finished without an exception; on failure the temporary is removed. A
  reader therefore sees either the old file or the complete new one, never a partial one.
- `Outputs` does the same for several files that belong together (mask, vectors, preview): all
  are renamed at the end, or none.
Temporary names keep the final extension (`.x.tif.partial-1234.tif`) because GDAL and
OGR pick the format from it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterable, Iterator


class OutputError(ValueError):
  """An output path would destroy an input or an existing file; the message names the flag."""


def _same_file(a: str, b: str) -> bool:
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)  # hard links, bind mounts
  except OSError:
    return False


def check_output(path: str, inputs: Iterable[str] = (), overwrite: bool = False,
                 flag: str = '--out') -> str:
  """Raises OutputError if `path` is one of `inputs` or exists (without `overwrite`)."""
  if not path:
    raise OutputError(f'{flag} is empty; give an output path')
  for inp in inputs:
    if inp and _same_file(path, inp):
      raise OutputError(f'{flag} {path} is the input {inp}; writing it would destroy the input. '
                        f'Choose another {flag}')
  if os.path.lexists(path) and not overwrite:
    raise OutputError(f'{flag} {path} already exists; pass --overwrite to replace it or choose '
                      f'another {flag}')
  return path


def check_output_dir(path: str, inputs: Iterable[str] = (), overwrite: bool = False,
                     flag: str = '--out') -> str:
  """`check_output` for an output folder: an existing empty folder is not refused."""
  empty = os.path.isdir(path) and not os.listdir(path)
  return check_output(path, inputs, overwrite or empty, flag)


def check_distinct(paths: dict[str, str]) -> None:
  """Refuses two outputs (flag -> path) that name the same file."""
  seen: dict[str, str] = {}
  for flag, p in paths.items():
    if not p:
      continue
    real = os.path.realpath(p)
    if real in seen:
      raise OutputError(f'{flag} and {seen[real]} both name {p}; give each output its own path')
    seen[real] = flag


def temp_name(path: str) -> str:
  """A fresh temporary path beside `path`, with the same extension."""
  path = os.path.abspath(path)
  folder, base = os.path.split(path)
  os.makedirs(folder, exist_ok=True)
  ext = os.path.splitext(base)[1]
  fd, tmp = tempfile.mkstemp(prefix=f'.{base}.partial-', suffix=ext, dir=folder)
  os.close(fd)
  os.remove(tmp)  # writers (GDAL, OGR) create the file themselves
  return tmp


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _replace(tmp: str, path: str) -> None:
  if os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
    # os.replace cannot replace a non-empty directory: move the old one aside first.
    old = temp_name(path)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)


class Outputs:
  """Temporary names for several outputs, all renamed by `commit()` or removed by `discard()`."""

  def __init__(self):
    self._pending: list[tuple[str, str]] = []

  def path(self, final: str) -> str:
    tmp = temp_name(final)
    self._pending.append((tmp, final))
    return tmp

  def commit(self) -> None:
    for tmp, final in self._pending:
      _replace(tmp, final)
    self._pending = []

  def discard(self) -> None:
    for tmp, _ in self._pending:
      _remove(tmp)
    self._pending = []

  def __enter__(self) -> 'Outputs':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.discard()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path; renamed to `path` when the block succeeds, else removed."""
  with Outputs() as out:
    yield out.path(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs) -> Iterator[IO]:
  """`open(path, mode)` on a temporary name, renamed to `path` when the block succeeds."""
  with atomic_path(path) as tmp:
    with open(tmp, mode, **kwargs) as f:
      yield f


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """Yields a fresh temporary directory, renamed to `path` when the block succeeds."""
  with atomic_path(path) as tmp:
    os.makedirs(tmp)
    yield tmp


def write_text(path, text: str) -> None:
  """Writes `text` to an epath/pathlib path: atomically when local (gs:// objects appear whole
  anyway)."""
  if '://' in str(path):
    path.write_text(text)
  else:
    with atomic_open(str(path)) as f:
      f.write(text)
