"""data/leaks.py and the converter's --on_leak: copies of train pairs in test are found, by kind.

The fixture (segchange-default layout, 128 px scenes of segchange_jax.data.synthetic): train
holds 8 scenes; test holds an exact copy of train scene 0 (re-saved losslessly), a JPEG
(quality 75) copy of scene 1, a 4 px shifted crop of scene 2 (edge-padded back to size) and a
+25 % brightness copy of scene 3, plus 3 other scenes of the same generator; val holds 2 more.
"""

import json
import os

import cv2
import numpy as np
import pytest

from segchange_jax.data import convert
from segchange_jax.data import leaks
from segchange_jax.data import synthetic
from tests.data.test_convert import read_split

SIZE = 128
TRAIN = list(range(8))
OTHERS = {'test': [100, 101, 102], 'val': [200, 201]}


def _scene(i):
  a, b, label, _ = synthetic.make_scene(0, i, SIZE)
  return a, b, label


def _jpeg(img, quality=75):
  ok, buf = cv2.imencode('.jpg', img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def _shift(img, d=4):
  """Crops d px off the left edge and pads the right edge back (a d px shift)."""
  pad = ((0, 0), (0, d)) + ((0, 0),) * (img.ndim - 2)
  return np.pad(img[:, d:], pad, mode='edge')


def _brighter(img, gain=1.25):
  return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _write(root, split, name, a, b, label, ext='.png', level=3):
  stem = os.path.splitext(name)[0]
  for sub, arr, e in (('A', a, ext), ('B', b, ext), ('label', label, '.png')):
    os.makedirs(os.path.join(root, split, sub), exist_ok=True)
    arr = arr[..., ::-1] if arr.ndim == 3 else arr
    params = [cv2.IMWRITE_JPEG_QUALITY, 75] if e == '.jpg' else [cv2.IMWRITE_PNG_COMPRESSION,
                                                                 level]
    assert cv2.imwrite(os.path.join(root, split, sub, stem + e), arr, params)


# name in test -> (train scene it copies, kind expected)
COPIES = {'exact.png': (0, 'exact'), 'jpeg.jpg': (1, 'near'), 'shift.png': (2, 'near'),
          'bright.png': (3, 'near')}


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('leaks') / 'raw')
  for i in TRAIN:
    _write(root, 'train', f'train_{i}.png', *_scene(i))
  a, b, label = _scene(0)
  _write(root, 'test', 'exact.png', a, b, label, level=9)  # same pixels, other file bytes
  a, b, label = _scene(1)
  _write(root, 'test', 'jpeg.jpg', a, b, label, ext='.jpg')
  _write(root, 'test', 'shift.png', *(_shift(x) for x in _scene(2)))
  a, b, label = _scene(3)
  _write(root, 'test', 'bright.png', _brighter(a), _brighter(b), label)
  for split, scenes in OTHERS.items():
    for i in scenes:
      _write(root, split, f'{split}_{i}.png', *_scene(i))
  return root


def _expected():
  return {('test', name, f'train_{i}.png', kind) for name, (i, kind) in COPIES.items()}


def _found(info):
  return {(p['other_split'], p['other_file_name'], p['file_name'], p['kind'])
          for p in info['leaks']['pairs']}


def test_exact_digest_is_of_pixels():
  a, b, label = _scene(0)
  d = leaks.exact_digest(a, b, label)
  assert leaks.exact_digest(a.copy(), b.copy(), label.copy()) == d
  a2 = a.copy()
  a2[5, 7, 1] ^= 1
  assert leaks.exact_digest(a2, b, label) != d
  label2 = label.copy()
  label2[0, 0] = 1 - label2[0, 0] // 255
  assert leaks.exact_digest(a, b, label2) != d
  assert leaks.exact_digest(a, b, label.reshape(SIZE * 2, SIZE // 2)) != d  # shape counts


def test_perceptual_hash_survives_copies_and_separates_scenes():
  a = _scene(5)[0]
  h, textured = leaks.perceptual_hash(a)
  assert textured and 0 <= h < 2 ** 64 and h & 1 == 0  # bit 63 (the last) is always 0
  assert bin(h).count('1') == 31  # 63 coefficients against their median: 31 above
  dist = lambda x, y: int(leaks.hamming(np.uint64(x), np.uint64(y)))
  for copy in (_jpeg(a), _shift(a), _brighter(a)):
    assert dist(h, leaks.perceptual_hash(copy)[0]) <= leaks.NEAR_THRESHOLD
  others = [leaks.perceptual_hash(_scene(i)[0])[0] for i in range(100, 110)]
  assert min(dist(h, o) for o in others) > leaks.NEAR_THRESHOLD
  # A flat image has no usable pHash (its bits are rounding noise).
  assert not leaks.perceptual_hash(np.full((64, 64, 3), 90, np.uint8))[1]


def test_hamming_and_match_agree_with_brute_force(monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2 ** 63, 50, dtype=np.uint64)
  y = rng.integers(0, 2 ** 63, 40, dtype=np.uint64)
  d = leaks.hamming(x[:, None], y[None])
  assert d.shape == (50, 40)
  assert all(d[i, j] == bin(int(x[i]) ^ int(y[j])).count('1') for i in range(50) for j in range(40))
  # Tables with planted near copies (few flipped bits) and one exact copy; query blocks small.
  monkeypatch.setattr(leaks, '_BLOCK', 64)
  q, r = leaks.HashTable('train'), leaks.HashTable('test')
  for j in range(40):
    r.add(f'r{j}', leaks.PairHashes(bytes([j]) * 16, int(y[j]), int(y[(j + 1) % 40]), True))
  for i in range(50):
    a, b = int(x[i]), int(x[(i + 7) % 50])
    digest = bytes([100 + i]) * 16
    if i in (3, 30):  # near copies of r5 / r17: 6 and NEAR_THRESHOLD bits flipped in A, 2 in B
      flips = 6 if i == 3 else leaks.NEAR_THRESHOLD
      j = 5 if i == 3 else 17
      a = int(y[j]) ^ ((1 << flips) - 1)
      b = int(y[(j + 1) % 40]) ^ 0b101
    if i == 44:  # flipped one bit too many in B: not near
      a, b = int(y[9]), int(y[10]) ^ ((1 << (leaks.NEAR_THRESHOLD + 1)) - 1)
    if i == 12:  # exact copy of r8
      digest, a, b = bytes([8]) * 16, int(y[8]), int(y[9])
    q.add(f'q{i}', leaks.PairHashes(digest, a, b, True))
  found = leaks.match(q, r)
  assert [(lk.file_name, lk.other_file_name, lk.kind, lk.distance_a, lk.distance_b)
          for lk in found] == [('q3', 'r5', 'near', 6, 2), ('q12', 'r8', 'exact', 0, 0),
                               ('q30', 'r17', 'near', leaks.NEAR_THRESHOLD, 2)]
  # Where both pairs have colour, the colour pHashes must agree as well.
  col = leaks.HashTable('val')
  flip = (1 << leaks.COLOUR_THRESHOLD) - 1
  for name, ca, coloured in (('agree', int(y[17]) ^ flip, True),               # near
                             ('differ', int(y[17]) ^ (2 * flip + 1), True),    # one bit too many
                             ('grey', 0, False)):                              # luma only
    col.add(name, leaks.PairHashes(name.encode() * 4, int(y[5]), int(y[6]), True, ca, int(y[18]),
                                   coloured))
  r_col = leaks.HashTable('test')
  r_col.add('r5', leaks.PairHashes(b'r' * 16, int(y[5]), int(y[6]), True, int(y[17]), int(y[18]),
                                   True))
  assert [lk.file_name for lk in leaks.match(col, r_col)] == ['agree', 'grey']
  # Untextured pairs are never near, exact still counts.
  flat = leaks.HashTable('val')
  flat.add('v', leaks.PairHashes(b'\xff' * 16, int(y[5]), int(y[6]), False))
  assert leaks.match(flat, r) == []
  assert leaks.find_leaks([q, r, flat]) == found


def test_calibration_copies_found_unrelated_scenes_not():
  """The figures of the leaks docstring at 128 px: every JPEG / brighter / shifted / cropped /
  grey copy of 40 scenes is found, and none of the 40 x 39 pairs of different scenes."""
  grey = lambda x: np.repeat(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)
  crop = lambda x: cv2.resize(x[4:, 4:], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
  ref, copies = leaks.HashTable('test'), leaks.HashTable('train')
  for i in range(400, 440):
    a, b, label = _scene(i)
    ref.add(str(i), leaks.pair_hashes(a, b, label))
    for name, f in (('jpeg', _jpeg), ('bright', _brighter), ('shift', _shift), ('crop', crop),
                    ('grey', grey)):
      copies.add(f'{name}{i}', leaks.pair_hashes(f(a), f(b), label))
  found = {(lk.file_name, lk.other_file_name) for lk in leaks.match(copies, ref)}
  assert found == {(name, name.lstrip('abcdefghijklmnopqrstuvwxyz')) for name in copies.names}


def test_warn_lists_every_copy_and_no_neighbour(raw, tmp_path, capsys):
  out = str(tmp_path / 'out')
  info = convert.convert('segchange-default', raw, out)  # default on_leak='warn'
  assert _found(info) == _expected()
  by_name = {p['file_name']: p for p in info['leaks']['pairs']}
  assert by_name['train_0.png']['distance_a'] == 0
  assert all(max(by_name[f'train_{i}.png']['distance_a'], by_name[f'train_{i}.png']['distance_b'])
             <= leaks.NEAR_THRESHOLD for i in (1, 2, 3))
  assert all(p['split'] == 'train' and p['other_split'] == 'test'
             for p in info['leaks']['pairs'])
  assert info['leaks']['num_exact'] == 1 and info['leaks']['num_near'] == 3
  assert info['leaks']['counts'] == {'train/test': 4} and info['leaks']['num_dropped'] == 0
  assert list(info['splits']) == ['train', 'val', 'test']  # order given, not conversion order
  assert info['splits']['train']['num_examples'] == len(TRAIN)
  assert info['splits']['test']['num_examples'] == len(COPIES) + len(OTHERS['test'])
  assert json.load(open(os.path.join(out, 'dataset_info.json')))['leaks'] == info['leaks']
  assert 'WARNING split leaks, all written: 4 pair(s)' in capsys.readouterr().out


def test_error_writes_nothing(raw, tmp_path):
  out = str(tmp_path / 'out')
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('segchange-default', raw, out, on_leak='error')
  msg = str(e.value)
  assert '4 pair(s)' in msg and 'train/train_0.png = test/exact.png (exact copy)' in msg
  assert '\n' not in msg and not os.path.exists(out)
  # An existing dataset stays as it was under --overwrite.
  convert.convert('segchange-default', raw, out, ['val'])
  before = sorted(os.listdir(out))
  info_before = open(os.path.join(out, 'dataset_info.json')).read()
  with pytest.raises(convert.ConvertError, match='split leaks'):
    convert.convert('segchange-default', raw, out, on_leak='error', overwrite=True)
  assert sorted(os.listdir(out)) == before
  assert open(os.path.join(out, 'dataset_info.json')).read() == info_before
  with pytest.raises(convert.ConvertError, match='--on_leak=.nope. is not one of'):
    convert.convert('segchange-default', raw, str(tmp_path / 'o2'), on_leak='nope')
  assert not os.path.exists(tmp_path / 'o2')


def test_drop_from_train_leaves_the_copies_out(raw, tmp_path):
  out = str(tmp_path / 'out')
  info = convert.convert('segchange-default', raw, out, on_leak='drop_from_train', workers=2)
  train = info['splits']['train']
  copied = {f'train_{i}.png' for i, _ in COPIES.values()}
  assert train['num_examples'] == len(TRAIN) - 4 and train['num_dropped_leaks'] == 4
  assert train['num_pairs'] == len(TRAIN) - 4 and train['num_skipped'] == 4
  assert {s['file_name'] for s in train['skipped']} == copied
  reasons = {s['file_name']: s['reason'] for s in train['skipped']}
  assert reasons['train_0.png'] == 'split leak, dropped: test/exact.png (exact copy)'
  assert reasons['train_2.png'].startswith('split leak, dropped: test/shift.png (near copy')
  assert sorted(read_split(out, 'train')) == sorted({f'train_{i}.png' for i in TRAIN} - copied)
  assert _found(info) == _expected()
  assert info['leaks']['num_dropped'] == 4 and sorted(info['leaks']['dropped']) == sorted(copied)
  assert info['leaks']['within_split_exact'] == {'train': 0, 'val': 0, 'test': 0}
  # The same output again: conversion is deterministic.
  again = convert.convert('segchange-default', raw, str(tmp_path / 'again'),
                          on_leak='drop_from_train')
  for k in ('splits', 'leaks'):
    assert again[k] == info[k]


def test_leaks_between_evaluation_splits_and_within_a_split(tmp_path):
  root = str(tmp_path / 'raw')
  for i in range(3):
    _write(root, 'train', f't{i}.png', *_scene(300 + i))
  _write(root, 'train', 't_dup.png', *_scene(300))  # within train: counted, not a leak
  _write(root, 'val', 'v.png', *_scene(310))
  _write(root, 'test', 'x.png', *(_brighter(x) if x.ndim == 3 else x for x in _scene(310)))
  info = convert.convert('segchange-default', root, str(tmp_path / 'out'),
                         on_leak='drop_from_train')
  assert [(p['split'], p['file_name'], p['other_split'], p['other_file_name'], p['kind'])
          for p in info['leaks']['pairs']] == [('val', 'v.png', 'test', 'x.png', 'near')]
  assert info['leaks']['num_dropped'] == 0 and info['splits']['train']['num_examples'] == 4
  assert info['leaks']['within_split_exact']['train'] == 1


def test_demo_scenes_have_no_leaks():
  """The demo data (configs/demo.py: 240 scenes of 128 px, seed 0) holds no leak."""
  tables, index = [], 0
  for split, count in synthetic.split_sizes(240):
    t = leaks.HashTable(split)
    for _ in range(count):
      a, b, label, _ = synthetic.make_scene(0, index, 128)
      t.add(f'{split}_{index:05d}.png', leaks.pair_hashes(a, b, label))
      index += 1
    tables.append(t)
  assert leaks.find_leaks(tables) == []
  assert all(t.within_split_exact() == 0 for t in tables)
