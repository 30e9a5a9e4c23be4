"""config.data.targets='prompts' in the input pipeline: slot draws, masks, resume, eval, errors."""

import os
import pickle

import numpy as np
import pytest

from configs import base
from segchange_jax import config_lib
from segchange_jax.data import augment
from segchange_jax.data import convert
from segchange_jax.data import input_pipeline as ip
from segchange_jax.data import records
from segchange_jax.data import synthetic
from tests.data.conftest import data_config

VOCAB = list(synthetic.PROMPT_VOCABULARY)


def _config(shards_dir, **data):
  return config_lib.validate_config(data_config(shards_dir, **{'targets': 'prompts', **data}))


def _table(config):
  info = ip.prompt_table_info(config, ip.load_dataset_info(config.data.shards_dir))
  return {p: i for i, p in enumerate(info['prompts'])}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _record_targets(it, position):
  """{prompt: mask} of the record at global stream `position` of a train iterator."""
  load = it._map._load   # pylint: disable=protected-access
  ex = records.decode(load._source[load._order(position)])   # pylint: disable=protected-access
  return dict(ex['targets'])


def test_sampling_rate_determinism_and_fallbacks():
  four = list(VOCAB[:3]) + ['any change']
  draws = [ip.sample_prompts(np.random.default_rng([7, i]), four, VOCAB, 4, 0.25)
           for i in range(3000)]
  assert draws[:50] == [ip.sample_prompts(np.random.default_rng([7, i]), four, VOCAB, 4, 0.25)
                        for i in range(50)]   # a function of the generator's seed alone
  slots = [p for d in draws for p in d]
  share = np.mean([p not in four for p in slots])
  assert abs(share - 0.25) < 0.02, share
  assert set(slots) == set(VOCAB)              # every negative gets drawn
  carried = ['new buildings', 'any change']
  draws = [ip.sample_prompts(np.random.default_rng([7, i]), carried, VOCAB, 4, 0.25)
           for i in range(300)]
  # Positives without replacement: 2 carried, at most 2 positive slots.
  two = [d for d in draws if sum(p in carried for p in d) == 2]
  assert two and all(len({p for p in d if p in carried}) == 2 for d in two)
  # A draw never repeats a prompt while the vocabulary has K: slots the carried targets cannot
  # fill are negatives.
  assert all(len(set(d)) == 4 for d in draws)
  rng = np.random.default_rng(0)
  assert all(p in carried for _ in range(20)
             for p in ip.sample_prompts(rng, carried, VOCAB, 2, 0.0))
  three = [ip.sample_prompts(rng, carried, VOCAB, 3, 0.0) for _ in range(20)]
  assert all(sum(p in carried for p in d) == 2 and len(set(d)) == 3 for d in three)
  assert all(p not in carried for _ in range(20)
             for p in ip.sample_prompts(rng, carried, VOCAB, 3, 1.0))
  # Nothing to negate: all carried; nothing carried: all negatives.
  assert all(p in VOCAB for p in ip.sample_prompts(rng, VOCAB, VOCAB, 5, 1.0))
  assert all(p in VOCAB for p in ip.sample_prompts(rng, [], VOCAB, 3, 0.0))
  with pytest.raises(ip.InputError, match='targets=label'):
    ip.sample_prompts(rng, [], [], 2, 0.5)


def test_hard_negatives_share_a_word_with_a_carried_prompt():
  carried = ['new buildings', 'any change']
  hard = {'demolished buildings', 'new roads', 'new mounds'}
  draws = [ip.sample_prompts(np.random.default_rng([3, i]), carried, VOCAB, 4, 0.5, 1.0)
           for i in range(400)]
  negatives = [p for d in draws for p in d if p not in carried]
  assert negatives and set(negatives) == set(VOCAB) - set(carried)   # the rest still drawn
  # Every draw with at most 3 negatives has only hard ones; never a repeat.
  few = [d for d in draws if sum(p not in carried for p in d) <= 3]
  assert few and all(p in hard for d in few for p in d if p not in carried)
  assert all(len(set(d)) == 4 for d in draws)
  # share 0 is the plain draw (same generator state, same prompts).
  assert (ip.sample_prompts(np.random.default_rng(5), carried, VOCAB, 4, 0.5, 0.0)
          == ip.sample_prompts(np.random.default_rng(5), carried, VOCAB, 4, 0.5))


def test_packed_masks_follow_the_augmentation():
  # Rotation, affine warp and both flips forced on: each of K masks moved through the packed
  # uint16 map equals that mask augmented alone as the label with the same draw.
  cfg = dict(apply_prob=1.0, rotation_degree=30.0, affine_degree=1.0, hflip=True, vflip=True,
             color_jitter=0.2, clahe=0.5)
  rs = np.random.default_rng(3)
  a, b = (rs.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(2))
  masks = [(rs.random((48, 40)) > 0.6).astype(np.uint8) * 255 for _ in range(5)]
  masks[2] = None   # a negative slot
  for seed in range(12):
    packed = ip._pack_bits(masks, (48, 40))   # pylint: disable=protected-access
    _, _, moved = augment.augment_pair(a, b, packed, np.random.default_rng(seed), cfg)
    got = ip._unpack_bits(moved, 5)           # pylint: disable=protected-access
    assert got.shape == (48, 40, 5) and got.dtype == np.uint8
    for k, m in enumerate(masks):
      m = np.zeros((48, 40), np.uint8) if m is None else m
      _, _, want = augment.augment_pair(a, b, m, np.random.default_rng(seed), cfg)
      np.testing.assert_array_equal(got[..., k], want > 0, err_msg=str(k))


def test_train_batches_slots_masks_and_exact_resume(shards):
  c = _config(shards, prompts_per_example=3, negative_rate=0.5)
  table = _table(c)
  names = {i: p for p, i in table.items()}
  it, steps = ip.create_train_iterator(c, table, 0, 1)
  batches = _take(it, 4)
  b = batches[0]
  assert b['label'].shape == (4, 64, 64, 3) and b['label'].dtype == np.uint8
  assert b['prompt_index'].shape == (4, 3) and b['prompt_index'].dtype == np.int32
  assert set(np.unique(b['label'])) <= {0, 1}
  # Slots: a carried prompt's mask is that target's (cropped, augmented) mask; a negative's is
  # empty. 'any change' is the label, so its slot equals the label mode's label of the same
  # position (same crop and augmentation draw): the masks follow the images.
  label_mode = _config(shards, targets='label')
  label_batches = _take(ip.create_train_iterator(label_mode, table, 0, 1)[0], 4)
  negatives = slots = any_change = kinds = 0
  for step, (batch, lb) in enumerate(zip(batches, label_batches)):
    np.testing.assert_array_equal(batch['image_a'], lb['image_a'])
    np.testing.assert_array_equal(batch['image_b'], lb['image_b'])
    for j in range(4):
      carried = _record_targets(it, step * 4 + j)
      for k, index in enumerate(batch['prompt_index'][j]):
        prompt, mask = names[int(index)], batch['label'][j, ..., k]
        assert prompt in VOCAB
        slots += 1
        if prompt not in carried:
          negatives += 1
          assert not mask.any(), prompt
        elif prompt == synthetic.ANY_CHANGE:
          np.testing.assert_array_equal(mask, lb['label'][j])
          any_change += 1
        else:   # a kind's change lies inside the label, moved by the same warp
          assert not (mask & (1 - lb['label'][j])).any(), prompt
          kinds += mask.any()
  assert slots == 4 * 4 * 3 and 0.25 < negatives / slots < 0.75
  assert any_change and kinds
  # Exact resume, and the same batches from a fresh iterator.
  again, _ = ip.create_train_iterator(c, table, 0, 1)
  again.set_state({'step': 2})
  for x, y in zip(_take(again, 2), batches[2:]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # grain worker processes get the loader pickled: the copy makes the same examples.
  load = pickle.loads(pickle.dumps(it._map._load))   # pylint: disable=protected-access
  for j in range(4):
    ex = load(4 + j)
    for k in ex:
      np.testing.assert_array_equal(ex[k], batches[1][k][j])
  # Two processes split the same global batch.
  halves = [ip.create_train_iterator(c, table, p, 2)[0] for p in range(2)]
  first = [next(h) for h in halves]
  for k in b:
    np.testing.assert_array_equal(np.concatenate([f[k] for f in first]), b[k])


def test_eval_asks_every_target_prompt(shards):
  c = _config(shards)
  table = _table(c)
  prompts = ip.target_prompts(c)
  assert prompts == sorted(ip.load_dataset_info(shards)['target_prompts'])
  assert set(prompts) <= set(table)
  batches = list(ip.create_eval_iterator(c, 'val', table, 4, 0, 1))   # 2 examples + 2 padding
  assert len(batches) == 1
  b = batches[0]
  assert b['label'].shape == (4, 64, 64, len(prompts)) and b['label'].dtype == np.uint8
  np.testing.assert_array_equal(b['prompt_index'][:2],
                                np.tile([table[p] for p in prompts], (2, 1)))
  np.testing.assert_array_equal(b['mask'], [1, 1, 0, 0])
  assert not b['label'][2:].any() and b['prompt_index'].shape == (4, len(prompts))
  info = ip.load_dataset_info(shards)
  src = [os.path.join(shards, n) for n in info['splits']['val']['shards']]
  import grain.python as grain  # pylint: disable=g-import-not-at-top
  source = grain.ArrayRecordDataSource(src)
  for j in range(2):
    carried = dict(records.decode(source[j])['targets'])
    for k, p in enumerate(prompts):
      want = (carried[p] > 0) if p in carried else np.zeros((64, 64), bool)
      np.testing.assert_array_equal(b['label'][j, ..., k], want, err_msg=p)
  # The label mode is unchanged: [b, H, W] labels and one prompt per example.
  lb = next(iter(ip.create_eval_iterator(_config(shards, targets='label'), 'val', table, 4, 0,
                                         1)))
  assert lb['label'].shape == (4, 64, 64) and lb['prompt_index'].shape == (4,)


def test_shards_without_targets_are_one_error(tmp_path, helpers):
  root = os.path.join(tmp_path, 'raw')
  helpers.write_folder(os.path.join(root, 'train'), [f'x{i}.png' for i in range(4)])
  out = os.path.join(tmp_path, 'shards')
  convert.convert('segchange-default', root, out, ['train'])
  c = _config(out, image_size=32)
  for call in (lambda: ip.create_train_iterator(c, {'': 0}, 0, 1),
               lambda: ip.prompt_table_info(c, ip.load_dataset_info(out))):
    with pytest.raises(ip.InputError) as e:
      call()
    msg = str(e.value)
    assert os.path.join(out, 'dataset_info.json') in msg and 'no target_prompts' in msg
    assert 're-convert' in msg and 'targets=label' in msg


@pytest.mark.parametrize('field,value,match', [
    ('data.targets', 'masks', r"targets='masks' is not one of \['label', 'prompts'\]"),
    ('data.prompts_per_example', 0, r'config\.data\.prompts_per_example=0 must be >= 1'),
    ('data.prompts_per_example', 17, r'prompts_per_example=17 must be <= 16'),
    ('data.negative_rate', 1.5, r'config\.data\.negative_rate=1\.5 must be <= 1'),
    ('data.negative_rate', -0.1, r'config\.data\.negative_rate=-0\.1 must be >= 0'),
    ('data.hard_negative_share', 1.5, r'config\.data\.hard_negative_share=1\.5 must be <= 1'),
    ('model.num_classes', 3, r"targets='prompts' trains one binary mask.*num_classes=3"),
])
def test_config_errors(field, value, match):
  c = base.get_config()
  with c.unlocked():
    c.data.targets = 'prompts'
  config_lib.set_field(c, field, value)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate_config(c)


def test_default_config_trains_on_the_label():
  c = base.get_config()
  assert (c.data.targets, c.data.prompts_per_example, c.data.negative_rate) == ('label', 2, 0.25)
  info = {'prompts': ['a'], 'target_prompts': ['new roads']}
  assert ip.prompt_table_info(c, info) is info   # the prompt table stays as it was
