"""config.model.remat: same loss and gradients as no remat (Swin stage); bad values rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models.backbones import swin
from tests.models.test_segchange import small_config


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
