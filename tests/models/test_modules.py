"""Per-module parity of bev / diff / neck / head against the clean-room torch reference.

Random weights and BatchNorm statistics, eval mode, float32, small widths. Every test goes
through our fast rewrites (neck fusion before upsampling, folded few-query attention).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import base
from segchange_jax.models import bev as bev_lib
from segchange_jax.models import diff as diff_lib
from segchange_jax.models import head as head_lib
from segchange_jax.models import layers
from segchange_jax.models import neck as neck_lib
from tests.torch_ref import segchange as ref
from tests.torch_ref import util

TOL = 1e-4


def _cfg(**model):
  c = base.get_config()
  with c.unlocked():
    for k, v in model.items():
      c.model[k] = v
  return c.model


def _check(name, ours, theirs):
  err = util.rel_err(ours, theirs)
  print(f'{name}: max abs err / max |ref| = {err:.2e}')
  assert err <= TOL, f'{name}: relative error {err:.2e} > {TOL}'


def _shapes(module, *args):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))


@pytest.mark.parametrize('kind', ['LinearAttention', 'Transformer'])
def test_bev(kind):
  torch.manual_seed(0)
  c, hw = 32, 8
  m = _cfg(bev=kind, bev_heads=4, bev_dim_head=8, bev_transformer_ffn=48,
           out_dims=(c, c, c, c))
  if kind == 'LinearAttention':
    t = ref.BEVLinearAttention(c, 4, 8)
  else:
    t = ref.BEVTransformer(c, 4, 2, 48, 0.1)
  ref.randomize_(torch.nn.ModuleDict({'bev': t}))
  t.eval()
  x = np.random.RandomState(0).randn(2, hw, hw, c).astype(np.float32)
  ours = bev_lib.build_bev(m, c, jnp.float32, 'bev')
  expected = _shapes(ours, x)
  variables = util.to_flax(torch.nn.ModuleDict({'bev': t}), bev_lib.torch_rules('bev', (), m),
                           expected)
  with torch.no_grad():
    want = util.nhwc(t(util.nchw(x)))
  _check(f'bev {kind}', ours.apply(variables, x), want)


@pytest.mark.parametrize('attention', ['CBAM', 'SE'])
def test_diff(attention):
  torch.manual_seed(0)
  dims = (32, 48, 32, 64)
  m = _cfg(diff_attention=attention, out_dims=dims)
  t = ref.FeatureDiff(dims, attention)
  ref.randomize_(t)
  t.eval()
  rs = np.random.RandomState(1)
  sizes = (16, 8, 4, 2)
  fa = [rs.randn(2, s, s, d).astype(np.float32) for s, d in zip(sizes, dims)]
  fb = [rs.randn(2, s, s, d).astype(np.float32) for s, d in zip(sizes, dims)]
  ours = diff_lib.FeatureDiff(attention)
  variables = util.to_flax(torch.nn.ModuleDict({'feature_diff': t}),
                           diff_lib.torch_rules('feature_diff', (), m), _shapes(ours, fa, fb))
  got = ours.apply(variables, fa, fb)
  with torch.no_grad():
    want = t([util.nchw(a) for a in fa], [util.nchw(b) for b in fb])
  for i, (g, w) in enumerate(zip(got, want)):
    _check(f'diff {attention} scale {i}', g, util.nhwc(w))


@pytest.mark.parametrize('fpn_type,use_ega,token', [
    ('L-FPN', True, False), ('FPN', False, False), ('FPN', False, True), ('FPN', True, False),
    ('L-FPN', True, True)])
def test_neck(fpn_type, use_ega, token):
  torch.manual_seed(0)
  dims, fpn_dim, token_dim = (16, 24, 16, 32), 32, 16
  m = _cfg(fpn_type=fpn_type, use_ega=use_ega, use_token_connector=token, out_dims=dims,
           fpn_dim=fpn_dim, token_dim=token_dim, gn_groups=8)
  t = ref.Neck(dims, fpn_type, fpn_dim, 8, token_dim if token else 0, use_ega)
  ref.randomize_(t)
  t.eval()
  rs = np.random.RandomState(2)
  base_hw = 64
  feats = [rs.randn(2, base_hw // s, base_hw // s, d).astype(np.float32)
           for s, d in zip((4, 8, 16, 32), dims)]
  ours = neck_lib.build_neck(m, jnp.float32, 'fpn')
  variables = util.to_flax(torch.nn.ModuleDict({'fpn': t}), neck_lib.torch_rules('fpn', (), m),
                           _shapes(ours, feats))
  with torch.no_grad():
    want = util.nhwc(t([util.nchw(f) for f in feats]))
  _check(f'neck {fpn_type} ega={use_ega} token={token}', ours.apply(variables, feats).materialize(),
         want)


def test_ega_init_matches_upstream_kernels():
  ours = neck_lib.EGA()
  v = ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))
  t = ref.EGA(8)
  for name, key in (('scharr_x', t.scharr.conv_x), ('scharr_y', t.scharr.conv_y),
                    ('gaussian', t.gaussian.gaussian)):
    np.testing.assert_allclose(np.asarray(v['params'][name]['kernel']),
                               key.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-6)


@pytest.mark.parametrize('text_dim', [24, 32])
def test_head(text_dim):
  torch.manual_seed(0)
  c = 32
  m = _cfg(fpn_dim=c, head_heads=4, decoder_ffn=40, gn_groups=8, num_classes=1)
  t = ref.MaskHead(c, text_dim, 1, 4, 5, 2, 40, 0.1, 8)
  ref.randomize_(t, scale=2.0)
  t.eval()
  rs = np.random.RandomState(3)
  x = rs.randn(2, 16, 16, c).astype(np.float32)
  text = rs.randn(2, 8, text_dim).astype(np.float32)
  ours = head_lib.build_head(m, jnp.float32)
  variables = util.to_flax(torch.nn.ModuleDict({'mask_head': t}),
                           head_lib.torch_rules('mask_head', (), m, text_dim),
                           _shapes(ours, x, text))
  with torch.no_grad():
    want = util.nhwc(t(util.nchw(x), torch.from_numpy(text)))
  _check(f'head text_dim={text_dim}', ours.apply(variables, x, text), want)


def test_head_multiclass_and_train_mode_runs():
  c = 32
  m = _cfg(fpn_dim=c, head_heads=4, decoder_ffn=40, gn_groups=8, num_classes=3)
  ours = head_lib.build_head(m, jnp.float32)
  x = jnp.ones((2, 8, 8, c))
  text = jnp.ones((2, 8, 16))
  v = ours.init(jax.random.PRNGKey(0), x, text)
  y = ours.apply(v, x, text, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  assert y.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize('cx', [32, 24])
def test_head_folds_a_deferred_conv_exactly(cx):
  """The head on DeferredDense(z, K, b) (the neck's EGA conv folded into the head's weights)
  equals the head on z @ K + b: logits and every gradient (z, K, b, head parameters), in train
  mode with the same dropout draws."""
  c = 32
  m = _cfg(fpn_dim=c, head_heads=4, decoder_ffn=40, gn_groups=8, num_classes=2)
  head = head_lib.build_head(m, jnp.float32)
  rs = np.random.RandomState(6)
  z = jnp.asarray(rs.randn(2, 8, 8, cx), jnp.float32)
  k = jnp.asarray(rs.randn(cx, c) / np.sqrt(cx), jnp.float32)
  bias = jnp.asarray(rs.randn(c), jnp.float32)
  text = jnp.asarray(rs.randn(2, 8, 16), jnp.float32)
  params = head.init(jax.random.PRNGKey(0), z @ k + bias, text)['params']
  rngs = {'dropout': jax.random.PRNGKey(1)}

  def loss(params, z, k, bias, deferred):
    x = layers.DeferredDense(z, k, bias) if deferred else z @ k + bias
    y = head.apply({'params': params}, x, text, train=True, rngs=rngs)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  (g_ours, y_ours) = grad(params, z, k, bias, True)
  (g_want, y_want) = grad(params, z, k, bias, False)
  _check('deferred conv: logits', y_ours, y_want)
  want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(g_want)}
  largest = max(float(jnp.max(jnp.abs(v))) for v in want.values())
  for path, a in jax.tree_util.tree_leaves_with_path(g_ours):
    name, b = jax.tree_util.keystr(path), want[jax.tree_util.keystr(path)]
    if float(jnp.max(jnp.abs(b))) < TOL * largest:
      # Zero in exact maths (key biases: softmax drops them; out_conv1's bias: one channel per
      # GroupNorm group): both sides are float32 noise, compared on the largest gradient's scale.
      assert float(jnp.max(jnp.abs(a - b))) <= TOL * largest, name
      continue
    _check(f'deferred conv: grad {name}', a, b)
  with pytest.raises(AssertionError):  # the check can fail: a wrong bias is seen
    _check('wrong bias', loss(params, z, k, bias + 1.0, True)[1], y_want)


def test_pixel_attention_vjp_equals_autodiff_with_dropout():
  """head.attend_pixels' written-out VJP (used in training) against autodiff of the same maths,
  with a dropout keep mask on the weights and cotangents on both outputs."""
  rs = np.random.RandomState(5)
  x = jnp.asarray(rs.randn(2, 40, 12), jnp.float32)
  qk = jnp.asarray(rs.randn(2, 3, 4, 12), jnp.float32)
  keep = jnp.asarray((rs.rand(2, 3, 4, 40) > 0.3) / 0.7, jnp.float32)
  def loss(fn):
    def f(x, qk):
      pooled, wsum = fn(x, qk)
      return jnp.sum(jnp.sin(pooled)) + jnp.sum(jnp.cos(3 * wsum))
    return f
  ours = jax.grad(loss(lambda x, qk: head_lib.attend_pixels(x, qk, keep)), argnums=(0, 1))(x, qk)
  plain = jax.grad(loss(lambda x, qk: head_lib._attend_pool(x, qk, keep)[:2]),  # pylint: disable=protected-access
                   argnums=(0, 1))(x, qk)
  for a, b in zip(ours, plain):  # float32 sums in another order: relative to the largest
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
  without = head_lib.attend_pixels(x, qk)
  with_ones = head_lib.attend_pixels(x, qk, jnp.ones_like(keep))
  for a, b in zip(without, with_ones):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
