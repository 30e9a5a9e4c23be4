"""segchange_jax.data.augment: pairing of images and label, determinism, switches."""

import numpy as np

from configs import base
from segchange_jax.data import augment


def _cfg(**kw):
  cfg = base.get_config().data.augment.to_dict()
  cfg.update(kw)
  return cfg


def _blocky(seed, size=96):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
  img = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
  return img, np.where(img[..., 0] > 127, 1, 0).astype(np.uint8)


def test_rotation_moves_label_with_images():
  img, label = _blocky(0)
  cfg = _cfg(apply_prob=1.0, color_jitter=0.0, gamma_range=(1.0, 1.0), blur_sigma=0.0,
             clahe=0.0, rotation_degree=15.0)
  changed = 0
  for seed in range(4):
    a, b, lab = augment.augment_pair(img, img.copy(), label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(a, b)               # same draw for A and B
    inside = a.any(-1)                               # ignore the zero border
    agree = (lab == (a[..., 0] > 127))[inside].mean()
    assert agree > 0.97, agree
    changed += (lab != label).mean() > 0.05
  assert changed >= 3                                 # the rotation did happen


def test_same_rng_same_output_and_disabled_is_identity():
  img, label = _blocky(1, 64)
  b = np.roll(img, 3, axis=0)
  out1 = augment.augment_pair(img, b, label, np.random.default_rng(5), _cfg(apply_prob=1.0))
  out2 = augment.augment_pair(img, b, label, np.random.default_rng(5), _cfg(apply_prob=1.0))
  for x, y in zip(out1, out2):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(out1[0], img)
  off = augment.augment_pair(img, b, label, np.random.default_rng(5), _cfg(enabled=False))
  for x, y in zip(off, (img, b, label)):
    assert x is y


def test_photometric_ops_leave_label_and_match_lut():
  img, label = _blocky(2, 64)
  cfg = _cfg(apply_prob=0.0, gamma_range=(1.2, 1.2), blur_sigma=0.0, clahe=0.0)
  a, b, lab = augment.augment_pair(img, img, label, np.random.default_rng(0), cfg)
  np.testing.assert_array_equal(lab, label)
  expected = ((img / 255.0) ** 1.2 * 255.0).astype(np.uint8)
  np.testing.assert_array_equal(a, expected)
  cfg = _cfg(apply_prob=0.0, gamma_range=(1.0, 1.0), blur_sigma=0.0, clahe=1.0, erase_prob=1.0,
             erase_ratio=(0.5, 2.0))
  a, b, lab = augment.augment_pair(img, img, label, np.random.default_rng(0), cfg)
  np.testing.assert_array_equal(lab, label)
  assert not np.array_equal(a, b)                     # erase fills A and B with own noise
