"""Convolution rewrites (layers.GroupedConv, layers.ShiftedConv) equal flax nn.Conv: params, values, grads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segchange_jax.models import layers


def test_grouped_conv_matches_feature_group_conv():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 11, 32)), jnp.float32)
  ref = nn.Conv(4, (7, 7), padding=3, feature_group_count=4)
  ours = layers.GroupedConv(4, 7)
  v = ref.init(jax.random.PRNGKey(0), x)
  v_ours = ours.init(jax.random.PRNGKey(0), x)
  # Same names, shapes and initial values: checkpoints and seeds carry over unchanged.
  jax.tree.map(np.testing.assert_array_equal, v_ours, v)
  v = jax.tree.map(lambda t: t + 0.1, v)  # non-zero bias
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


def test_shifted_conv_matches_conv():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 11, 8)), jnp.float32)
  ref = layers.conv(6, 3, jnp.float32, 'c')
  ours = layers.ShiftedConv(6, 3, name='c')
  v = ref.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.PRNGKey(0), x), v)
  v = jax.tree.map(lambda t: t + 0.1, v)
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)
