"""config.model.remat: same loss and gradients as no remat, less train-step memory; bad values
rejected."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models import remat as remat_lib
from segchange_jax.models.backbones import swin
from segchange_jax.train import train_step
from tests.models.test_segchange import small_config
from tests.train.test_train_step import B
from tests.train.test_train_step import make_batches
from tests.train.test_train_step import setup
from tests.train.test_train_step import text_table
from tests.train.traincore_toy import toy_config


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


class _WideBlock(nn.Module):
  """Residual MLP whose hidden activations are most of the step's memory."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(8 * x.shape[-1], name='fc1')(nn.LayerNorm(name='norm')(x)))
    return x + nn.Dense(x.shape[-1], name='fc2')(h)


class _RematToy(nn.Module):
  """The train step's model contract: a conv, six remat-wrapped blocks, a 1x1 conv."""
  policy: str

  @nn.compact
  def __call__(self, image_a, image_b, text_emb, train: bool = False):
    del text_emb, train
    x = nn.Conv(32, (3, 3), name='stem')(jnp.concatenate([image_a, image_b], -1))
    for i in range(6):
      x = remat_lib.wrap(_WideBlock, self.policy)(name=f'block{i}')(x)
    return nn.Conv(1, (1, 1), name='head')(x)


def test_train_step_remat_saves_memory_with_the_same_update():
  """The jitted train step under 'block' keeps ~one block's activations (XLA:CPU included)."""
  batch = make_batches(1)[0]
  temp, params = {}, {}
  for policy in ('none', 'block'):
    config = toy_config(lr=1e-2, lr_backbone=1e-3, batch_size=B)
    with config.unlocked():
      config.model.remat = policy
    model = _RematToy(policy)
    mesh, state, _, step = setup(config, model, devices=jax.devices()[:1])
    args = (state, train_step.shard_batch(batch, mesh), jnp.asarray(text_table()))
    temp[policy] = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    params[policy] = step(*args)[0].params
  # Six blocks x (8x-wide hidden + GELU) saved vs recomputed one at a time.
  assert temp['block'] < 0.5 * temp['none'], temp
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params['block'], params['none'])
