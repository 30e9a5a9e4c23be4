"""ResNet-50 backbone: upstream key mapping, parity with torchvision, torch BatchNorm training."""

import copy
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision

from configs import base
from segchange_jax.models import torch_rules
from segchange_jax.models.backbones import backbone_channels
from segchange_jax.models.backbones import backbone_torch_mapping
from segchange_jax.models.backbones import build_backbone
from segchange_jax.models.backbones import resnet

TSV = pathlib.Path(__file__).resolve().parents[1] / 'upstream_keys' / 'state_dict_v2_resnet50.tsv'
PREFIX = 'dual_encoder.encoder.backbone.'


def _cfg(depths=(3, 4, 6, 3), width=64) -> ml_collections.ConfigDict:
  cfg = base.get_config()
  cfg.model.backbone = 'resnet50'
  cfg.model.resnet.depths = depths
  cfg.model.resnet.width = width
  return cfg.model


def _tsv(path: pathlib.Path, prefix: str) -> dict[str, tuple[int, ...]]:
  out = {}
  for line in path.read_text().splitlines()[1:]:
    key, shape = line.split('\t')[:2]
    if key.startswith(prefix):
      out[key] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
  return out


def _flax_shapes(model, size=64):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  m = torchvision.models.resnet50(weights=None)
  # Non-trivial BatchNorm stats/affines so eval mode is not the identity.
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        c = mod.num_features
        mod.weight.copy_(0.5 + torch.rand(c, generator=g))
        mod.bias.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return m.eval()


def _to_flax(torch_model, cfg):
  """Converts torchvision weights through our rules, with the upstream key prefix."""
  rules, aliases, ignore = backbone_torch_mapping(cfg, flax_prefix=())
  sd = {PREFIX + k: v.numpy() for k, v in torch_model.state_dict().items()}
  model = build_backbone(cfg)
  variables = torch_rules.convert(sd, rules, expected=_flax_shapes(model), ignore=ignore,
                                    aliases=aliases, source='torchvision resnet50')
  return model, variables


def test_mapping_matches_upstream_keys_and_shapes():
  cfg = _cfg()
  want = _tsv(TSV, 'dual_encoder.encoder.')
  rules, aliases, ignore = backbone_torch_mapping(cfg, flax_prefix=())
  flat = torch_rules.flatten(_flax_shapes(build_backbone(cfg)))
  got = {}
  for r in rules:
    got[r.torch_key] = tuple(torch_rules.to_torch(np.zeros(flat[r.path].shape), r.kind).shape)
  for alias, canon in aliases.items():
    got[alias] = got[canon]
  ignored = {k for k in want if any(re.fullmatch(p, k) for p in ignore)}
  assert {k for k in ignored if not k.endswith('num_batches_tracked')} == {
      PREFIX + 'fc.weight', PREFIX + 'fc.bias'}
  assert got == {k: v for k, v in want.items() if k not in ignored}
  # Every Flax variable has exactly one rule: 53 convs + 53 BatchNorms x 4 tensors; each is
  # stored twice upstream (plus 53 x 2 num_batches_tracked and fc.weight/bias).
  assert len({r.path for r in rules}) == len(rules) == len(flat) == 53 * 5
  assert len(aliases) == len(rules)
  assert len(want) == 2 * (len(rules) + 53) + 2


def test_aliases_must_agree():
  cfg = _cfg(depths=(1, 1, 1, 1), width=16)
  rules, aliases, ignore = backbone_torch_mapping(cfg, flax_prefix=())
  model = build_backbone(cfg)
  shapes = _flax_shapes(model)
  variables = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  sd = torch_rules.export(variables, rules)
  for alias, canon in aliases.items():
    sd[alias] = sd[canon]
  torch_rules.convert(sd, rules, expected=shapes, ignore=ignore, aliases=aliases)
  sd['dual_encoder.encoder.layer0.0.weight'] = sd[PREFIX + 'conv1.weight'] + 1
  with pytest.raises(torch_rules.ConversionError, match='layer0.0.weight'):
    torch_rules.convert(sd, rules, expected=shapes, ignore=ignore, aliases=aliases)


def test_parity_with_torchvision_eval(torch_model):
  cfg = _cfg()
  model, variables = _to_flax(torch_model, cfg)
  x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    t = torch_model
    y = t.maxpool(t.relu(t.bn1(t.conv1(torch.from_numpy(x)))))
    refs = []
    for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
      y = layer(y)
      refs.append(y.permute(0, 2, 3, 1).numpy())
  outs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
  assert [o.shape[-1] for o in outs] == list(backbone_channels(cfg)) == [256, 512, 1024, 2048]
  for i, (o, r) in enumerate(zip(outs, refs)):
    assert o.shape == r.shape
    err, scale = float(np.max(np.abs(np.asarray(o) - r))), float(np.max(np.abs(r)))
    print(f'resnet50 eval layer{i + 1}: max abs err {err:.3e}, max |ref| {scale:.3e}, '
          f'rel {err / scale:.2e}')
    assert err <= 1e-4 * scale


def _torch_train_step(model, x):
  """One train-mode forward of a copy of `model`; returns (layer1..4 NHWC, state_dict)."""
  model = copy.deepcopy(model).train()
  with torch.no_grad():
    y = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      y = layer(y)
      outs.append(y.permute(0, 2, 3, 1).double().numpy())
  return outs, {k: v.double().numpy() for k, v in model.state_dict().items()}


def test_train_mode_batchnorm_matches_torch(torch_model):
  """One train-mode step: outputs and running stats (momentum 0.1, unbiased var) as torch.

  Train-mode BatchNorm renormalises by batch statistics of few samples (layer4 sees 2x2x2),
  which amplifies float32 rounding with depth: torch float32 itself is ~1e-4 relative away from
  torch float64 at layer4. So the reference is torch in float64, and the bound is the larger of
  1e-4 x max|ref| and twice torch float32's own error.
  """
  cfg = _cfg()
  model, variables = _to_flax(torch_model, cfg)
  x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
  ref, ref_sd = _torch_train_step(torch_model.double(), x.astype(np.float64))
  torch_model.float()
  t32, t32_sd = _torch_train_step(torch_model, x)
  outs, new_state = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
          variables, x.transpose(0, 2, 3, 1))
  for i, (o, r, t) in enumerate(zip(outs, ref, t32)):
    err, t_err = float(np.max(np.abs(np.asarray(o) - r))), float(np.max(np.abs(t - r)))
    scale = float(np.max(np.abs(r)))
    print(f'resnet50 train-mode layer{i + 1}: max abs err vs torch f64 {err:.3e} '
          f'(torch f32: {t_err:.3e}), max |ref| {scale:.3e}')
    assert err <= max(1e-4 * scale, 2 * t_err)
  # The updated running stats, exported back to torch names, equal torch's after one step.
  rules, _, _ = backbone_torch_mapping(cfg, flax_prefix=())
  exported = torch_rules.export(dict(variables, batch_stats=new_state['batch_stats']), rules)
  n, worst, worst_t = 0, 0.0, 0.0
  for key, value in exported.items():
    if key.endswith(('running_mean', 'running_var')):
      r = ref_sd[key[len(PREFIX):]]
      scale = np.max(np.abs(r)) + 1e-12
      worst = max(worst, float(np.max(np.abs(value - r)) / scale))
      worst_t = max(worst_t, float(np.max(np.abs(t32_sd[key[len(PREFIX):]] - r)) / scale))
      n += 1
  print(f'resnet50 running stats after one train step: {n} tensors, worst rel err vs torch f64 '
        f'{worst:.2e} (torch f32: {worst_t:.2e})')
  assert n == 2 * 53
  assert worst <= max(1e-4, 2 * worst_t)
  # A train-mode forward changes only batch_stats.
  assert set(new_state) == {'batch_stats'}


def test_tiny_variant_runs():
  cfg = _cfg(depths=(1, 1, 1, 1), width=16)
  model = build_backbone(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  shapes = _flax_shapes(model)
  assert set(shapes) == {'params', 'batch_stats'}
  # Random values from numpy: XLA:CPU is slow to compile `init`'s many RNG ops.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                           shapes)
  variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])
  outs, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert [o.shape for o in outs] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256),
                                     (2, 2, 2, 512)]
  assert resnet.channels(cfg) == (64, 128, 256, 512)
  assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
  # Running stats moved by a train-mode step.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state['batch_stats'],
                       variables['batch_stats'])
  assert min(jax.tree.leaves(moved)) > 0
