"""config.model.remat: same parameters, loss and gradients as no remat; bad values rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models import segchange
from segchange_jax.models.backbones import swin
from tests.models.test_segchange import small_config


def _loss_and_grads(policy: str):
  c = small_config('swin_base_patch4_window7_224')
  c.model.remat = policy
  model = segchange.build_model(c)
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32) for _ in range(2))
  text = jnp.asarray(rng.normal(size=(2, 3, c.text.dim)), jnp.float32)
  variables = segchange.init_variables(model, jax.random.PRNGKey(0), 64, 2, 3)

  def loss(params):
    # train=True: dropout, stochastic depth and BatchNorm batch statistics all inside remat.
    logits, upd = model.apply({**variables, 'params': params}, a, b, text, train=True,
                              rngs={'dropout': jax.random.PRNGKey(1)}, mutable=['batch_stats'])
    return jnp.mean(jnp.tanh(logits)), upd

  (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return variables['params'], value, upd, grads


@pytest.mark.slow
def test_model_remat_policies_match_none():
  params, value, upd, grads = _loss_and_grads('none')
  p2, v2, u2, g2 = _loss_and_grads('block')  # the per-module stage test covers 'dots'
  assert jax.tree.structure(p2) == jax.tree.structure(params)
  # Recomputation re-fuses ops differently: float32 rounding-level differences only.
  np.testing.assert_allclose(v2, value, rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), u2, upd)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), g2, grads)


@pytest.mark.parametrize('policy', ['dots', 'block'])
def test_swin_stage_remat_matches_none(policy):
  """Two shifted-window blocks with stochastic depth (train=True) inside remat."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 14, 16)), jnp.float32)
  out = {}
  for pol in ('none', policy):
    m = swin.SwinStage(16, 2, 2, downsample=False, drop_paths=(0.2, 0.3), remat=pol)
    v = m.init(jax.random.PRNGKey(0), x)
    f = lambda p, x, m=m: jnp.sum(jnp.sin(m.apply(p, x, True,
                                                  rngs={'dropout': jax.random.PRNGKey(3)})))
    out[pol] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(v, x)
  np.testing.assert_allclose(out[policy][0], out['none'][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[policy][1], out['none'][1])


def test_remat_rejects_unknown_policy():
  c = small_config('swin_base_patch4_window7_224')
  c.model.remat = 'stage'
  with pytest.raises(config_lib.ConfigError, match='model.remat'):
    config_lib.validate_config(c)
