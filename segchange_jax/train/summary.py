"""Metric logging for drivers: `metrics.csv` plus TensorBoard event files, process 0 only."""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Mapping

import jax

from segchange_jax import atomic
from segchange_jax import paths


class MetricWriter:
  """Appends scalars to `<workdir>/metrics.csv` and TensorBoard events under `<workdir>/tb`.

  The CSV has one row per (step, split) with a column per metric name, so it loads directly
  into pandas. `workdir` may be local or gs:// (see segchange_jax.paths); GCS objects cannot
  be appended to, so there the file is rewritten on each write. On processes other than 0
  every call is a no-op.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._remote = paths.is_remote(workdir)
    workdir = paths.resolve(workdir)
    self._csv_path = workdir / 'metrics.csv'
    self._tb = None
    if self.enabled:
      workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.fspath(workdir / 'tb'))

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Logs `scalars` for `split` ('train', 'val', 'test') at `step`."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      if math.isfinite(value):
        self._tb.add_scalar(f'{split}/{name}', value, step)
    self._append_csv({'step': step, 'split': split, **scalars})

  def drop_after(self, step: int) -> int:
    """Removes CSV rows logged after `step` (a resumed run logs them again); returns how many.

    A process killed between checkpoints has logged steps that the resumed run repeats.
    """
    if not self.enabled:
      return 0
    header, rows = self._read()
    keep = [r for r in rows if int(r['step']) <= step]
    if header is not None and len(keep) != len(rows):
      self._rewrite(header, keep)
    return len(rows) - len(keep)

  def _read(self) -> tuple[list[str] | None, list[dict]]:
    if not self._csv_path.exists():
      return None, []
    reader = csv.DictReader(io.StringIO(self._csv_path.read_text()))
    rows = list(reader)
    return (list(reader.fieldnames) if reader.fieldnames else None), rows

  def _rewrite(self, header: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(self._csv_path, buf.getvalue())

  def _append_csv(self, row: dict) -> None:
    header = None
    if not self._remote and self._csv_path.exists():
      with open(self._csv_path, newline='') as f:
        header = next(csv.reader(f), None)
      if header is not None and set(row) <= set(header):
        with open(self._csv_path, 'a', newline='') as f:
          csv.DictWriter(f, fieldnames=header).writerow(row)
        return
    # New file, a new metric (rewrite with the union of columns) or GCS (no appends).
    header, rows = self._read()
    header = list(header or []) + [k for k in row if k not in (header or [])]
    self._rewrite(header, rows + [row])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
