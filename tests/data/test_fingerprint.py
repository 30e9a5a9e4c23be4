"""data/fingerprint.py: stable across re-conversions of the same data, changed by any shard."""

import json
import shutil

import pytest

from segchange_jax.data import fingerprint
from segchange_jax.data import input_pipeline


def _shards(tmp_path, name='shards', payload=b'records'):
  d = tmp_path / name
  d.mkdir()
  (d / 'train-00000-of-00001.array_record').write_bytes(payload)
  (d / 'test-00000-of-00001.array_record').write_bytes(b'test records')
  info = {'created': '2026-01-01T00:00:00', 'source_root': str(tmp_path / 'raw'), 'tile': 0,
          'splits': {'train': {'num_examples': 3, 'shards': ['train-00000-of-00001.array_record']},
                     'test': {'num_examples': 1, 'shards': ['test-00000-of-00001.array_record']}}}
  (d / 'dataset_info.json').write_text(json.dumps(info))
  return d


def test_same_data_converted_again_elsewhere_has_the_same_fingerprint(tmp_path):
  a = fingerprint.fingerprint(str(_shards(tmp_path)))
  b_dir = _shards(tmp_path, 'again')
  info = json.loads((b_dir / 'dataset_info.json').read_text())
  info['created'], info['source_root'] = '2027-05-05T12:00:00', '/elsewhere/raw'
  (b_dir / 'dataset_info.json').write_text(json.dumps(info))
  assert fingerprint.fingerprint(str(b_dir)) == a
  assert a['splits'] == {'test': 1, 'train': 3} and len(a['sha256']) == 64


def test_a_changed_shard_or_info_field_changes_it(tmp_path):
  base = fingerprint.fingerprint(str(_shards(tmp_path)))
  assert fingerprint.fingerprint(str(_shards(tmp_path, 'b', b'records+'))) != base
  c = _shards(tmp_path, 'c')
  info = json.loads((c / 'dataset_info.json').read_text())
  info['tile'] = 256
  (c / 'dataset_info.json').write_text(json.dumps(info))
  assert fingerprint.fingerprint(str(c)) != base


def test_a_missing_shard_is_named(tmp_path):
  d = _shards(tmp_path)
  (d / 'test-00000-of-00001.array_record').unlink()
  with pytest.raises(input_pipeline.InputError, match='test-00000-of-00001.array_record'):
    fingerprint.fingerprint(str(d))
  shutil.rmtree(d)
  with pytest.raises(input_pipeline.InputError, match='does not exist'):
    fingerprint.fingerprint(str(d))
