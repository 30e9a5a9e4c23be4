"""Test-time augmentation (segchange_jax/models/tta.py): exact inverses, averaging, one call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.models import tta

# The transforms by what numpy calls them (axes 1, 2 of NHWC), written independently of tta.py.
NUMPY = {
    'identity': lambda x: x,
    'hflip': lambda x: np.flip(x, 2),
    'vflip': lambda x: np.flip(x, 1),
    'rot180': lambda x: np.rot90(x, 2, axes=(1, 2)),
    'rot90': lambda x: np.rot90(x, 1, axes=(1, 2)),
    'rot270': lambda x: np.rot90(x, 3, axes=(1, 2)),
    'transpose': lambda x: np.swapaxes(x, 1, 2),
    'antitranspose': lambda x: np.rot90(np.swapaxes(x, 1, 2), 2, axes=(1, 2)),
}
NUMPY_INVERSE = {**NUMPY, 'rot90': NUMPY['rot270'], 'rot270': NUMPY['rot90']}


def _images(n=2, h=32, w=48, c=3, seed=0):
  return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)


def test_sets_and_names():
  assert tta.SETS['none'] == ('identity',)
  assert tta.SETS['flips'] == ('identity', 'hflip', 'vflip', 'rot180')
  assert sorted(tta.SETS['d4']) == sorted(NUMPY) and len(tta.TRANSFORMS) == 8
  assert not tta.needs_square('flips') and tta.needs_square('d4')
  with pytest.raises(tta.TTAError, match="'rot45' is not one of"):
    tta.resolve('rot45')
  with pytest.raises(tta.TTAError, match='each must be one of'):
    tta.resolve(['identity', 'spin'])


@pytest.mark.parametrize('shape', [(2, 32, 48, 3), (2, 40, 40, 5)])
@pytest.mark.parametrize('name', list(tta.TRANSFORMS))
def test_each_transform_is_numpys_and_its_inverse_is_exact(name, shape):
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  t = tta.TRANSFORMS[name]
  # Transposing transforms change the shape of a non-square image; the inverse restores it.
  np.testing.assert_array_equal(t.forward(x), NUMPY[name](x))
  np.testing.assert_array_equal(t.inverse(NUMPY[name](x)), x)
  np.testing.assert_array_equal(t.inverse(t.forward(x)), x)
  # The same ops on jax arrays and inside jit: bit-equal too (permutations, no arithmetic).
  xj = jnp.asarray(x)
  back = jax.jit(lambda v: t.inverse(t.forward(v)))(xj)
  np.testing.assert_array_equal(np.asarray(back), x)
  np.testing.assert_array_equal(np.asarray(t.forward(xj)), NUMPY[name](x))


def test_the_eight_are_distinct():
  x = _images(1, 16, 16, 1)
  outs = [t.forward(x).tobytes() for t in tta.TRANSFORMS.values()]
  assert len(set(outs)) == 8


def _counting(fn):
  calls = []

  def wrapped(a, b, t):
    calls.append((a.shape, b.shape, t.shape))
    return fn(a, b, t)
  return wrapped, calls


def _position_dependent(a, b, t):
  """Logits [N, H, W, 3] that depend on where a pixel is (not equivariant), per example."""
  h, w = a.shape[1], a.shape[2]
  ramp = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1) / (h * w)
  z = jnp.cumsum(a, axis=2) * ramp - b[..., :1] + jnp.mean(t, axis=(1, 2))[:, None, None, None]
  return z[..., :3]


@pytest.mark.parametrize('name, h, w', [('flips', 32, 64), ('d4', 32, 32)])
def test_tta_is_the_mean_of_the_views_mapped_back_in_one_call(name, h, w):
  a, b = _images(3, h, w, 4, seed=2), _images(3, h, w, 4, seed=3)
  text = np.random.default_rng(4).standard_normal((3, 8, 5)).astype(np.float32)
  fn, calls = _counting(_position_dependent)
  got = np.asarray(tta.tta_logits(fn, a, b, text, name))
  n_views = len(tta.SETS[name])
  # One call with every view of the batch stacked: T * B examples.
  assert calls == [((n_views * 3, h, w, 4), (n_views * 3, h, w, 4), (n_views * 3, 8, 5))]
  views = [NUMPY_INVERSE[v](np.asarray(_position_dependent(NUMPY[v](a), NUMPY[v](b), text)))
           for v in tta.SETS[name]]
  want = np.mean(views, axis=0)
  assert got.shape == (3, h, w, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Not the function itself: the views really differ and are mapped back before averaging.
  assert np.abs(got - np.asarray(_position_dependent(a, b, text))).max() > 1e-2


def test_tta_inside_jit_compiles_one_model_call():
  a, b = _images(2, 32, 32, 3), _images(2, 32, 32, 3, seed=5)
  text = np.ones((2, 8, 4), np.float32)
  fn, calls = _counting(_position_dependent)
  f = jax.jit(lambda a, b, t: tta.tta_logits(fn, a, b, t, 'd4'))
  first = f(a, b, text)
  second = f(a + 1, b, text)  # no retrace
  assert [c[0] for c in calls] == [(16, 32, 32, 3)]
  np.testing.assert_allclose(np.asarray(first),
                             np.asarray(tta.tta_logits(_position_dependent, a, b, text, 'd4')),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(first), np.asarray(second))


def _box_blur_product(a, b, t):
  """An equivariant map: per-pixel a * b, blurred by a symmetric 3 x 3 box (zero padding)."""
  x = jnp.sum(a * b, axis=-1, keepdims=True)
  h, w = x.shape[1], x.shape[2]
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  s = sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
  return s + jnp.mean(t, axis=(1, 2))[:, None, None, None]


@pytest.mark.parametrize('name, h, w', [('flips', 32, 48), ('d4', 32, 32)])
def test_tta_of_an_equivariant_function_is_the_function(name, h, w):
  a, b = _images(2, h, w, 3, seed=6), _images(2, h, w, 3, seed=7)
  text = np.random.default_rng(8).standard_normal((2, 8, 4)).astype(np.float32)
  want = np.asarray(_box_blur_product(a, b, text))
  got = np.asarray(tta.tta_logits(_box_blur_product, a, b, text, name))
  # Equal up to float summation order (each view adds the 9 taps in another order).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_none_is_the_plain_call():
  a, b = _images(2), _images(2, seed=9)
  text = np.zeros((2, 8, 4), np.float32)
  fn, calls = _counting(_position_dependent)
  np.testing.assert_array_equal(np.asarray(tta.tta_logits(fn, a, b, text, 'none')),
                                np.asarray(_position_dependent(a, b, text)))
  assert calls == [((2, 32, 48, 3), (2, 32, 48, 3), (2, 8, 4))]


def test_rotations_of_non_square_images_are_refused():
  a = _images(1, 32, 64)
  fn, calls = _counting(_position_dependent)
  with pytest.raises(tta.TTAError, match=r"tta 'd4' rotates .* square images; got 32x64"):
    tta.tta_logits(fn, a, a, np.zeros((1, 8, 4), np.float32), 'd4')
  with pytest.raises(tta.TTAError, match='square'):
    tta.tta_logits(fn, a, a, np.zeros((1, 8, 4), np.float32), ['identity', 'rot90'])
  assert not calls
  tta.check_shape('flips', 32, 64)  # flips keep any shape
  tta.check_shape('d4', 64, 64)
