"""HGNetv2 (PP-HGNetV2 as in D-FINE), the variant upstream SegChange-R1 uses: B5, no LAB.

Structure (upstream `HGNetv2(name='B5', use_lab=False, return_idx=[0, 1, 2, 3])`):
- every conv is bias-free and followed by FrozenBatchNorm (eps 1e-5, tensors in 'frozen');
  "ConvBNAct" = conv (pad (k-1)//2) -> FrozenBN -> optional ReLU.
- stem: stem1 3x3/2 (3->32); the map is zero-padded by one row/col at the bottom/right; branch A
  = stem2a 2x2 (32->16, pad 0) -> same one-sided zero pad -> stem2b 2x2 (16->32); branch B =
  2x2/1 max pool of the padded map; concat [B, A] -> stem3 3x3/2 (64->32) -> stem4 1x1 (32->64).
  All stem convs are frozen upstream (requires_grad=False): see `frozen_param_paths`.
- 4 stages; stages 1..3 open with a depthwise 3x3/2 ConvBN without activation. A stage is
  `blocks` HG blocks; a block runs 6 layers in sequence (3x3 ConvBNAct, or in the "light"
  stages 1x1 ConvBN then depthwise kxk ConvBNAct), concatenates its input and every layer
  output, and aggregates with two 1x1 ConvBNAct (squeeze to out/2, then excite to out). All
  but the first block of a stage add their input (residual).
- the outputs of all 4 stages are returned: 128/512/1024/2048 channels at strides 4/8/16/32.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segchange_jax.models import layers
from segchange_jax.models import torch_rules
from segchange_jax.models.norms import FrozenBatchNorm

# BatchNorm: in training each time is its own call (upstream: statistics updated twice).
USES_BATCH_STATS = True


class StageSpec(NamedTuple):
  in_ch: int
  mid_ch: int
  out_ch: int
  blocks: int
  downsample: bool
  light: bool
  kernel: int
  layers: int


class Arch(NamedTuple):
  stem: tuple[int, int, int]  # in, mid, out channels
  stages: tuple[StageSpec, ...]


ARCHS = {
    'B5': Arch((3, 32, 64), (
        StageSpec(64, 64, 128, 1, False, False, 3, 6),
        StageSpec(128, 128, 512, 2, True, False, 3, 6),
        StageSpec(512, 256, 1024, 5, True, True, 5, 6),
        StageSpec(1024, 512, 2048, 2, True, True, 5, 6),
    )),
}

STEM_CONVS = ('stem1', 'stem2a', 'stem2b', 'stem3', 'stem4')
# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class ConvBN(nn.Module):
  """Bias-free conv -> FrozenBatchNorm -> optional ReLU (upstream ConvBNAct with use_lab off)."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  act: bool = True
  pad: bool = True  # symmetric (k-1)//2 padding; False = VALID (stem 2x2 convs pad by hand)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # Stride-1 convs (the light stages' 5x5 depthwise, stages 0-1's 3x3, every 1x1) avoid
    # XLA's convolution: see layers.ConvNoBias.
    x = layers.ConvNoBias(self.features, self.kernel, self.stride,
                          None if self.pad else 0, self.groups, _conv_init, self.dtype,
                          name='conv')(x)
    x = FrozenBatchNorm(dtype=self.dtype, name='bn')(x)
    return nn.relu(x) if self.act else x


def _pad_bottom_right(x: jnp.ndarray) -> jnp.ndarray:
  """torch F.pad(x, (0, 1, 0, 1)): one zero row at the bottom and one zero column at the right."""
  return jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))


class Stem(nn.Module):
  mid: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = _pad_bottom_right(ConvBN(self.mid, 3, 2, dtype=self.dtype, name='stem1')(x))
    a = ConvBN(self.mid // 2, 2, pad=False, dtype=self.dtype, name='stem2a')(x)
    a = ConvBN(self.mid, 2, pad=False, dtype=self.dtype, name='stem2b')(_pad_bottom_right(a))
    # MaxPool2d(2, stride 1, ceil_mode=True) on the padded map: output keeps the unpadded size.
    b = nn.max_pool(x, (2, 2), strides=(1, 1), padding='VALID')
    x = jnp.concatenate([b, a], axis=-1)
    x = ConvBN(self.mid, 3, 2, dtype=self.dtype, name='stem3')(x)
    return ConvBN(self.out, 1, dtype=self.dtype, name='stem4')(x)


class HGBlock(nn.Module):
  """`spec.layers` convs in sequence, concat of input + all outputs, squeeze/excite 1x1 convs."""
  spec: StageSpec
  residual: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = self.spec
    outputs = [x]
    y = x
    for i in range(s.layers):
      if s.light:
        # 'layers_i' holds conv1 (1x1, no act) and conv2 (depthwise kxk + ReLU), as upstream.
        y = _Light(s.mid_ch, s.kernel, self.dtype, name=f'layers_{i}')(y)
      else:
        y = ConvBN(s.mid_ch, s.kernel, dtype=self.dtype, name=f'layers_{i}')(y)
      outputs.append(y)
    y = jnp.concatenate(outputs, axis=-1)
    y = ConvBN(s.out_ch // 2, 1, dtype=self.dtype, name='aggregation_0')(y)
    y = ConvBN(s.out_ch, 1, dtype=self.dtype, name='aggregation_1')(y)
    return y + x if self.residual else y


class _Light(nn.Module):
  features: int
  kernel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = ConvBN(self.features, 1, act=False, dtype=self.dtype, name='conv1')(x)
    return ConvBN(self.features, self.kernel, groups=self.features, dtype=self.dtype,
                  name='conv2')(x)


class HGStage(nn.Module):
  """Optional depthwise 3x3/2 downsample (ConvBN, no act), then `spec.blocks` HG blocks."""
  spec: StageSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = self.spec
    if s.downsample:
      x = ConvBN(s.in_ch, 3, 2, groups=s.in_ch, act=False, dtype=self.dtype,
                 name='downsample')(x)
    for j in range(s.blocks):
      x = HGBlock(s, residual=j > 0, dtype=self.dtype, name=f'blocks_{j}')(x)
    return x


class HGNetv2(nn.Module):
  """Maps [B, H, W, 3] to the 4 stage outputs at strides 4, 8, 16, 32.

  `train` is accepted for the backbone interface; HGNetv2 has no train-mode behaviour
  (FrozenBatchNorm everywhere, no dropout).
  """
  variant: str = 'B5'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    del train
    arch = ARCHS[self.variant]
    x = Stem(arch.stem[1], arch.stem[2], self.dtype, name='stem')(x.astype(self.dtype))
    # Upstream's stem has requires_grad=False; nothing before it needs a gradient, so stopping
    # it here gives the stem exactly zero gradient and skips its backward pass. The optimizer
    # must still exclude these params (weight decay): see `frozen_param_paths`.
    x = jax.lax.stop_gradient(x)
    feats = []
    for i, spec in enumerate(arch.stages):
      x = HGStage(spec, self.dtype, name=f'stages_{i}')(x)
      feats.append(x)
    return feats


def _arch(model_cfg: ml_collections.ConfigDict) -> Arch:
  variant = model_cfg.hgnetv2.variant
  if variant not in ARCHS:
    raise ValueError(f'config.model.hgnetv2.variant={variant!r} is not supported; use one of '
                     f'{sorted(ARCHS)}')
  return ARCHS[variant]


def from_config(model_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                name: str = 'backbone') -> HGNetv2:
  """The HGNetv2 variant named by `model_cfg.hgnetv2.variant`."""
  _arch(model_cfg)
  return HGNetv2(variant=model_cfg.hgnetv2.variant, dtype=dtype, name=name)


def channels(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Output channels of the 4 stages (128/512/1024/2048 for B5)."""
  return tuple(s.out_ch for s in _arch(model_cfg).stages)


def frozen_param_paths(flax_prefix: Sequence[str] = ('backbone',)) -> list[tuple[str, ...]]:
  """'params' paths that upstream never trains (the stem convs); mask them out of the optimizer."""
  return [('params', *flax_prefix, 'stem', n, 'conv', 'kernel') for n in STEM_CONVS]


def _conv_bn(torch_prefix: str, path: tuple[str, ...]) -> list[torch_rules.Rule]:
  return (torch_rules.conv(f'{torch_prefix}.conv', (*path, 'conv'), bias=False)
          + torch_rules.batchnorm(f'{torch_prefix}.bn', (*path, 'bn'), collection='frozen'))


def torch_mapping(torch_prefix: str, flax_prefix: Sequence[str],
                  model_cfg: ml_collections.ConfigDict):
  """(rules, aliases, ignore) for upstream key names, e.g. `<prefix>stages.2.blocks.0...`."""
  fp = tuple(flax_prefix)
  arch = _arch(model_cfg)
  rules = []
  for n in STEM_CONVS:
    rules += _conv_bn(f'{torch_prefix}stem.{n}', (*fp, 'stem', n))
  for i, s in enumerate(arch.stages):
    t, ps = f'{torch_prefix}stages.{i}.', (*fp, f'stages_{i}')
    if s.downsample:
      rules += _conv_bn(f'{t}downsample', (*ps, 'downsample'))
    for j in range(s.blocks):
      tb, pb = f'{t}blocks.{j}.', (*ps, f'blocks_{j}')
      for k in range(s.layers):
        if s.light:
          for c in ('conv1', 'conv2'):
            rules += _conv_bn(f'{tb}layers.{k}.{c}', (*pb, f'layers_{k}', c))
        else:
          rules += _conv_bn(f'{tb}layers.{k}', (*pb, f'layers_{k}'))
      for k in range(2):
        rules += _conv_bn(f'{tb}aggregation.{k}', (*pb, f'aggregation_{k}'))
  # FrozenBatchNorm has no counter, but a checkpoint saved from a BatchNorm model may.
  return rules, {}, [r'.*num_batches_tracked$']
