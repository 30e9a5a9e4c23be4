"""The convolution modules of layers.py equal flax nn.Conv: parameters, values, gradients.

GroupedConv, ShiftedConv, DepthwiseConv and every dispatch path of ConvNoBias; the kernels they
compute with are tested against their plain forms in test_kernels.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segchange_jax.models import layers


def _assert_same_as(ours: nn.Module, ref: nn.Module, x: jax.Array) -> None:
  """Same parameter names, shapes and initial values (checkpoints and seeds carry over), then
  the same values and gradients (parameters and input) with every parameter moved off init."""
  v = ref.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.PRNGKey(0), x), v)
  v = jax.tree.map(lambda t: t + 0.1, v)  # e.g. a non-zero bias
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


def test_grouped_conv_matches_feature_group_conv():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 11, 32)), jnp.float32)
  _assert_same_as(layers.GroupedConv(4, 7),
                  nn.Conv(4, (7, 7), padding=3, feature_group_count=4), x)


def test_shifted_conv_matches_conv():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 11, 8)), jnp.float32)
  _assert_same_as(layers.ShiftedConv(6, 3, name='c'), layers.conv(6, 3, jnp.float32, 'c'), x)


def test_depthwise_conv_matches_grouped_conv():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 11, 5)), jnp.float32)
  _assert_same_as(layers.DepthwiseConv(3),
                  nn.Conv(5, (3, 3), padding=1, feature_group_count=5, use_bias=False), x)


@pytest.mark.parametrize('kernel,stride,padding,groups', [
    (1, 1, None, 1),   # matmul
    (3, 1, None, 1),   # shifted_conv
    (5, 1, None, 6),   # depthwise_conv
    (3, 2, None, 6),   # lax: stride 2 depthwise (HGNetv2 downsample)
    (1, 2, None, 1),   # lax: ResNet's strided 1x1 projection
    (2, 1, 0, 1),      # lax: HGNetv2 stem's VALID 2x2
    (3, 1, None, 2)])  # lax: grouped, not depthwise
def test_conv_no_bias_matches_nn_conv(kernel, stride, padding, groups):
  """Every dispatch path of layers.ConvNoBias equals nn.Conv(use_bias=False)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 10, 6)), jnp.float32)
  p = (kernel - 1) // 2 if padding is None else padding
  _assert_same_as(layers.ConvNoBias(6, kernel, stride, padding, groups),
                  nn.Conv(6, (kernel, kernel), stride, padding=[(p, p), (p, p)],
                          feature_group_count=groups, use_bias=False), x)
