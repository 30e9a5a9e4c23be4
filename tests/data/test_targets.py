"""Per-prompt targets: record format, synthetic scene targets, conversion and TFDS shards."""

import hashlib
import json
import os

from array_record.python import array_record_data_source
import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from segchange_jax.data import convert
from segchange_jax.data import layouts
from segchange_jax.data import records
from segchange_jax.data import synthetic


def _pngs(size=(8, 12)):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  label = np.where(rng.random(size) > 0.5, 255, 0).astype(np.uint8)
  return a, b, label


def read_split(out, split):
  info = json.load(open(os.path.join(out, 'dataset_info.json')))
  paths = [os.path.join(out, n) for n in info['splits'][split]['shards']]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return {ex['file_name']: ex for ex in (records.decode(src[i]) for i in range(len(src)))}


def test_record_roundtrip_with_targets_and_old_records():
  a, b, label = _pngs()
  enc = records.encode_png
  masks = {'new buildings': label, 'removed roads': 255 - label}
  rec = records.serialize(enc(a), enc(b), enc(label), 'x.png', 'Road changes.',
                          [(p, enc(m)) for p, m in masks.items()])
  ex = records.decode(rec)
  np.testing.assert_array_equal(ex['image_a'], a)
  np.testing.assert_array_equal(ex['label'], label)
  assert ex['prompt'] == 'Road changes.' and ex['file_name'] == 'x.png'
  assert [p for p, _ in ex['targets']] == list(masks)     # order kept
  for (p, m), want in zip(ex['targets'], masks.values()):
    np.testing.assert_array_equal(m, want)
  assert [p for p, _ in records.parse(rec)['targets']] == list(masks)
  # A record without targets (every shard written before they existed) has exactly the old
  # features and decodes with targets == [], every other field as before.
  old = records.serialize(enc(a), enc(b), enc(label), 'x.png', 'p')
  assert old == records.serialize(enc(a), enc(b), enc(label), 'x.png', 'p', targets=[])
  assert set(tf_example_pb2.Example.FromString(old).features.feature) == set(records.FEATURES)
  ex = records.decode(old)
  assert ex['targets'] == [] and ex['prompt'] == 'p'
  np.testing.assert_array_equal(ex['image_b'], b)


@pytest.mark.parametrize('targets,match', [
    ([('new roads', 'm'), ('new roads', 'm')], "duplicate target prompt.*'new roads'"),
    ([('  ', 'm')], 'empty target prompt'),
    ([('new roads', 'small')], r'target mask size.*\(4, 4\).*differ from the image size \(8, 12\)'),
])
def test_bad_targets_are_one_error_naming_the_record(targets, match):
  a, b, label = _pngs()
  enc = records.encode_png
  pngs = {'m': enc(label), 'small': enc(np.zeros((4, 4), np.uint8))}
  with pytest.raises(records.RecordError, match=match) as e:
    records.serialize(enc(a), enc(b), enc(label), 'bad.png', '', [(p, pngs[m]) for p, m in targets])
  assert "record 'bad.png'" in str(e.value) and 're-create the shards' in str(e.value)


def test_decode_rejects_bad_targets_written_by_another_tool():
  a, b, label = _pngs()
  enc = records.encode_png
  example = tf_example_pb2.Example.FromString(records.serialize(enc(a), enc(b), enc(label),
                                                                'y.png', ''))
  feature = example.features.feature
  feature[records.TARGET_PROMPTS].bytes_list.value.extend([b'a', b'b'])
  feature[records.TARGET_MASKS].bytes_list.value.extend([enc(label), enc(label[:4])])
  with pytest.raises(records.RecordError, match=r"record 'y.png'.*mask size"):
    records.decode(example.SerializeToString())
  feature[records.TARGET_MASKS].bytes_list.value.pop()
  with pytest.raises(records.RecordError, match='2 target prompts but 1 target masks'):
    records.parse(example.SerializeToString())


def test_synthetic_scenes_unchanged_and_targets_partition_the_label():
  # Images, labels and prompts as the generator made them before targets existed (digest
  # taken from that version): the demo's data, and so its numbers, do not move.
  h = hashlib.sha256()
  for i in range(6):
    a, b, label, prompt = synthetic.make_scene(0, i, 64)
    for x in (a, b, label):
      h.update(x.tobytes())
    h.update(prompt.encode())
  assert h.hexdigest() == 'e12605e5f4890ade37cb1217217c2c81d1a882df21b0fc0e9e7fbbe422923752'
  seen = set()
  for i in range(30):
    a, b, label, prompt, targets = synthetic.make_scene_with_targets(0, i, 96)
    assert list(targets) == [p for p in synthetic.PROMPT_VOCABULARY if p in targets]
    np.testing.assert_array_equal(targets[synthetic.ANY_CHANGE], label)
    kinds = [m for p, m in targets.items() if p != synthetic.ANY_CHANGE]
    assert all(m.any() and set(np.unique(m)) <= {0, 255} for m in kinds)  # only those occurring
    union = np.any([m > 0 for m in kinds], axis=0) if kinds else np.zeros_like(label, bool)
    np.testing.assert_array_equal(union, label > 0)
    seen.update(targets)
  assert seen == set(synthetic.PROMPT_VOCABULARY)  # every (kind, direction) occurs somewhere


def test_target_direction_follows_the_dates():
  # A demolished building is visible in A where its mask is; a new one in B. The building
  # roof is brighter/redder than ground on average, so compare the two dates inside each mask.
  checked = 0
  for i in range(40):
    a, b, _, _, targets = synthetic.make_scene_with_targets(0, i, 96)
    for prompt, date_with in (('new buildings', b), ('demolished buildings', a)):
      if prompt in targets:
        other = a if date_with is b else b
        m = targets[prompt] > 0
        # The date that has the building differs from the ground texture of the other by a lot
        # more than the unchanged pixels differ between dates.
        diff = np.abs(date_with[m].astype(int) - other[m].astype(int)).mean()
        assert diff > 10, (i, prompt, diff)
        checked += 1
  assert checked > 10


def test_generate_convert_and_read_targets(tmp):
  raw, out = os.path.join(tmp, 'raw'), os.path.join(tmp, 'out')
  synthetic.generate(raw, n=8, size=48, seed=1)
  listing = json.load(open(os.path.join(raw, 'train', 'targets.json')))
  assert sorted(listing) == sorted(os.listdir(os.path.join(raw, 'train', 'A')))
  rel = listing['train_00000.png'][synthetic.ANY_CHANGE]
  assert rel == 'targets/train_00000/any_change.png'
  pairs = layouts.list_pairs('segchange-default', raw, 'train')
  assert [p for p, _ in pairs[0].targets] == list(listing['train_00000.png'])
  info = convert.convert('segchange-default', raw, out, ['train', 'val'], workers=1)
  got = read_split(out, 'train')
  for name, targets in listing.items():
    _, _, label, _, want = synthetic.make_scene_with_targets(1, int(name[6:11]), 48)
    ex = got[name]
    np.testing.assert_array_equal(ex['label'], label)
    assert [p for p, _ in ex['targets']] == list(targets) == list(want)
    for (_, mask), ref in zip(ex['targets'], want.values()):
      np.testing.assert_array_equal(mask, ref)
  # Every target prompt is listed, so the prompt-embedding table can include them.
  all_targets = {p for t in listing.values() for p in t}
  assert set(info['splits']['train']['target_prompts']) == all_targets
  assert info['splits']['train']['target_prompts'][synthetic.ANY_CHANGE] == len(listing)
  assert set(info['target_prompts']) >= all_targets
  # "prompts" keeps its meaning: the records' own prompts (prompts.txt), nothing added.
  assert set(info['prompts']) == set(layouts.read_prompts(
      os.path.join(raw, 'train', 'prompts.txt')).values()) | set(layouts.read_prompts(
          os.path.join(raw, 'val', 'prompts.txt')).values())


def test_dataset_without_targets_converts_as_before(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(os.path.join(root, 'train'), ['x1.png', 'x2.png'])
  info = convert.convert('segchange-default', root, os.path.join(tmp, 'o'), ['train'])
  got = read_split(os.path.join(tmp, 'o'), 'train')
  assert all(got[name]['targets'] == [] for name in pairs)
  # Byte-identical to the single-label record the converter always wrote.
  src = array_record_data_source.ArrayRecordDataSource(
      [os.path.join(tmp, 'o', s) for s in info['splits']['train']['shards']])
  enc = records.encode_png
  written = {records.parse(src[i])['file_name']: src[i] for i in range(len(src))}
  for name, (a, b, label) in pairs.items():
    assert written[name] == records.serialize(enc(a), enc(b), enc(label), name, '')
  assert info['target_prompts'] == [] and info['splits']['train']['target_prompts'] == {}


def test_bad_targets_on_disk_are_named(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  helpers.write_folder(os.path.join(root, 'val'), ['v1.png', 'v2.png'])
  helpers.write_png(os.path.join(root, 'val', 'masks', 'small.png'), np.zeros((5, 5), np.uint8))
  helpers.write_png(os.path.join(root, 'val', 'masks', 'ok.png'), np.zeros((32, 32), np.uint8))
  with open(os.path.join(root, 'val', 'targets.json'), 'w') as f:
    json.dump({'v1.png': {'new roads': 'masks/small.png'},
               'v2.png': {'new roads': 'masks/ok.png', 'gone': 'masks/missing.png'}}, f)
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('segchange-default', root, os.path.join(tmp, 'o'), ['val'])
  msg = str(e.value)
  assert "v1.png: target mask 'new roads' size (5, 5) differs from image size (32, 32)" in msg
  assert 'small.png' in msg and "target mask 'gone': missing label" in msg
  assert 'masks/missing.png' in msg
  with open(os.path.join(root, 'val', 'targets.json'), 'w') as f:
    f.write('{"v1.png": ["not", "a", "dict"]}')
  with pytest.raises(layouts.LayoutError, match=r"targets.json: entry 'v1.png'"):
    layouts.list_pairs('segchange-default', root, 'val')
  with open(os.path.join(root, 'val', 'targets.json'), 'w') as f:
    f.write('{"v1.png": {"new roads": "masks/ok.png", "new roads": "masks/small.png"}}')
  with pytest.raises(layouts.LayoutError, match=r"\['new roads'\] given more than once"):
    layouts.list_pairs('segchange-default', root, 'val')
