"""data_prep.tfds_builder: builds ArrayRecord shards and reads them back without TensorFlow."""

import os
import sys

from array_record.python import array_record_data_source
import numpy as np

from segchange_jax.data import records


def test_build_and_read_without_tensorflow(tmp, helpers):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top
  root = os.path.join(tmp, 'raw')
  pairs = helpers.write_folder(os.path.join(root, 'train'), ['a.png', 'b.png', 'c.png'])
  cfg = tfds_builder.SegChangeConfig(name='tiny', layout='opencd', root=root, splits=('train',))
  data_dir = os.path.join(tmp, 'tfds')
  builder = tfds_builder.SegChangeCD(config=cfg, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  source = tfds.data_source('seg_change_cd/tiny', data_dir=data_dir)['train']
  assert len(source) == 3
  got = {source[i]['file_name'].decode(): source[i] for i in range(3)}
  for name, (a, b, label) in pairs.items():
    np.testing.assert_array_equal(got[name]['image_a'], a)
    np.testing.assert_array_equal(got[name]['image_b'], b)
    np.testing.assert_array_equal(got[name]['label'][..., 0], label)
  # Our own reader decodes TFDS's shards too (same record format).
  shard_dir = os.path.join(data_dir, 'seg_change_cd', 'tiny', '1.1.0')
  shards = sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir) if 'array_record' in f)
  ex = records.decode(array_record_data_source.ArrayRecordDataSource(shards)[0])
  np.testing.assert_array_equal(ex['label'], pairs[ex['file_name']][2])
  assert 'tensorflow' not in sys.modules


def test_build_with_targets_reads_back_with_our_decoder(tmp):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = os.path.join(tmp, 'raw')
  synthetic.generate(root, n=4, size=32, seed=2)   # 2 train scenes, with per-prompt targets
  cfg = tfds_builder.SegChangeConfig(name='targets', layout='segchange-default', root=root,
                                     splits=('train',))
  data_dir = os.path.join(tmp, 'tfds')
  tfds_builder.SegChangeCD(config=cfg, data_dir=data_dir,
                           file_format='array_record').download_and_prepare()
  source = tfds.data_source('seg_change_cd/targets', data_dir=data_dir)['train']
  shard_dir = os.path.join(data_dir, 'seg_change_cd', 'targets', '1.1.0')
  shards = sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir) if 'array_record' in f)
  ours = array_record_data_source.ArrayRecordDataSource(shards)
  assert len(source) == len(ours) == 2
  for i in range(2):
    ex = records.decode(ours[i])
    index = int(ex['file_name'][6:11])
    _, _, label, prompt, want = synthetic.make_scene_with_targets(2, index, 32)
    np.testing.assert_array_equal(ex['label'], label)
    assert ex['prompt'] == prompt
    assert [p for p, _ in ex['targets']] == list(want)
    for (_, mask), ref in zip(ex['targets'], want.values()):
      np.testing.assert_array_equal(mask, ref)
    # TFDS decodes the same targets as a sequence of {prompt, mask}.
    tf_ex = {source[j]['file_name'].decode(): source[j] for j in range(2)}[ex['file_name']]
    assert [p.decode() for p in tf_ex['targets']['prompt']] == list(want)
    np.testing.assert_array_equal(tf_ex['targets']['mask'][0][..., 0], next(iter(want.values())))
  assert 'tensorflow' not in sys.modules
