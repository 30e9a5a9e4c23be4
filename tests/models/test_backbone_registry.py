"""The backbone registry: a new backbone added by the recipe works end to end; bad ones are refused.

This file is itself the toy backbone's module, written as the "Adding a backbone" recipe says: a
linen module giving 4 maps at strides 4, 8, 16, 32 and the interface of
segchange_jax/models/backbones/__init__.py (`from_config`, `channels`, `torch_mapping`,
`USES_BATCH_STATS`), registered with `backbones.register`.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax import default_config
from segchange_jax.models import backbones
from segchange_jax.models import segchange
from segchange_jax.models import torch_rules

NAME = 'toy_strided_convs'
TORCH_PREFIX = 'dual_encoder.encoder.backbone.'
STRIDES = (4, 8, 16, 32)

# ------------------------------------------------------------------ the toy backbone (recipe)

# No BatchNorm: a training call on the stacked A/B pair is the same maths as two calls.
USES_BATCH_STATS = False


class ToyBackbone(nn.Module):
  """A strided conv per stage (4x4/4, then 2x2/2 three times): maps at strides 4, 8, 16, 32."""
  widths: tuple[int, int, int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    del train  # no dropout, no batch statistics
    feats = []
    for i, (width, step) in enumerate(zip(self.widths, (4, 2, 2, 2))):
      x = nn.Conv(width, (step, step), strides=step, padding='VALID', dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'stage{i}')(x)
      x = nn.relu(x)
      feats.append(x)
    return feats


def from_config(model_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                name: str = 'backbone') -> ToyBackbone:
  return ToyBackbone(channels(model_cfg), dtype=dtype, name=name)


def channels(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  del model_cfg  # no config fields of its own
  return (8, 16, 24, 32)


def torch_mapping(torch_prefix: str, flax_prefix: Sequence[str],
                  model_cfg: ml_collections.ConfigDict):
  """torch `stages.{i}` Conv2d <-> Flax `stage{i}` Conv; no aliases, nothing ignored."""
  del model_cfg
  rules = []
  for i in range(4):
    rules += torch_rules.conv(f'{torch_prefix}stages.{i}', (*flax_prefix, f'stage{i}'))
  return rules, {}, []

# ---------------------------------------------------------------------------------- the tests


@pytest.fixture
def registry(monkeypatch):
  """The registry as it is, restored after the test (registrations here do not leak)."""
  monkeypatch.setattr(backbones, 'REGISTRY', dict(backbones.REGISTRY))
  return backbones.REGISTRY


def _tiny_config(backbone: str) -> ml_collections.ConfigDict:
  """The default config at small widths (as tests/models/test_segchange.small_config)."""
  c = default_config.get_config()
  m = c.model
  m.backbone = backbone
  m.out_dims = (32, 32, 32, 32)
  m.fpn_dim, m.token_dim, m.gn_groups, m.head_heads = 32, 16, 4, 4
  m.decoder_ffn, m.bev_heads, m.bev_transformer_ffn = 48, 4, 48
  c.text.dim = 24
  return c


def test_toy_backbone_registered_by_the_recipe_runs_in_the_model(registry):
  config = _tiny_config(NAME)
  with pytest.raises(config_lib.ConfigError, match=rf'config\.model\.backbone={NAME!r}'):
    config_lib.validate_config(config)  # not registered yet
  backbones.register(NAME, sys.modules[__name__], TORCH_PREFIX)
  assert NAME in config_lib.backbone_names()
  config_lib.validate_config(config)
  assert backbones.backbone_channels(config.model) == (8, 16, 24, 32)
  assert backbones.backbone_uses_batch_stats(config.model) is False

  # init + apply through the whole model; the backbone's maps have its declared widths.
  model = segchange.build_model(config)
  variables = jax.jit(lambda rng: segchange.init_variables(model, rng, image_size=32))(
      jax.random.PRNGKey(0))
  assert set(variables['params']['backbone']) == {f'stage{i}' for i in range(4)}
  rs = np.random.RandomState(0)
  a, b = (jnp.asarray(rs.randn(2, 32, 32, 3), jnp.float32) for _ in range(2))
  text = jnp.asarray(rs.randn(2, 8, 24), jnp.float32)
  logits = jax.jit(model.apply)(variables, a, b, text)
  assert logits.shape == (2, 32, 32, 1) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  maps = from_config(config.model).apply({'params': variables['params']['backbone']}, a)
  assert [tuple(f.shape) for f in maps] == [(2, 32 // s, 32 // s, w)
                                            for s, w in zip(STRIDES, channels(config.model))]

  # Torch mapping round trip: the upstream state_dict has the toy's weights under its
  # registered prefix, and converting it back gives the same variables.
  sd = segchange.export_torch_state_dict(config, variables)
  assert {k for k in sd if k.startswith(TORCH_PREFIX)} == {
      f'{TORCH_PREFIX}stages.{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
  assert sd[f'{TORCH_PREFIX}stages.1.weight'].shape == (16, 8, 2, 2)  # torch OIHW
  back = segchange.load_torch_state_dict(config, sd, image_size=32)
  want, got = torch_rules.flatten(variables), torch_rules.flatten(back)
  assert set(got) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


def _module_without(attr: str) -> types.ModuleType:
  """A module with the toy's interface less `attr`."""
  module = types.ModuleType(f'toy_without_{attr}')
  for name in ('from_config', 'channels', 'torch_mapping', 'USES_BATCH_STATS'):
    if name != attr:
      setattr(module, name, getattr(sys.modules[__name__], name))
  return module


@pytest.mark.parametrize('attr', ['USES_BATCH_STATS', 'from_config'])
def test_registration_refuses_a_module_missing_an_interface_attribute(registry, attr):
  module = _module_without(attr)
  with pytest.raises(ValueError) as e:
    backbones.register('incomplete', module, TORCH_PREFIX)
  message = str(e.value)
  assert "backbone 'incomplete'" in message and f'toy_without_{attr}' in message
  assert f'lacks {attr} (' in message
  others = set(backbones.REQUIRED) - {attr}
  assert not any(f'{o} (' in message for o in others), message  # only what is missing
  assert 'incomplete' not in registry

  lacking_two = _module_without('channels')
  del lacking_two.torch_mapping
  with pytest.raises(ValueError, match=r'lacks channels \(.*\); torch_mapping \('):
    backbones.register('incomplete', lacking_two, TORCH_PREFIX)


def test_registration_refuses_a_non_bool_uses_batch_stats_and_non_functions(registry):
  module = _module_without('USES_BATCH_STATS')
  module.USES_BATCH_STATS = 'no'
  with pytest.raises(ValueError, match="USES_BATCH_STATS is 'no', not True or False"):
    backbones.register('odd', module, TORCH_PREFIX)
  module.USES_BATCH_STATS, module.channels = False, (8, 16, 24, 32)
  with pytest.raises(ValueError, match='channels must be functions'):
    backbones.register('odd', module, TORCH_PREFIX)
  assert 'odd' not in registry


def test_registering_a_name_twice_is_refused(registry):
  backbones.register(NAME, sys.modules[__name__], TORCH_PREFIX)
  with pytest.raises(ValueError, match=f'backbone {NAME!r} is already registered'):
    backbones.register(NAME, _module_without('nothing'), TORCH_PREFIX)
  assert registry[NAME].module is sys.modules[__name__]
  with pytest.raises(ValueError, match="backbone 'resnet50' is already registered"):
    backbones.register('resnet50', sys.modules[__name__], TORCH_PREFIX)
  assert registry['resnet50'].module.__name__ == 'segchange_jax.models.backbones.resnet'


def test_the_built_in_backbones_are_registered():
  assert set(backbones.REGISTRY) == {'swin_base_patch4_window7_224', 'resnet50', 'hgnetv2'}
  assert set(config_lib.backbone_names()) == set(backbones.REGISTRY)
