"""Clean-room PyTorch reference of HGNetv2-B5 (use_lab off, all 4 stages returned).

Written from the description in segchange_jax/models/backbones/hgnetv2.py and
docs/architecture.md, for parity tests only. Module attribute names are chosen so that
`state_dict()` keys equal upstream's (`stem.stem1.conv.weight`,
`stages.2.blocks.0.layers.3.conv2.bn.running_var`, ...).
Works in NCHW, as torch does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (in, mid, out, blocks, downsample, light, kernel, layers) per stage.
B5_STEM = (3, 32, 64)
B5_STAGES = (
    (64, 64, 128, 1, False, False, 3, 6),
    (128, 128, 512, 2, True, False, 3, 6),
    (512, 256, 1024, 5, True, True, 5, 6),
    (1024, 512, 2048, 2, True, True, 5, 6),
)


class FrozenBN(nn.Module):
  """Per-channel affine from four buffers: w * (x - rm) / sqrt(rv + eps) + b."""

  def __init__(self, channels: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer('weight', torch.ones(channels))
    self.register_buffer('bias', torch.zeros(channels))
    self.register_buffer('running_mean', torch.zeros(channels))
    self.register_buffer('running_var', torch.ones(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    inv = torch.rsqrt(self.running_var + self.eps).view(shape)
    return (x - self.running_mean.view(shape)) * inv * self.weight.view(shape) + self.bias.view(
        shape)


class ConvNormAct(nn.Module):
  """Bias-free conv, FrozenBN, optional ReLU; `padding` None means (k - 1) // 2."""

  def __init__(self, cin, cout, k, stride=1, groups=1, relu=True, padding=None):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if padding is None else padding,
                          groups=groups, bias=False)
    self.bn = FrozenBN(cout)
    self.relu = relu

  def forward(self, x):
    x = self.bn(self.conv(x))
    return F.relu(x) if self.relu else x


class Stem(nn.Module):

  def __init__(self, cin, mid, cout):
    super().__init__()
    self.stem1 = ConvNormAct(cin, mid, 3, 2)
    self.stem2a = ConvNormAct(mid, mid // 2, 2, padding=0)
    self.stem2b = ConvNormAct(mid // 2, mid, 2, padding=0)
    self.stem3 = ConvNormAct(2 * mid, mid, 3, 2)
    self.stem4 = ConvNormAct(mid, cout, 1)

  def forward(self, x):
    x = F.pad(self.stem1(x), [0, 1, 0, 1])  # right and bottom, zeros
    branch = self.stem2b(F.pad(self.stem2a(x), [0, 1, 0, 1]))
    pooled = F.max_pool2d(x, 2, 1)  # padded map -> back to the unpadded size
    return self.stem4(self.stem3(torch.cat([pooled, branch], 1)))


class LightLayer(nn.Module):

  def __init__(self, cin, cout, k):
    super().__init__()
    self.conv1 = ConvNormAct(cin, cout, 1, relu=False)
    self.conv2 = ConvNormAct(cout, cout, k, groups=cout)

  def forward(self, x):
    return self.conv2(self.conv1(x))


class Block(nn.Module):

  def __init__(self, cin, mid, cout, n_layers, k, light, residual):
    super().__init__()
    make = (lambda a: LightLayer(a, mid, k)) if light else (lambda a: ConvNormAct(a, mid, k))
    self.layers = nn.ModuleList([make(cin if i == 0 else mid) for i in range(n_layers)])
    self.aggregation = nn.Sequential(ConvNormAct(cin + n_layers * mid, cout // 2, 1),
                                     ConvNormAct(cout // 2, cout, 1))
    self.residual = residual

  def forward(self, x):
    feats = [x]
    for layer in self.layers:
      feats.append(layer(feats[-1]))
    y = self.aggregation(torch.cat(feats, 1))
    return y + x if self.residual else y


class Stage(nn.Module):

  def __init__(self, cin, mid, cout, n_blocks, downsample, light, k, n_layers):
    super().__init__()
    # No module at all when there is no downsampling, so no state_dict keys either.
    if downsample:
      self.downsample = ConvNormAct(cin, cin, 3, 2, groups=cin, relu=False)
    else:
      self.downsample = None
    self.blocks = nn.Sequential(*[
        Block(cin if b == 0 else cout, mid, cout, n_layers, k, light, residual=b > 0)
        for b in range(n_blocks)])

  def forward(self, x):
    if self.downsample is not None:
      x = self.downsample(x)
    return self.blocks(x)


class HGNetv2Ref(nn.Module):
  """Returns the 4 stage outputs (NCHW)."""

  def __init__(self, stem=B5_STEM, stages=B5_STAGES):
    super().__init__()
    self.stem = Stem(*stem)
    self.stages = nn.ModuleList([Stage(*s) for s in stages])

  def forward(self, x):
    x = self.stem(x)
    outs = []
    for stage in self.stages:
      x = stage(x)
      outs.append(x)
    return outs
