"""config.model.pretrained: files in each real layout load and give the reference's features.

Each test builds a model with random, non-trivial weights in timm / torchvision / the torch
reference, saves it the way the weights are published (timm on the Hub: `model.safetensors` or
`pytorch_model.bin` of the full classifier; torchvision: `resnet50-<hash>.pth`; D-FINE:
`PPHGNetV2_B5_stage1.pth`), loads it through `segchange_jax.interop.pretrained` and compares our
backbone's four feature maps with the reference's on the same weights.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from segchange_jax import config_lib
from segchange_jax.interop import pretrained
from segchange_jax.models.backbones import build_backbone

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')
from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def _randomise(model):
  """Non-trivial weights: LN/BN affines off identity, BN stats off (0, 1), bias tables wide."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'relative_position_bias_table' in name:
        p.normal_(0.0, 1.0, generator=g)
      elif p.ndim == 1:
        base_value = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base_value + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5, generator=g)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def _config(backbone, **fields):
  cfg = base.get_config()
  cfg.model.backbone = backbone
  for section, values in fields.items():
    for k, v in values.items():
      cfg.model[section][k] = v
  return cfg


def _load(cfg, spec, size):
  """Our backbone and its variables after `pretrained.load` (as the trainer calls it)."""
  model = build_backbone(cfg.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # every leaf is replaced
  params = {'backbone': init['params']}
  state = {k: {'backbone': v} for k, v in init.items() if k != 'params'}
  cfg.model.pretrained = str(spec)
  config_lib.validate_config(cfg)
  params, state, report = pretrained.load(cfg, params, state)
  variables = {'params': params['backbone'], **{k: v['backbone'] for k, v in state.items()}}
  return model, variables, report


def _errors(model, variables, x, refs):
  """Max abs error / max |ref| per feature map (refs NCHW or NHWC as `nhwc_refs` says)."""
  outs = jax.jit(model.apply)(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  errs = []
  for out, ref in zip(outs, refs):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    errs.append(float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()))
  return errs


def _nchw_to_nhwc(feats):
  return [f.numpy().transpose(0, 2, 3, 1) for f in feats]


def _timm_features(name, path, size=None, **kw):
  """timm's own features_only model, loading the same file through timm's own loader."""
  extra = {'img_size': size} if size else {}
  return timm.create_model(name, pretrained=True, features_only=True, out_indices=(0, 1, 2, 3),
                           pretrained_cfg_overlay={'file': str(path)}, **extra, **kw).eval()


@pytest.fixture(scope='module')
def tiny_swin_files(tmp_path_factory):
  """A tiny timm Swin classifier saved as timm publishes it: model.safetensors and .bin."""
  torch.manual_seed(0)
  model = _randomise(timm.create_model('swin_base_patch4_window7_224', **TINY_SWIN))
  d = tmp_path_factory.mktemp('tiny_swin')
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(sd, str(d / 'model.safetensors'))
  (d / 'bin').mkdir()
  torch.save(sd, d / 'bin' / 'pytorch_model.bin')
  return d


def test_swin_timm_safetensors_matches_timm_features(tiny_swin_files):
  path = tiny_swin_files / 'model.safetensors'
  ref = _timm_features('swin_base_patch4_window7_224', path, 256, **TINY_SWIN)
  x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    refs = [r.numpy() for r in ref(x)]  # timm's Swin features are NHWC
  model, variables, report = _load(_config('swin_base_patch4_window7_224', swin=TINY_SWIN),
                                   path, 256)
  errs = _errors(model, variables, x, refs)
  print(f'tiny swin from model.safetensors: rel max err per stage {errs}')
  assert max(errs) <= 1e-4
  assert report['loaded'] == 65 and report['layout'] == 'timm Swin'
  assert sorted(u.split()[0] for u in report['unused']) == [
      'head.fc.bias', 'head.fc.weight', 'norm.bias', 'norm.weight']


def test_swin_pytorch_model_bin_and_folder_give_the_same_variables(tiny_swin_files):
  cfg = _config('swin_base_patch4_window7_224', swin=TINY_SWIN)
  _, from_st, _ = _load(cfg, tiny_swin_files, 64)  # a folder: its model.safetensors
  _, from_bin, report = _load(cfg, tiny_swin_files / 'bin' / 'pytorch_model.bin', 64)
  assert report['path'].endswith('pytorch_model.bin')
  jax.tree.map(np.testing.assert_array_equal, from_st, from_bin)


def test_swin_old_layout_merging_at_stage_end(tiny_swin_files):
  """timm < 0.9 / Microsoft's release put patch merging at the end of stage N, head.weight."""
  cfg = _config('swin_base_patch4_window7_224', swin=TINY_SWIN)
  sd = pretrained.read_state_dict(str(tiny_swin_files / 'model.safetensors'))
  old = {}
  for k, v in sd.items():
    for i in (1, 2, 3):
      k = k.replace(f'layers.{i}.downsample.', f'layers.{i - 1}.downsample.')
    old[k.replace('head.fc.', 'head.')] = v
  old['layers.0.blocks.0.attn.relative_position_index'] = np.zeros((49, 49), np.int64)
  torch.save({'model': {k: torch.from_numpy(np.asarray(v)) for k, v in old.items()}},
             tiny_swin_files / 'swin_old.pth')
  _, new_vars, _ = _load(cfg, tiny_swin_files / 'model.safetensors', 64)
  _, old_vars, report = _load(cfg, tiny_swin_files / 'swin_old.pth', 64)
  jax.tree.map(np.testing.assert_array_equal, new_vars, old_vars)
  assert report['skipped'] == ['layers_0.blocks.0.attn.relative_position_index']


@pytest.mark.slow
def test_swin_b_at_512_matches_timm(tmp_path):
  """The real Swin-B layout (88M parameters) at upstream's 512 px, batch 1."""
  torch.manual_seed(0)
  model = _randomise(timm.create_model('swin_base_patch4_window7_224'))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / 'model.safetensors'))
  del model
  ref = _timm_features('swin_base_patch4_window7_224', tmp_path / 'model.safetensors', 512)
  x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    refs = [r.numpy() for r in ref(x)]
  del ref
  ours, variables, report = _load(_config('swin_base_patch4_window7_224'),
                                  tmp_path / 'model.safetensors', 64)
  errs = _errors(ours, variables, x, refs)
  print(f'Swin-B 512 px from model.safetensors: rel max err per stage {errs}')
  assert max(errs) <= 1e-4
  assert report['loaded'] == 325


def _torchvision_features(model, x):
  feats = []
  with torch.no_grad():
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      h = layer(h)
      feats.append(h)
  return _nchw_to_nhwc(feats)


@pytest.mark.parametrize('depths', [
    (1, 1, 1, 1),
    pytest.param((3, 4, 6, 3), marks=pytest.mark.slow),
])
def test_resnet_torchvision_pth_matches_torchvision(tmp_path, depths):
  """torchvision publishes `resnet50-<hash>.pth`: a torch.save'd bare state_dict with fc."""
  torch.manual_seed(0)
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(depths))
  tv = _randomise(tv)
  torch.save(tv.state_dict(), tmp_path / 'resnet50-0676ba61.pth')
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  refs = _torchvision_features(tv, x)
  model, variables, report = _load(_config('resnet50', resnet={'depths': depths}),
                                   tmp_path / 'resnet50-0676ba61.pth', 64)
  errs = _errors(model, variables, x, refs)
  print(f'resnet depths {depths} from resnet50-*.pth: rel max err per stage {errs}')
  assert max(errs) <= 1e-4
  assert sorted(u.split()[0] for u in report['unused']) == ['fc.bias', 'fc.weight']
  assert all(k.endswith('num_batches_tracked') for k in report['skipped'])
  # BatchNorm running statistics are part of the start (model state, not params).
  np.testing.assert_array_equal(np.asarray(variables['batch_stats']['bn1']['var']),
                                tv.bn1.running_var.numpy())


def test_resnet_timm_safetensors_matches_timm_features(tmp_path):
  """timm/resnet50.tv_in1k on the Hub: the same weights as a timm model.safetensors."""
  torch.manual_seed(0)
  model = _randomise(timm.create_model('resnet50', layers=(1, 1, 1, 1)))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / 'model.safetensors'))
  ref = timm.create_model('resnet50', layers=(1, 1, 1, 1), pretrained=True, features_only=True,
                          out_indices=(1, 2, 3, 4),
                          pretrained_cfg_overlay={'file': str(tmp_path / 'model.safetensors')})
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    refs = _nchw_to_nhwc(ref.eval()(x))
  ours, variables, _ = _load(_config('resnet50', resnet={'depths': (1, 1, 1, 1)}),
                             tmp_path / 'model.safetensors', 64)
  errs = _errors(ours, variables, x, refs)
  print(f'tiny timm resnet from model.safetensors: rel max err per stage {errs}')
  assert max(errs) <= 1e-4


def test_hgnetv2_dfine_stage1_pth_matches_reference(tmp_path):
  """Upstream's hgnetv2.py loads PPHGNetV2_B5_stage1.pth with strict load_state_dict."""
  from tests.torch_ref.hgnetv2 import HGNetv2Ref  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = _randomise(HGNetv2Ref())
  torch.save(ref.state_dict(), tmp_path / 'PPHGNetV2_B5_stage1.pth')
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    refs = _nchw_to_nhwc(ref(x))
  model, variables, report = _load(_config('hgnetv2'), tmp_path / 'PPHGNetV2_B5_stage1.pth', 64)
  errs = _errors(model, variables, x, refs)
  print(f'HGNetv2-B5 from PPHGNetV2_B5_stage1.pth: rel max err per stage {errs}')
  assert max(errs) <= 1e-4
  assert report['loaded'] == 650 and not report['unused'] and not report['skipped']
  assert report['layout'].startswith('D-FINE')


@pytest.mark.slow
def test_hgnetv2_timm_safetensors_matches_timm_features(tmp_path):
  """timm/hgnetv2_b5.ssld_stage1_in22k_in1k ('imagenet' for HGNetv2): timm's layout."""
  torch.manual_seed(0)
  model = _randomise(timm.create_model('hgnetv2_b5'))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / 'model.safetensors'))
  ref = _timm_features('hgnetv2_b5', tmp_path / 'model.safetensors')
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    refs = _nchw_to_nhwc(ref(x))
  ours, variables, report = _load(_config('hgnetv2'), tmp_path / 'model.safetensors', 64)
  errs = _errors(ours, variables, x, refs)
  print(f'HGNetv2-B5 from timm model.safetensors: rel max err per stage {errs}')
  assert max(errs) <= 1e-4
  assert report['layout'] == 'timm hgnetv2'
  assert sorted(u.split()[0] for u in report['unused']) == [
      'head.fc.bias', 'head.fc.weight', 'head.last_conv.0.weight']


# ------------------------------------------------------------------------------ bad input


def test_resnet_file_for_swin_names_the_tensors_and_what_it_looks_like(tmp_path):
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
  torch.save(tv.state_dict(), tmp_path / 'resnet50-0676ba61.pth')
  with pytest.raises(pretrained.PretrainedError) as e:
    _load(_config('swin_base_patch4_window7_224', swin=TINY_SWIN),
          tmp_path / 'resnet50-0676ba61.pth', 64)
  msg = str(e.value)
  assert 'conv1.weight (64, 3, 7, 7)' in msg and 'patch_embed.proj.weight' in msg, msg
  assert "bottleneck ResNet (model.backbone='resnet50' with model.resnet.depths=(1, 1, 1, 1)" \
      in msg, msg


def test_shape_mismatch_names_the_tensor(tiny_swin_files):
  cfg = _config('swin_base_patch4_window7_224',
                swin=dict(TINY_SWIN, embed_dim=48, num_heads=(1, 2, 4, 8)))
  with pytest.raises(pretrained.PretrainedError) as e:
    _load(cfg, tiny_swin_files / 'model.safetensors', 64)
  msg = str(e.value)
  assert 'tensor patch_embed.proj.weight has shape (32, 3, 4, 4)' in msg, msg
  assert 'expects (48, 3, 4, 4)' in msg and 'model.swin.embed_dim=32' in msg, msg


def test_missing_tensors_and_whole_model_checkpoints_are_refused(tiny_swin_files, tmp_path):
  cfg = _config('swin_base_patch4_window7_224', swin=TINY_SWIN)
  sd = pretrained.read_state_dict(str(tiny_swin_files / 'model.safetensors'))
  part = {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith('layers.3.')}
  torch.save(part, tmp_path / 'part.pth')
  with pytest.raises(pretrained.PretrainedError, match=r'lacks \d+ tensors.*layers_3'):
    _load(cfg, tmp_path / 'part.pth', 64)
  whole = {'dual_encoder.encoder.backbone.' + k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({'model': whole}, tmp_path / 'best_iou.pth')
  with pytest.raises(pretrained.PretrainedError, match='config.init_from=PATH'):
    _load(cfg, tmp_path / 'best_iou.pth', 64)


def test_config_values(tmp_path, repo_root):
  cfg = base.get_config()
  for ok in ('', 'imagenet', 'timm/resnet50.tv_in1k', 'timm/resnet50.tv_in1k@main',
             '/nowhere/model.safetensors'):
    cfg.model.pretrained = ok
    config_lib.validate_config(cfg)
  for bad, match in (('True', 'not a boolean'), ('a b/c', 'neither an existing file')):
    cfg.model.pretrained = bad
    with pytest.raises(config_lib.ConfigError, match=rf'^config\.model\.pretrained=.*{match}'):
      config_lib.validate_config(cfg)
  cfg.model.pretrained = str(tmp_path / 'missing.pth')
  with pytest.raises(FileNotFoundError, match='config.model.pretrained'):
    pretrained.resolve(cfg.model.pretrained, cfg.model.backbone)
  # Upstream variants start from ImageNet weights, the demo from random ones.
  for name, want in (('levir', 'imagenet'), ('dvcd', 'imagenet'), ('whu', 'imagenet'),
                     ('sysu_fewshot', 'imagenet'), ('demo', ''), ('demo_llm', '')):
    config = config_lib.load_config(str(repo_root / f'configs/{name}.py'))
    assert config.model.pretrained == want, name


def test_saved_configs_with_the_old_boolean_still_load():
  values = json.loads(base.get_config().to_json())
  values['model']['pretrained'] = True
  assert config_lib.config_from_dict(values).model.pretrained == ''


def test_backbone_state_dict_is_timm_layout_and_round_trips(tiny_swin_files):
  """Our backbone saved for `pretrained`: timm's own model accepts it, we read it back equal."""
  cfg = _config('swin_base_patch4_window7_224', swin=TINY_SWIN)
  _, variables, _ = _load(cfg, tiny_swin_files / 'model.safetensors', 64)
  sd = pretrained.backbone_state_dict(cfg, {k: {'backbone': v} for k, v in variables.items()})
  tmodel = timm.create_model('swin_base_patch4_window7_224', **TINY_SWIN)
  result = tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == ['head.fc.bias', 'head.fc.weight', 'norm.bias',
                                         'norm.weight']
  original = pretrained.read_state_dict(str(tiny_swin_files / 'model.safetensors'))
  for k, v in sd.items():
    np.testing.assert_array_equal(v, original[k])
