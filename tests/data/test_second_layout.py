"""The `second` layout: SECOND-style colour-coded land-cover maps -> binary label + targets."""

import json
import os

from array_record.python import array_record_data_source
import numpy as np
import pytest

from segchange_jax.data import convert
from segchange_jax.data import layouts
from segchange_jax.data import records

SIZE = 64
COLOURS = {i: np.array(c, np.uint8) for i, _, c in layouts.SECOND_CLASSES}
NAME = {i: n for i, n, _ in layouts.SECOND_CLASSES}
WATER, GROUND, LOW_VEG, TREE, BUILDING = 1, 2, 3, 4, 5


def class_maps(seed):
  """Two class maps with 0 outside the changed blocks and a few from->to pairs."""
  rng = np.random.default_rng(seed)
  one = np.zeros((SIZE, SIZE), np.uint8)
  two = np.zeros((SIZE, SIZE), np.uint8)
  blocks = [(LOW_VEG, BUILDING), (WATER, GROUND), (TREE, BUILDING)][:1 + seed % 3]
  for k, (src, dst) in enumerate(blocks):
    y, x = 4 + 20 * k, int(rng.integers(0, SIZE - 16))
    one[y:y + 12, x:x + 16], two[y:y + 12, x:x + 16] = src, dst
  return one, two


def write_fixture(write_png, root, split, names, seed=0):
  """Writes im1/im2 (random RGB) and label1/label2 colour maps; returns {name: (one, two)}."""
  out = {}
  for i, name in enumerate(names):
    rng = np.random.default_rng(seed + i)
    one, two = class_maps(seed + i)
    for sub in ('im1', 'im2'):
      write_png(os.path.join(root, split, sub, name),
                rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for sub, cls in (('label1', one), ('label2', two)):
      rgb = np.stack([COLOURS[c] for c in range(7)])[cls]
      write_png(os.path.join(root, split, sub, name), rgb)
    out[name] = (one, two)
  return out


def read_split(out, split):
  info = json.load(open(os.path.join(out, 'dataset_info.json')))
  src = array_record_data_source.ArrayRecordDataSource(
      [os.path.join(out, n) for n in info['splits'][split]['shards']])
  return {ex['file_name']: ex for ex in (records.decode(src[i]) for i in range(len(src)))}


def test_class_table_and_vocabulary():
  # Colours of the SECOND maps (ggsDing/Bi-SRNet datasets/RS_ST.py, ST_COLORMAP/ST_CLASSES).
  table = {n: c for _, n, c in layouts.SECOND_CLASSES}
  assert table == {'no change': (255, 255, 255), 'water': (0, 0, 255),
                   'ground': (128, 128, 128), 'low vegetation': (0, 128, 0),
                   'tree': (0, 255, 0), 'building': (128, 0, 0), 'playground': (255, 0, 0)}
  vocab = layouts.second_vocabulary()
  assert len(vocab) == len(set(vocab)) == 1 + 36 + 6 + 6
  assert vocab[0] == 'any change' and 'low vegetation -> building' in vocab
  assert 'any change to water' in vocab and 'any change from tree' in vocab


def test_second_converts_to_binary_label_and_directional_targets(tmp, helpers):
  root, out = os.path.join(tmp, 'second'), os.path.join(tmp, 'out')
  train = write_fixture(helpers.write_png, root, 'train', ['00001.png', '00002.png', '00003.png'])
  write_fixture(helpers.write_png, root, 'val', ['00010.png'], seed=10)
  pairs = layouts.list_pairs('second', root, 'train')
  assert pairs[0].semantic == (os.path.join(root, 'train', 'label1', '00001.png'),
                               os.path.join(root, 'train', 'label2', '00001.png'))
  info = convert.convert('second', root, out, ['train', 'val'])
  got = read_split(out, 'train')
  assert sorted(got) == sorted(train)
  for name, (one, two) in train.items():
    ex = got[name]
    changed = one != 0
    np.testing.assert_array_equal(ex['label'], changed.astype(np.uint8) * 255)
    targets = dict(ex['targets'])
    want = {'any change': changed}
    for src, dst in {(int(a), int(b)) for a, b in zip(one[changed], two[changed])}:
      want[f'{NAME[src]} -> {NAME[dst]}'] = (one == src) & (two == dst)
      want[f'any change to {NAME[dst]}'] = two == dst
      want[f'any change from {NAME[src]}'] = one == src
    assert set(targets) == set(want), name
    for prompt, mask in want.items():
      np.testing.assert_array_equal(targets[prompt] > 0, mask, err_msg=prompt)
    # Written in vocabulary order, so records of one scene always list targets alike.
    vocab = layouts.second_vocabulary()
    assert [p for p, _ in ex['targets']] == sorted(targets, key=vocab.index)
  # 00003 has tree -> building and low vegetation -> building: 'any change to building' is
  # their union.
  t3 = dict(got['00003.png']['targets'])
  np.testing.assert_array_equal(
      t3['any change to building'] > 0,
      (t3['tree -> building'] > 0) | (t3['low vegetation -> building'] > 0))
  assert info['splits']['train']['target_prompts']['low vegetation -> building'] == 3
  assert 'water -> ground' in info['target_prompts']


def test_unknown_colour_is_one_error_naming_file_and_colour(tmp, helpers):
  root = os.path.join(tmp, 'second')
  write_fixture(helpers.write_png, root, 'val', ['a.png', 'b.png'])
  bad = np.full((SIZE, SIZE, 3), 255, np.uint8)
  bad[:3, :2] = (250, 250, 250)     # anti-aliased white
  path = os.path.join(root, 'val', 'label2', 'b.png')
  helpers.write_png(path, bad)
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('second', root, os.path.join(tmp, 'o'), ['val'])
  msg = str(e.value)
  assert path in msg and '6 pixel(s)' in msg and 'RGB(250, 250, 250) x6' in msg
  assert 'not in the SECOND class table' in msg and 're-export the map' in msg
  # Non-strict: the bad pair is skipped and recorded, the good one converted.
  info = convert.convert('second', root, os.path.join(tmp, 'o2'), ['val'], strict=False)
  assert info['splits']['val']['num_examples'] == 1
  assert info['splits']['val']['skipped'][0]['file_name'] == 'b.png'


def test_second_missing_folder_names_the_layout(tmp):
  with pytest.raises(layouts.LayoutError, match=r'not a second layout.*im1,im2,label1,label2'):
    layouts.list_pairs('second', tmp, 'train')
