"""Several prompts in one pass (text [B, P, T, L]): same logits as one call per prompt, the trunk
computed once (XLA's FLOP count), and clear errors for malformed text embeddings.

The default tests check the mask head alone (the only part that sees the prompts) and the whole
model's HLO cost; the whole-model comparisons compile the model several times and are slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.models import head as head_lib
from segchange_jax.models import layers
from segchange_jax.models import segchange
from tests.eval import tiny

SIZE = 64


def _config(**overrides):
  config = tiny.tiny_config()
  for key, value in overrides.items():
    setattr(config.model, key, value)
  return config


def _inputs(batch, prompts, size=SIZE, seed=0):
  rs = np.random.RandomState(seed)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(batch, prompts, 8, tiny.TEXT_DIM).astype(np.float32)
  return a, b, text


def _head(deferred: bool, **overrides):
  """The demo mask head with random weights and a random input map (deferred conv or plain)."""
  m = _config(**overrides).model
  head = head_lib.build_head(m, jnp.float32)
  rs = np.random.RandomState(3)
  c = m.fpn_dim
  x = rs.randn(2, 32, 32, 2 * c if deferred else c).astype(np.float32)
  x = (layers.DeferredDense(x, (rs.randn(2 * c, c) / np.sqrt(2 * c)).astype(np.float32),
                            rs.randn(c).astype(np.float32)) if deferred else x)
  text = rs.randn(2, 1, 8, tiny.TEXT_DIM).astype(np.float32)
  shapes = jax.eval_shape(lambda r: head.init(r, x, text[:, 0]), jax.random.PRNGKey(0))

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return np.ones(s.shape, np.float32)
    n = rs.randn(*s.shape).astype(np.float32)
    return n * (0.1 if 'bias' in name or len(s.shape) < 2 else 1 / np.sqrt(s.shape[0]))

  return head, jax.tree_util.tree_map_with_path(draw, shapes), x


@pytest.mark.parametrize('deferred,conditioning', [(True, 'none'), (False, 'none'),
                                                    (True, 'film_head')])
def test_head_prompts_give_the_logits_of_one_call_each(deferred, conditioning):
  head, variables, x = _head(deferred, prompt_conditioning=conditioning)
  fwd = jax.jit(lambda v, x, t: head.apply(v, x, t))
  text = np.random.RandomState(4).randn(2, 3, 8, tiny.TEXT_DIM).astype(np.float32)
  multi = np.asarray(fwd(variables, x, text))
  assert multi.shape == (2, 32, 32, 3)
  singles = [np.asarray(fwd(variables, x, text[:, p])) for p in range(3)]
  for p, single in enumerate(singles):
    assert single.shape == (2, 32, 32, 1)
    np.testing.assert_allclose(multi[..., p], single[..., 0], atol=1e-5, rtol=0, err_msg=str(p))
  assert np.abs(singles[0] - singles[1]).max() > 1e-3  # the prompts steer the maps
  # One prompt as [B, 1, T, L] is the [B, T, L] call.
  np.testing.assert_allclose(np.asarray(fwd(variables, x, text[:, :1])), singles[0], atol=1e-5,
                             rtol=0)


@pytest.mark.parametrize('conditioning', ['none', 'film_head'])
def test_head_classes_and_train_mode(conditioning):
  # K > 1 gives [B, H, W, P, K]; without dropout train mode is deterministic and equal per prompt.
  head, variables, x = _head(True, num_classes=3, dropout=0.0, prompt_conditioning=conditioning)
  fwd = jax.jit(lambda v, x, t: head.apply(v, x, t, train=True))
  text = np.random.RandomState(5).randn(2, 2, 8, tiny.TEXT_DIM).astype(np.float32)
  multi = np.asarray(fwd(variables, x, text))
  assert multi.shape == (2, 32, 32, 2, 3)
  for p in range(2):
    np.testing.assert_allclose(multi[..., p, :], np.asarray(fwd(variables, x, text[:, p])),
                               atol=1e-5, rtol=0, err_msg=str(p))
  # With dropout the P maps of an image still come from one pass (finite, right shape).
  head, variables, x = _head(True)
  out = jax.jit(lambda v, x, t: head.apply(v, x, t, train=True, rngs={
      'dropout': jax.random.PRNGKey(0)}))(variables, x, text)
  assert out.shape == (2, 32, 32, 2) and np.isfinite(np.asarray(out)).all()


def test_trunk_runs_once():
  config = _config()
  model = segchange.build_model(config)
  shapes = segchange.variable_shapes(model, SIZE)

  def flops(prompts):
    a, b, text = _inputs(1, prompts)
    fn = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t))
    # XLA's cost analysis of the lowered HLO: counts every op, without the compile time.
    cost = fn.lower(shapes, a, b, text).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])

  one, four = flops(1), flops(4)
  # Four forward passes would cost 4x; the trunk once plus four head tails costs far less.
  print(f'HLO flops: 1 prompt {one:.4g}, 4 prompts {four:.4g} ({four / one:.2f}x)')
  assert one < four < 2.0 * one, (one, four)


@pytest.mark.parametrize('shape,match', [
    ((1, 2, 3, 8, tiny.TEXT_DIM), r'must be \[B, T, L\] .* or \[B, P, T, L\]'),
    ((1, tiny.TEXT_DIM), r'must be \[B, T, L\]'),
    ((1, 2, 8, tiny.TEXT_DIM + 1), 'width 33, the model expects text.dim=32'),
    ((2, 8, tiny.TEXT_DIM), 'for 2 pairs, the images for 1'),
    ((1, 0, 8, tiny.TEXT_DIM), r'no prompt \(P = 0\)'),
])
def test_malformed_text_embeddings_are_refused(shape, match):
  config = _config()
  model = segchange.build_model(config)
  shapes = segchange.variable_shapes(model, SIZE)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda v, t: model.apply(v, x, x, t), shapes, jnp.zeros(shape))


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    {},
    # K > 1, the token connector (the head gets a plain map) and train mode (BatchNorm batch
    # statistics in the trunk; no dropout, so both calls are deterministic).
    {'num_classes': 3, 'use_token_connector': True, 'token_dim': 32, 'dropout': 0.0}])
def test_whole_model_prompts_give_the_logits_of_one_call_each(overrides):
  config = _config(**overrides)
  model = segchange.build_model(config)
  variables = tiny.random_variables(config)
  train = bool(overrides)
  # One dropout key for every call: the backbone's stochastic depth masks agree between them.
  fwd = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t, train=train,
                                               mutable=['batch_stats'] if train else False,
                                               rngs={'dropout': jax.random.PRNGKey(0)}))
  unpack = (lambda r: r[0]) if train else (lambda r: r)
  a, b, text = _inputs(2, 3)
  multi = np.asarray(unpack(fwd(variables, a, b, text)))
  k = config.model.num_classes
  assert multi.shape == ((2, SIZE, SIZE, 3) if k == 1 else (2, SIZE, SIZE, 3, k))
  if k == 1:
    multi = multi[..., None]
  singles = [np.asarray(unpack(fwd(variables, a, b, text[:, p]))) for p in range(3)]
  for p, single in enumerate(singles):
    np.testing.assert_allclose(multi[..., p, :], single, atol=1e-5, rtol=0, err_msg=str(p))
  one = np.asarray(unpack(fwd(variables, a, b, text[:, :1])))  # [B, H, W, 1(, K)]
  np.testing.assert_allclose(one if k == 1 else one[..., 0, :], singles[0], atol=1e-5, rtol=0)
