"""Metric logging for drivers: `metrics.csv` plus TensorBoard event files, process 0 only."""

from __future__ import annotations

import csv
import math
import os
from typing import Mapping

import jax


class MetricWriter:
  """Appends scalars to `<workdir>/metrics.csv` and TensorBoard events under `<workdir>/tb`.

  The CSV has one row per (step, split) with a column per metric name, so it loads directly
  into pandas. On processes other than 0 every call is a no-op.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._csv_path = os.path.join(workdir, 'metrics.csv')
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Logs `scalars` for `split` ('train', 'val', 'test') at `step`."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      if math.isfinite(value):
        self._tb.add_scalar(f'{split}/{name}', value, step)
    self._append_csv({'step': step, 'split': split, **scalars})

  def _append_csv(self, row: dict) -> None:
    header = None
    if os.path.exists(self._csv_path):
      with open(self._csv_path, newline='') as f:
        header = next(csv.reader(f), None)
    if header is not None and not set(row) <= set(header):
      # A new metric appeared: rewrite the file with the union of columns.
      with open(self._csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
      header = header + [k for k in row if k not in header]
      with open(self._csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    if header is None:
      header = list(row)
      with open(self._csv_path, 'w', newline='') as f:
        csv.DictWriter(f, fieldnames=header).writeheader()
    with open(self._csv_path, 'a', newline='') as f:
      csv.DictWriter(f, fieldnames=header).writerow(row)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
