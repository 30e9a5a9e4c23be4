"""Whole-model parity with the torch reference, upstream key coverage, converter round trips."""

import ast
import pathlib
import re

import jax
import numpy as np
import pytest
import torch

from configs import base
from segchange_jax.interop import checkpoints
from segchange_jax.models import segchange
from segchange_jax.models import torch_rules as tc
from tests.torch_ref import segchange as ref
from tests.torch_ref import util

REPO = pathlib.Path(__file__).resolve().parents[2]
# tests/upstream_keys/README.md says where these key lists come from.
UPSTREAM_KEYS = pathlib.Path(__file__).resolve().parents[1] / 'upstream_keys'
TSV = {'swin_base_patch4_window7_224': 'state_dict_v1_swin.tsv',
       'resnet50': 'state_dict_v2_resnet50.tsv', 'hgnetv2': 'state_dict_v3_hgnetv2.tsv'}


def _tsv(backbone) -> dict:
  out = {}
  for line in (UPSTREAM_KEYS / TSV[backbone]).read_text().splitlines()[1:]:
    key, shape = line.split('\t')[:2]
    out[key] = tuple(ast.literal_eval(shape))
  return out


def upstream_config(variant: str):
  """The three upstream variants (tests/upstream_keys/README.md) at full size."""
  c = base.get_config()
  m = c.model
  if variant == 'resnet50':
    m.backbone, m.bev, m.fpn_type, m.diff_attention, m.use_ega = (
        'resnet50', 'Transformer', 'FPN', 'SE', False)
    c.text.dim = 2048
  elif variant == 'hgnetv2':
    m.backbone, m.fpn_type, m.diff_attention, m.use_ega, m.use_token_connector = (
        'hgnetv2', 'FPN', 'SE', False, True)
  return c


def small_config(variant: str):
  """Small widths of the same variant (for CPU parity tests)."""
  c = upstream_config(variant)
  m = c.model
  m.out_dims = (32, 32, 32, 32)
  m.fpn_dim, m.token_dim, m.gn_groups, m.head_heads = 32, 16, 4, 4
  m.decoder_ffn, m.bev_heads, m.bev_transformer_ffn = 48, 4, 48
  m.swin.embed_dim, m.swin.depths, m.swin.num_heads = 32, (1, 1, 2, 1), (1, 2, 4, 8)
  c.text.dim = 24
  return c


def _parity(config, size, batch=2, seed=0):
  torch.manual_seed(seed)
  tmodel = ref.randomize_(ref.build_change_model(config), seed).eval()
  rules, aliases, ignore = segchange.torch_mapping(config)
  model = segchange.build_model(config)
  expected = segchange.variable_shapes(model, size)
  variables = util.to_flax(tmodel, rules, expected, aliases=aliases, ignore=ignore)
  rs = np.random.RandomState(seed)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(batch, 8, config.text.dim).astype(np.float32)
  with torch.no_grad():
    want = util.nhwc(tmodel(util.nchw(a), util.nchw(b), torch.from_numpy(text)))
  got = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t))(variables, a, b, text)
  err = util.rel_err(got, want)
  print(f'{config.model.backbone}/{config.model.bev}/{config.model.fpn_type}/'
        f'{config.model.diff_attention} ega={config.model.use_ega} '
        f'token={config.model.use_token_connector} {size}px: max abs err / max|logit| = {err:.2e}'
        f' (max|logit| {np.abs(want).max():.3g})')
  return err, tmodel, (got, want, (a, b, text))


@pytest.mark.parametrize('variant,size', [('swin_base_patch4_window7_224', 128),
                                          ('resnet50', 64), ('hgnetv2', 64)])
def test_whole_model_parity(variant, size):
  err, _, _ = _parity(small_config(variant), size)
  assert err <= 1e-4


def test_converter_round_trip_exact():
  config = small_config('resnet50')
  torch.manual_seed(0)
  tmodel = ref.randomize_(ref.build_change_model(config), 3)
  sd = util.state_dict_numpy(tmodel)
  variables = segchange.load_torch_state_dict(config, {'model': {f'module.{k}': v
                                                                 for k, v in sd.items()}})
  back = segchange.export_torch_state_dict(config, variables)
  assert set(back) == set(sd) - {k for k in sd if 'backbone.fc.' in k}
  for k, v in back.items():
    if k.endswith('num_batches_tracked'):
      assert v == 0 and v.dtype == np.int64
    else:
      np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_wrong_variant_lists_every_problem():
  swin_cfg = small_config('swin_base_patch4_window7_224')
  tmodel = ref.build_change_model(swin_cfg)
  sd = util.state_dict_numpy(tmodel)
  cfg = small_config('swin_base_patch4_window7_224')
  cfg.model.diff_attention = 'SE'     # checkpoint has CBAM
  cfg.model.out_dims = (32, 32, 32, 48)  # one scale wider
  with pytest.raises(tc.ConversionError) as e:
    segchange.load_torch_state_dict(cfg, sd, source='ckpt.pth')
  msg = str(e.value)
  assert 'ckpt.pth' in msg
  assert 'feature_diff.attention.0.channel_attention.1.weight' in msg  # unexpected
  assert 'feature_diff.attention.0.fc.0.weight' in msg                 # missing
  assert 'dual_encoder.conv_list.3.weight' in msg                      # wrong shape


def test_checkpoint_of_another_backbone_is_named_and_listed_briefly():
  sd = util.state_dict_numpy(ref.build_change_model(small_config('hgnetv2')))
  with pytest.raises(tc.ConversionError) as e:
    checkpoints.convert_torch_state_dict(small_config('swin_base_patch4_window7_224'), sd,
                                         source='hg.pth')
  msg = str(e.value)
  assert 'hg.pth' in msg
  assert "looks like an HGNetv2 (model.backbone='hgnetv2'" in msg
  assert "this config has model.backbone='swin_base_patch4_window7_224'" in msg
  # Hundreds of keys are wrong: each list shows its first few and counts the rest.
  assert re.search(r'^\d+ unexpected keys .*\n(  .*\n){12}  \.\.\. and \d+ more$', msg, re.M)
  assert re.search(r'^\d+ missing keys:\n(  .*\n){12}  \.\.\. and \d+ more$', msg, re.M)
  assert len(msg.splitlines()) < 50  # three lists of 12 + their titles and the diagnosis


@pytest.mark.parametrize('variant', list(TSV))
def test_mapping_covers_upstream_state_dict(variant):
  """Rules (+ aliases + ignored) name exactly the tsv keys, with the tsv shapes."""
  config = upstream_config(variant)
  want = _tsv(variant)
  rules, aliases, ignore = segchange.torch_mapping(config)
  flat = tc.flatten(segchange.variable_shapes(segchange.build_model(config), 64))
  ours = {r.torch_key: tuple(tc.to_torch(np.zeros(flat[r.path].shape), r.kind).shape)
          for r in rules}
  assert len({r.path for r in rules}) == len(rules) == len(flat)
  for alias, canonical in aliases.items():
    ours[alias] = ours[canonical]
  ignored = {k for k in want if k not in ours and any(re.fullmatch(p, k) for p in ignore)}
  assert set(ours) == set(want) - ignored, sorted(set(ours) ^ (set(want) - ignored))[:10]
  assert all(ours[k] == want[k] for k in ours)
  assert all(k.endswith('num_batches_tracked') or 'backbone.fc.' in k for k in ignored)


@pytest.mark.parametrize('variant', list(TSV))
def test_torch_reference_keys_equal_upstream(variant):
  config = upstream_config(variant)
  tmodel = ref.build_change_model(config)
  got = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
  assert got == _tsv(variant)


@pytest.mark.slow
def test_swin_b_default_parity_512():
  """Upstream default (Swin-B, 256-wide neck/head) at 512x512, float32 vs a float64 reference.

  With random full-size weights the float32 rounding of ANY implementation is amplified through
  24 Swin blocks and the difference products; we must be within 1e-4 of the float64 truth, or
  no worse than 2x torch's own float32 error against it.
  """
  config = upstream_config('swin_base_patch4_window7_224')
  err32, tmodel, (ours, torch32, (a, b, text)) = _parity(config, 512, batch=1)
  with torch.no_grad():
    want = util.nhwc(tmodel.double()(util.nchw(a).double(), util.nchw(b).double(),
                                     torch.from_numpy(text).double()))
  ours_err, torch_err = util.rel_err(ours, want), util.rel_err(torch32, want)
  print(f'Swin-B 512: ours vs torch f32 {err32:.2e}; vs torch f64: ours {ours_err:.2e}, '
        f'torch f32 {torch_err:.2e}')
  assert ours_err <= 1e-4 or ours_err <= 2 * torch_err
