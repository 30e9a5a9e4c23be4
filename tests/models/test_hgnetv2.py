"""HGNetv2-B5 backbone: upstream key names, parity with a clean-room torch reference, frozen
stem."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import base
from segchange_jax.models import torch_rules
from segchange_jax.models.backbones import backbone_channels
from segchange_jax.models.backbones import backbone_frozen_param_paths
from segchange_jax.models.backbones import backbone_torch_mapping
from segchange_jax.models.backbones import build_backbone
from segchange_jax.models.backbones import hgnetv2
from tests.torch_ref.hgnetv2 import FrozenBN
from tests.torch_ref.hgnetv2 import HGNetv2Ref

PREFIX = 'dual_encoder.encoder.'
TSV = pathlib.Path(__file__).resolve().parents[1] / 'upstream_keys' / 'state_dict_v3_hgnetv2.tsv'


def _cfg() -> ml_collections.ConfigDict:
  cfg = base.get_config()
  cfg.model.backbone = 'hgnetv2'
  return cfg.model


def _upstream_keys() -> dict[str, tuple[int, ...]]:
  out = {}
  for line in TSV.read_text().splitlines()[1:]:
    key, shape = line.split('\t')[:2]
    if key.startswith(PREFIX):
      out[key] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
  return out


@pytest.fixture(scope='module')
def torch_ref():
  torch.manual_seed(0)
  model = HGNetv2Ref()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, FrozenBN):
        c = mod.weight.numel()
        mod.weight.copy_(0.5 + torch.rand(c, generator=g))
        mod.bias.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return model.eval()


def _shapes(model, h=64, w=64):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))


def test_torch_ref_keys_match_upstream(torch_ref):
  want = {k[len(PREFIX):]: v for k, v in _upstream_keys().items()}
  got = {k: tuple(v.shape) for k, v in torch_ref.state_dict().items()}
  assert got == want
  assert len(got) == 650


def test_mapping_matches_upstream_keys_and_shapes():
  cfg = _cfg()
  rules, aliases, _ = backbone_torch_mapping(cfg, flax_prefix=())
  flat = torch_rules.flatten(_shapes(build_backbone(cfg)))
  got = {r.torch_key: tuple(torch_rules.to_torch(np.zeros(flat[r.path].shape), r.kind).shape)
         for r in rules}
  assert got == _upstream_keys()
  assert not aliases
  assert len({r.path for r in rules}) == len(rules) == len(flat)
  # Convs are the only trainable tensors; every FrozenBatchNorm tensor sits in 'frozen'.
  assert {p[0] for p in flat} == {'params', 'frozen'}
  assert all(p[-1] == 'kernel' for p in flat if p[0] == 'params')
  assert backbone_channels(cfg) == (128, 512, 1024, 2048)
  frozen = backbone_frozen_param_paths(cfg, flax_prefix=())
  assert sorted(frozen) == sorted(p for p in flat if p[0] == 'params' and p[1] == 'stem')


def test_parity_with_torch_reference(torch_ref):
  cfg = _cfg()
  model = build_backbone(cfg)
  rules, aliases, ignore = backbone_torch_mapping(cfg, flax_prefix=())
  sd = {PREFIX + k: v.numpy() for k, v in torch_ref.state_dict().items()}
  # Odd-ish, non-square size: exercises the one-sided stem padding and strided rounding.
  x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
  variables = torch_rules.convert(sd, rules, expected=_shapes(model, 64, 96), ignore=ignore,
                                    aliases=aliases, source='torch reference')
  with torch.no_grad():
    refs = [r.permute(0, 2, 3, 1).numpy() for r in torch_ref(torch.from_numpy(x))]
  outs = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
  assert [o.shape for o in outs] == [r.shape for r in refs] == [
      (2, 16, 24, 128), (2, 8, 12, 512), (2, 4, 6, 1024), (2, 2, 3, 2048)]
  for i, (o, r) in enumerate(zip(outs, refs)):
    err, scale = float(np.max(np.abs(np.asarray(o) - r))), float(np.max(np.abs(r)))
    print(f'hgnetv2-B5 stage{i}: max abs err {err:.3e}, max |ref| {scale:.3e}, '
          f'rel {err / scale:.2e}')
    assert err <= 1e-4 * scale


def test_stem_is_frozen(monkeypatch):
  # Same structure as B5 (plain and light stages, downsampling, residual blocks), tiny widths.
  monkeypatch.setitem(hgnetv2.ARCHS, 'tiny', hgnetv2.Arch((3, 8, 16), (
      hgnetv2.StageSpec(16, 8, 16, 1, False, False, 3, 2),
      hgnetv2.StageSpec(16, 8, 32, 2, True, False, 3, 2),
      hgnetv2.StageSpec(32, 16, 32, 2, True, True, 5, 2),
      hgnetv2.StageSpec(32, 16, 64, 1, True, True, 5, 2))))
  model = hgnetv2.HGNetv2(variant='tiny')
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  # Random values from numpy: XLA:CPU takes tens of seconds to compile `init`'s RNG ops.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                           jax.eval_shape(model.init, jax.random.key(0), x))
  variables['frozen'] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables['frozen'])
  paths = hgnetv2.frozen_param_paths(())
  flat = torch_rules.flatten(variables)
  assert len(paths) == 5 and all(p in flat for p in paths)

  def loss(params):
    outs = model.apply({**variables, 'params': params}, x)
    return sum(jnp.mean(o**2) for o in outs)

  grads = torch_rules.flatten({'params': jax.jit(jax.grad(loss))(variables['params'])})
  for p in paths:
    assert float(jnp.max(jnp.abs(grads[p]))) == 0.0, p
  # The first trainable conv after the stem does get a gradient.
  first = ('params', 'stages_0', 'blocks_0', 'layers_0', 'conv', 'kernel')
  assert float(jnp.max(jnp.abs(grads[first]))) > 0.0


def test_unknown_variant_is_a_clear_error():
  cfg = _cfg()
  with cfg.unlocked():
    cfg.hgnetv2.variant = 'B9'
  with pytest.raises(ValueError, match='hgnetv2.variant'):
    build_backbone(cfg)
