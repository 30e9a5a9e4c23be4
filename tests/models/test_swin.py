"""Swin backbone: upstream key coverage and numerical parity with timm 1.0.x (random weights)."""

import ast
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from segchange_jax.models import torch_rules as tc
from segchange_jax.models.backbones import backbone_torch_mapping
from segchange_jax.models.backbones import swin

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

REPO = pathlib.Path(__file__).resolve().parents[2]
# tests/upstream_keys/README.md says where these key lists come from.
UPSTREAM_KEYS = pathlib.Path(__file__).resolve().parents[1] / 'upstream_keys'
UPSTREAM_PREFIX = 'dual_encoder.encoder.backbone.'
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _cfg(**swin_fields):
  cfg = base.get_config().model
  for k, v in swin_fields.items():
    cfg.swin[k] = v
  return cfg


def _timm_swin(img_size, small=True, **kw):
  """timm features_only Swin with random, deliberately non-trivial weights (eval, float32)."""
  torch.manual_seed(0)
  dims = SMALL if small else {}
  model = timm.create_model('swin_base_patch4_window7_224', pretrained=False, features_only=True,
                            out_indices=(0, 1, 2, 3), img_size=img_size, **dims, **kw).eval()
  with torch.no_grad():
    # timm's init (LN = identity, bias table std 0.02) would hide wrong norm or bias indexing.
    for name, p in model.named_parameters():
      if 'relative_position_bias_table' in name:
        p.normal_(0.0, 1.0)
      elif p.ndim == 1:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5)
  return model


def _parity(tmodel, cfg, height, width, batch=2):
  """Max abs error / max |ref| for each of the 4 features."""
  x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    refs = [r.numpy() for r in tmodel(x)]  # features_only Swin returns NHWC
  model = swin.from_config(cfg)
  xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  rules, aliases, ignore = swin.torch_mapping('', (), cfg)
  variables = tc.convert({k: v.numpy() for k, v in tmodel.state_dict().items()}, rules,
                         expected=jax.eval_shape(model.init, jax.random.PRNGKey(0), xj),
                         aliases=aliases, ignore=ignore)
  outs = jax.jit(model.apply)(variables, xj)
  errs = []
  for out, ref in zip(outs, refs):
    assert out.shape == ref.shape
    errs.append(float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()))
  print(f'swin parity {height}x{width}: rel max err per stage {[f"{e:.2e}" for e in errs]}')
  return errs


def test_torch_mapping_covers_upstream_state_dict():
  """Our rules name exactly the upstream backbone keys, with the same torch shapes."""
  tsv = UPSTREAM_KEYS / 'state_dict_v1_swin.tsv'
  upstream = {}
  for line in tsv.read_text().splitlines()[1:]:
    key, shape = line.split('\t')[:2]
    if key.startswith(UPSTREAM_PREFIX):
      upstream[key] = tuple(ast.literal_eval(shape))
  cfg = base.get_config().model
  rules, aliases, _ = backbone_torch_mapping(cfg, flax_prefix=())
  model = swin.from_config(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  flat = tc.flatten(shapes)
  ours = {r.torch_key: tuple(tc.to_torch(np.zeros(flat[r.path].shape), r.kind).shape)
          for r in rules}
  assert not aliases
  assert set(ours) == set(upstream), (sorted(set(ours) ^ set(upstream))[:10])
  assert ours == upstream
  assert len({r.path for r in rules}) == len(flat) == len(upstream) == 325


def test_ignore_accepts_old_timm_buffers():
  """Checkpoints from older timm carry index / mask buffers: ignored, the rest converts."""
  cfg = _cfg(**SMALL)
  tmodel = _timm_swin(256)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  sd['layers_0.blocks.1.attn_mask'] = np.zeros((100, 49, 49), np.float32)
  sd['layers_0.blocks.1.attn.relative_position_index'] = np.zeros((49, 49), np.int64)
  rules, aliases, ignore = swin.torch_mapping('', (), cfg)
  tc.convert(sd, rules, aliases=aliases, ignore=ignore)
  sd['layers_0.blocks.1.attn.unknown'] = np.zeros(3)
  with pytest.raises(tc.ConversionError, match='unexpected'):
    tc.convert(sd, rules, aliases=aliases, ignore=ignore)


@pytest.mark.parametrize('size', [(256, 256), (256, 320)])
def test_parity_with_timm_built_at_input_size(size):
  """Stage maps 64/32/16/8 (and 80/40/20/10): all > 7, none a multiple of 7 -> padding."""
  tmodel = _timm_swin(size if size[0] != size[1] else size[0])
  errs = _parity(tmodel, _cfg(**SMALL), *size)
  assert max(errs) <= 1e-4


@pytest.mark.parametrize('size', [(128, 128), (96, 160)])
def test_small_inputs_keep_window7_shift3(size):
  """Stage maps <= 7: we keep window 7 / shift 3 with padding, as the 512-built upstream model.

  timm built at img_size=512 with strict_img_size=False keeps its construction-time windows and
  recomputes the shift mask for the actual (padded) map on every call: the reference here.
  """
  tmodel = _timm_swin(512, strict_img_size=False)
  assert tmodel.layers_3.blocks[1].window_size == (7, 7)
  assert tmodel.layers_3.blocks[1].shift_size == (3, 3)
  errs = _parity(tmodel, _cfg(**SMALL), *size)
  assert max(errs) <= 1e-4


def test_geometry_helpers():
  idx = swin.relative_position_index(7)
  assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 168
  assert (np.diag(idx) == 84).all()  # zero offset is the table's centre entry
  mask = swin.shift_mask(21, 14, 7, 3)
  assert mask.shape == (6, 49, 49)
  assert not mask[0].any()  # the top-left window holds one region only
  assert set(np.unique(mask)) == {0.0, -100.0}


def test_rejects_sizes_not_multiple_of_32():
  model = swin.from_config(_cfg(**SMALL))
  with pytest.raises(ValueError, match='multiples of 32'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 100, 96, 3)))


def test_bfloat16_smoke_and_drop_path():
  cfg = _cfg(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3))
  f32 = swin.from_config(cfg)
  # Random float32 params from the shapes alone (compiling `init` costs more than the test).
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32),
                           jax.eval_shape(f32.init, jax.random.PRNGKey(0), x))
  ref = jax.jit(f32.apply)(variables, x)
  out = jax.jit(swin.from_config(cfg, dtype=jnp.bfloat16).apply)(variables, x)
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  for o, r in zip(out, ref):
    assert o.dtype == jnp.bfloat16 and bool(jnp.isfinite(o).all())
    rel = float(jnp.abs(o.astype(jnp.float32) - r).max() / jnp.abs(r).max())
    print(f'bf16 vs f32 rel max err {rel:.3e}')
    assert rel < 0.1
  # Stochastic depth: active only in training, and needs a dropout rng.
  train = jax.jit(lambda v, r: f32.apply(v, x, train=True, rngs={'dropout': r}))(
      variables, jax.random.PRNGKey(3))
  assert not np.allclose(np.asarray(train[-1]), np.asarray(ref[-1]))


@pytest.mark.slow
def test_swin_base_parity_at_512():
  """Real Swin-B dims (128, depths 2/2/18/2, heads 4..32) at 512x512 vs timm built at 512."""
  tmodel = _timm_swin(512, small=False)
  start = time.time()
  errs = _parity(tmodel, base.get_config().model, 512, 512, batch=1)
  print(f'Swin-B 512 parity run {time.time() - start:.1f}s')
  assert max(errs) <= 1e-4
