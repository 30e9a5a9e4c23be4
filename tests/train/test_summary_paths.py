"""metrics.csv writing (local and the rewrite path used on GCS), resume truncation, gs:// checks."""

import csv

import pytest

from segchange_jax import paths
from segchange_jax.train import summary


def _rows(workdir):
  with open(workdir / 'metrics.csv', newline='') as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize('remote', [False, True])
def test_metrics_csv_columns_and_drop_after(tmp_path, remote):
  writer = summary.MetricWriter(str(tmp_path), enabled=True)
  writer._remote = remote   # pylint: disable=protected-access  # GCS: rewrite, never append
  writer.write(1, 'train', {'loss': 1.0})
  writer.write(2, 'train', {'loss': 0.5})
  writer.write(2, 'val', {'f1': 0.25})          # a new column: the file is rewritten
  writer.write(3, 'train', {'loss': 0.25})
  rows = _rows(tmp_path)
  assert [(r['step'], r['split']) for r in rows] == [('1', 'train'), ('2', 'train'), ('2', 'val'),
                                                     ('3', 'train')]
  assert rows[2]['f1'] == '0.25' and rows[2]['loss'] == '' and rows[3]['loss'] == '0.25'
  # A run resumed from step 2 logs step 3 again: the stale row goes first.
  assert writer.drop_after(2) == 1
  assert [r['step'] for r in _rows(tmp_path)] == ['1', '2', '2']
  assert writer.drop_after(2) == 0
  writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
  writer = summary.MetricWriter(str(tmp_path / 'w'), enabled=False)
  writer.write(1, 'train', {'loss': 1.0})
  assert writer.drop_after(0) == 0 and not (tmp_path / 'w').exists()


def test_gcs_paths_stay_urls_and_fail_early_without_a_backend(monkeypatch, tmp_path):
  assert str(paths.resolve('gs://bucket/runs/x') / 'metrics.csv') == 'gs://bucket/runs/x/metrics.csv'
  assert paths.is_remote('gs://b/x') and not paths.is_remote('/shared/x')
  paths.check_writable(tmp_path / 'runs' / 'x', '--workdir')   # local, not there yet: created later
  monkeypatch.setattr(paths, '_installed', lambda module: False)
  with pytest.raises(ValueError, match=r"--workdir='gs://b/x'.*segchange_jax\[gcs\]"):
    paths.check_writable('gs://b/x', '--workdir')
  with pytest.raises(ValueError, match='gcsfuse --implicit-dirs b /mnt/b'):
    paths.check_local_readable('gs://b/shards', 'config.data.shards_dir')
