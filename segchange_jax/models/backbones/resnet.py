"""ResNet-50 as torchvision builds it (bottleneck v1.5), returning layer1..layer4 (NHWC).

torchvision details kept: 7x7/2 stem conv (pad 3, no bias) -> BatchNorm -> ReLU -> 3x3/2 max pool
padded with -inf (pad 1); bottleneck 1x1 -> 3x3 (stride here, "v1.5") -> 1x1 (x4 channels), each
conv without bias followed by BatchNorm; a 1x1 strided conv + BatchNorm projection on the first
block of every stage; ReLU after the residual sum. BatchNorm follows torch (eps 1e-5, momentum
0.1, unbiased running variance), see `norms.BatchNorm`.

Config: `model.resnet.depths` (blocks per stage, (3, 4, 6, 3) for ResNet-50) and
`model.resnet.width` (64; stage i has width * 2**i bottleneck channels and 4x that at its output).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from segchange_jax.models import layers
from segchange_jax.models import torch_rules
from segchange_jax.models.norms import BatchNorm

EXPANSION = 4
# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every conv.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# BatchNorm: in training each time is its own call (upstream: statistics updated twice).
USES_BATCH_STATS = True


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> layers.ConvNoBias:
  """nn.Conv(use_bias=False)'s parameter; stride-1 3x3 / 1x1 convs avoid XLA's convolution."""
  return layers.ConvNoBias(features, kernel, stride, kernel_init=_conv_init, dtype=dtype,
                           name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck; `planes` is the inner width, the output has 4 * planes channels."""
  planes: int
  stride: int = 1
  project: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)  # pylint: disable=unnecessary-lambda-assignment
    y = nn.relu(bn('bn1')(_conv(self.planes, 1, 1, self.dtype, 'conv1')(x), train))
    y = nn.relu(bn('bn2')(_conv(self.planes, 3, self.stride, self.dtype, 'conv2')(y), train))
    y = bn('bn3')(_conv(self.planes * EXPANSION, 1, 1, self.dtype, 'conv3')(y), train)
    if self.project:
      x = _conv(self.planes * EXPANSION, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = bn('downsample_bn')(x, train)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """Maps [B, H, W, 3] to the 4 stage outputs at strides 4, 8, 16, 32."""
  depths: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    x = _conv(self.width, 7, 2, self.dtype, 'conv1')(x.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    # flax pads max pooling with -inf, like torch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = []
    in_ch = self.width
    for i, depth in enumerate(self.depths):
      planes = self.width * 2**i
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        project = j == 0 and (stride != 1 or in_ch != planes * EXPANSION)
        x = Bottleneck(planes, stride, project, self.dtype, name=f'layer{i + 1}_{j}')(x, train)
        in_ch = planes * EXPANSION
      feats.append(x)
    return feats


def from_config(model_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                name: str = 'backbone') -> ResNet:
  """The ResNet described by `model_cfg.resnet`."""
  return ResNet(depths=tuple(model_cfg.resnet.depths), width=int(model_cfg.resnet.width),
                dtype=dtype, name=name)


def channels(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Output channels of layer1..layer4 (256/512/1024/2048 for width 64)."""
  w = int(model_cfg.resnet.width)
  return tuple(w * 2**i * EXPANSION for i in range(4))


def _conv_bn(torch_conv: str, torch_bn: str, path: tuple[str, ...], conv_name: str,
             bn_name: str) -> list[torch_rules.Rule]:
  return (torch_rules.conv(torch_conv, (*path, conv_name), bias=False)
          + torch_rules.batchnorm(torch_bn, (*path, bn_name)))


def torch_mapping(torch_prefix: str, flax_prefix: Sequence[str],
                  model_cfg: ml_collections.ConfigDict):
  """(rules, aliases, ignore) for torchvision key names under `torch_prefix`.

  Upstream's ResNet50Encoder registers torchvision's modules twice: as `backbone.*` and as
  `layer0` (= Sequential(conv1, bn1, relu, maxpool)) and `layer1..layer4`, one level above
  `backbone.`. Those second names are returned as aliases of the `backbone.` keys (the converter
  checks that both copies agree). The unused classifier `fc` and `num_batches_tracked` are ignored.
  """
  fp = tuple(flax_prefix)
  rules = _conv_bn(f'{torch_prefix}conv1', f'{torch_prefix}bn1', fp, 'conv1', 'bn1')
  for i, depth in enumerate(model_cfg.resnet.depths):
    for j in range(depth):
      t = f'{torch_prefix}layer{i + 1}.{j}.'
      path = (*fp, f'layer{i + 1}_{j}')
      for k in (1, 2, 3):
        rules += _conv_bn(f'{t}conv{k}', f'{t}bn{k}', path, f'conv{k}', f'bn{k}')
      if j == 0:  # every stage's first block projects (channels x4 or stride 2)
        rules += _conv_bn(f'{t}downsample.0', f'{t}downsample.1', path,
                          'downsample_conv', 'downsample_bn')
  aliases = {}
  if torch_prefix.endswith('backbone.'):
    root = torch_prefix[:-len('backbone.')]
    stem = {f'{torch_prefix}conv1.': f'{root}layer0.0.', f'{torch_prefix}bn1.': f'{root}layer0.1.'}
    for r in rules:
      for canon, alias in stem.items():
        if r.torch_key.startswith(canon):
          aliases[alias + r.torch_key[len(canon):]] = r.torch_key
      if r.torch_key.startswith(f'{torch_prefix}layer'):
        aliases[root + r.torch_key[len(torch_prefix):]] = r.torch_key
  ignore = [r'.*num_batches_tracked$', '^' + torch_prefix.replace('.', r'\.') + r'fc\..*']
  return rules, aliases, ignore
