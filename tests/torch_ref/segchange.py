"""Clean-room PyTorch reference of SegChange-R1's non-backbone parts, written from
docs/architecture.md.

Attribute names are chosen so that `state_dict()` keys equal upstream's
(tests/upstream_keys/*.tsv); the computations follow the stage descriptions of
docs/architecture.md literally (no fast rewrites), NCHW.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- BEV


class LinearAttention(nn.Module):
  def __init__(self, dim, heads=8, dim_head=8):
    super().__init__()
    self.heads, self.inner = heads, heads * dim_head
    self.to_qkv = nn.Linear(dim, 3 * self.inner, bias=False)
    self.to_out = nn.Linear(self.inner, dim)

  def forward(self, x):  # [B, N, C]
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
               for t in self.to_qkv(x).chunk(3, dim=-1))
    q = q * self.inner ** -0.5
    k = torch.softmax(k, dim=-1)  # over the head dim
    ctx = k.transpose(-1, -2) @ v  # [B, h, d, d]
    out = (q @ ctx).permute(0, 2, 1, 3).reshape(b, n, self.inner)
    return self.to_out(out)


def _tokens(x):
  return x.flatten(2).transpose(1, 2)


def _map(t, h, w):
  return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


class BEVLinearAttention(nn.Module):
  def __init__(self, dim, heads=8, dim_head=8):
    super().__init__()
    self.linear_attention = LinearAttention(dim, heads, dim_head)
    self.proj = nn.Conv2d(dim, dim, 1)

  def forward(self, x):
    h, w = x.shape[-2:]
    return self.proj(_map(self.linear_attention(_tokens(x)), h, w))


class BEVTransformer(nn.Module):
  def __init__(self, dim, heads=8, layers=2, ffn=2048, dropout=0.1):
    super().__init__()
    self.transformer = nn.Transformer(d_model=dim, nhead=heads, num_encoder_layers=layers,
                                      num_decoder_layers=layers, dim_feedforward=ffn,
                                      dropout=dropout, batch_first=True)
    self.proj = nn.Conv2d(dim, dim, 1)

  def forward(self, x):
    h, w = x.shape[-2:]
    t = _tokens(x)
    return self.proj(_map(self.transformer(t, t), h, w))


# ---------------------------------------------------------------------------------- diff


class CBAM(nn.Module):
  def __init__(self, c):
    super().__init__()
    r = c // 16
    self.channel_attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1, bias=False),
                                           nn.ReLU(), nn.Conv2d(r, c, 1, bias=False))
    self.spatial_attention = nn.Sequential(nn.Conv2d(c, r, 7, padding=3, groups=r),
                                           nn.BatchNorm2d(r), nn.ReLU(), nn.Conv2d(r, 1, 1))

  def forward(self, x):
    x = x * torch.sigmoid(self.channel_attention(x))
    return x * torch.sigmoid(self.spatial_attention(x))


class SE(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.fc = nn.Sequential(nn.Conv2d(c, c // 16, 1), nn.ReLU(), nn.Conv2d(c // 16, c, 1))

  def forward(self, x):
    return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class FeatureDiff(nn.Module):
  def __init__(self, dims, attention='CBAM'):
    super().__init__()
    self.diff_conv = nn.ModuleList(
        nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c), nn.ReLU()) for c in dims)
    self.attention = nn.ModuleList((CBAM if attention == 'CBAM' else SE)(c) for c in dims)

  def forward(self, feats1, feats2):
    out = []
    for conv, att, a, b in zip(self.diff_conv, self.attention, feats1, feats2):
      out.append(att(conv(torch.cat([a, b, (a - b).abs(), a * b], dim=1))))
    return out


# ---------------------------------------------------------------------------------- neck


class Scharr(nn.Module):
  def __init__(self, c):
    super().__init__()
    kx = torch.tensor([[-3., 0., 3.], [-10., 0., 10.], [-3., 0., 3.]])
    self.conv_x = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    self.conv_y = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    with torch.no_grad():
      self.conv_x.weight.copy_(kx.expand(c, 1, 3, 3))
      self.conv_y.weight.copy_(kx.t().expand(c, 1, 3, 3))
    self.norm = nn.BatchNorm2d(c)

  def forward(self, x):
    e = torch.sqrt(self.conv_x(x) ** 2 + self.conv_y(x) ** 2 + 1e-6)
    return F.relu(self.norm(e))


class Gaussian(nn.Module):
  def __init__(self, c, sigma=1.0):
    super().__init__()
    r = torch.arange(3.) - 1
    g = torch.exp(-(r[None] ** 2 + r[:, None] ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
    self.gaussian = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    with torch.no_grad():
      self.gaussian.weight.copy_((g / g.sum()).expand(c, 1, 3, 3))
    self.norm = nn.BatchNorm2d(c)

  def forward(self, x):
    return F.relu(self.norm(self.gaussian(x)))


class EGA(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.scharr = Scharr(c)
    self.gaussian = Gaussian(c)
    self.conv_extra = nn.Conv2d(c, c, 1)

  def forward(self, x):
    return self.conv_extra(x + self.gaussian(self.scharr(x)))


class TokenConnector(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.layers = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.LayerNorm(cout),
                                nn.Conv2d(cout, cout, 1), nn.LayerNorm(cout))

  def forward(self, x):
    for i in range(0, 4, 2):
      x = self.layers[i](x)
      x = self.layers[i + 1](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return x


class Neck(nn.Module):
  """Literal neck: upsample every scale to full resolution, concat, 1x1 conv."""

  def __init__(self, dims, fpn_type='L-FPN', out=256, groups=32, token_dim=0, use_ega=True):
    super().__init__()
    self.scale_heads = nn.ModuleList(
        nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(groups, out), nn.ReLU(),
                      nn.Upsample(scale_factor=s, mode='bilinear', align_corners=True))
        for c, s in zip(dims, (4, 8, 16, 32)))
    if fpn_type == 'FPN':
      self.fusion_conv = nn.Sequential(nn.Conv2d(out * len(dims), out, 1),
                                       nn.GroupNorm(groups, out), nn.ReLU())
    else:
      self.fusion_conv = nn.Conv2d(out * len(dims), out, 1)
    self.token_connector = TokenConnector(out, token_dim) if token_dim else None
    self.ega = EGA(token_dim or out) if use_ega else None

  def forward(self, feats):
    x = self.fusion_conv(torch.cat([h(f) for h, f in zip(self.scale_heads, feats)], dim=1))
    if self.token_connector is not None:
      x = self.token_connector(x)
    if self.ega is not None:
      x = self.ega(x)
    return x


# ---------------------------------------------------------------------------------- head


class MultiheadAttention(nn.Module):
  """Separate q/k/v/out Linears; sequence-first [L, B, C] like upstream."""

  def __init__(self, c, heads, dropout=0.0):
    super().__init__()
    self.heads, self.dropout = heads, dropout
    self.in_proj_q, self.in_proj_k = nn.Linear(c, c), nn.Linear(c, c)
    self.in_proj_v, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

  def forward(self, q, k, v):
    lq, b, c = q.shape
    split = lambda t: t.reshape(t.shape[0], b, self.heads, -1).permute(1, 2, 0, 3)
    q, k, v = split(self.in_proj_q(q)), split(self.in_proj_k(k)), split(self.in_proj_v(v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    w = F.dropout(w, self.dropout, self.training)
    o = (w @ v).permute(2, 0, 1, 3).reshape(lq, b, c)
    return self.out_proj(o)


class DProjector(nn.Module):
  def __init__(self, vis, lang, heads):
    super().__init__()
    self.lang2vis = nn.Linear(lang, vis) if lang != vis else nn.Identity()
    self.cross_attn = MultiheadAttention(vis, heads)
    self.lin = nn.Linear(vis, vis)

  def forward(self, embs, x):
    t = self.lang2vis(embs.mean(dim=1))[None]  # [1, B, C]
    pix = x.flatten(2).permute(2, 0, 1)
    return self.lin(self.cross_attn(t, pix, pix) + t)[0]


class DecoderLayer(nn.Module):
  def __init__(self, c, heads, ffn, dropout):
    super().__init__()
    self.self_attn = MultiheadAttention(c, heads, dropout)
    self.cross_attn = MultiheadAttention(c, heads, dropout)
    self.linear1, self.linear2 = nn.Linear(c, ffn), nn.Linear(ffn, c)
    self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
    self.drop = nn.Dropout(dropout)

  def forward(self, t, mem):
    t = self.norm1(t + self.drop(self.self_attn(t, t, t)))
    t = self.norm2(t + self.drop(self.cross_attn(t, mem, mem)))
    return self.norm3(t + self.drop(self.linear2(self.drop(F.relu(self.linear1(t))))))


class Decoder(nn.Module):
  def __init__(self, c, heads, ffn, dropout, n):
    super().__init__()
    self.layers = nn.ModuleList(DecoderLayer(c, heads, ffn, dropout) for _ in range(n))


class MaskHead(nn.Module):
  def __init__(self, vis, lang, num_classes=1, heads=8, queries=5, layers=2, ffn=2048,
               dropout=0.1, groups=32):
    super().__init__()
    self.d_projector = DProjector(vis, lang, heads)
    self.query_embed = nn.Embedding(queries, vis)
    self.transformer_decoder = Decoder(vis, heads, ffn, dropout, layers)
    self.channel_attn = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(vis, vis // 8, 1),
                                      nn.ReLU(), nn.Conv2d(vis // 8, vis, 1), nn.Sigmoid())
    self.mask_head = nn.Sequential(
        nn.Conv2d(2 * vis, vis // 2, 1), nn.GroupNorm(groups, vis // 2), nn.ReLU(),
        nn.Conv2d(vis // 2, vis // 4, 3, padding=1), nn.GroupNorm(groups, vis // 4), nn.ReLU(),
        nn.Conv2d(vis // 4, num_classes, 1))

  def forward(self, x, embs):
    b, c, h, w = x.shape
    qv = self.d_projector(embs, x)
    mem = x.flatten(2).permute(2, 0, 1)
    t = self.query_embed.weight[:, None].expand(-1, b, -1)
    for layer in self.transformer_decoder.layers:
      t = layer(t, mem)
    d = t.mean(0)
    feat = x * (self.channel_attn(x) + qv[:, :, None, None])
    return self.mask_head(torch.cat([feat, d[:, :, None, None].expand(b, c, h, w)], dim=1))


# ----------------------------------------------------------------------------- whole model


class DualEncoder(nn.Module):
  def __init__(self, encoder, channels, dims, bev='LinearAttention', heads=8, dim_head=8,
               layers=2, ffn=2048, dropout=0.1):
    super().__init__()
    self.encoder = encoder  # callable NCHW -> 4 NCHW maps
    self.conv_list = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(channels, dims))
    if bev == 'LinearAttention':
      self.bev = nn.ModuleList(BEVLinearAttention(d, heads, dim_head) for d in dims)
    else:
      self.bev = nn.ModuleList(BEVTransformer(d, heads, layers, ffn, dropout) for d in dims)

  def forward(self, a, b):
    fa = [bev(conv(f)) for bev, conv, f in zip(self.bev, self.conv_list, self.encoder(a))]
    fb = [bev(conv(f)) for bev, conv, f in zip(self.bev, self.conv_list, self.encoder(b))]
    return fa, fb


class ChangeModel(nn.Module):
  """Whole model from a ConfigDict's `model` section and the text width."""

  def __init__(self, encoder, channels, m, text_dim):
    super().__init__()
    self.dual_encoder = DualEncoder(encoder, channels, m.out_dims, m.bev, m.bev_heads,
                                    m.bev_dim_head, m.bev_transformer_layers,
                                    m.bev_transformer_ffn, m.dropout)
    self.feature_diff = FeatureDiff(m.out_dims, m.diff_attention)
    self.fpn = Neck(m.out_dims, m.fpn_type, m.fpn_dim, m.gn_groups,
                    m.token_dim if m.use_token_connector else 0, m.use_ega)
    vis = m.token_dim if m.use_token_connector else m.fpn_dim
    self.mask_head = MaskHead(vis, text_dim, m.num_classes, m.head_heads, m.num_queries,
                              m.decoder_layers, m.decoder_ffn, m.dropout, m.gn_groups)

  def forward(self, a, b, embs):
    fa, fb = self.dual_encoder(a, b)
    return self.mask_head(self.fpn(self.feature_diff(fa, fb)), embs)


def randomize_(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
  """Random weights and BatchNorm statistics (so parity tests exercise every tensor)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(fan_in))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith('weight') else 0))
    for name, buf in model.named_buffers():
      if name.endswith('running_mean'):
        buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
      elif name.endswith('running_var'):
        buf.copy_(torch.rand(buf.shape, generator=g) * 0.5 + 0.75)
  return model


# ------------------------------------------------------------------------ backbone wrappers


class SwinEncoder(nn.Module):
  """timm features_only Swin under `backbone` (NHWC outputs permuted to NCHW, as upstream)."""

  def __init__(self, img_size=512, strict_img_size=False, **dims):
    super().__init__()
    import timm  # pylint: disable=g-import-not-at-top
    self.backbone = timm.create_model('swin_base_patch4_window7_224', pretrained=False,
                                      features_only=True, out_indices=(0, 1, 2, 3),
                                      img_size=img_size, strict_img_size=strict_img_size, **dims)

  def forward(self, x):
    return [f.permute(0, 3, 1, 2) for f in self.backbone(x)]


class ResNetEncoder(nn.Module):
  """torchvision resnet50 under `backbone`, its stages also registered as layer0..layer4."""

  def __init__(self, depths=(3, 4, 6, 3)):
    super().__init__()
    import torchvision  # pylint: disable=g-import-not-at-top
    # resnet50 is ResNet(Bottleneck, [3, 4, 6, 3]); fewer blocks make small test models.
    self.backbone = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                                     list(depths))
    b = self.backbone
    self.layer0 = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool)
    self.layer1, self.layer2, self.layer3, self.layer4 = b.layer1, b.layer2, b.layer3, b.layer4

  def forward(self, x):
    x = self.layer0(x)
    out = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      out.append(x)
    return out


def build_encoder(model_cfg):
  """(torch encoder, its 4 channel counts) for `model_cfg.backbone`."""
  if model_cfg.backbone == 'resnet50':
    if model_cfg.resnet.width != 64:
      raise ValueError('the torch reference ResNet has width 64 (torchvision Bottleneck)')
    return ResNetEncoder(tuple(model_cfg.resnet.depths)), (256, 512, 1024, 2048)
  if model_cfg.backbone == 'hgnetv2':
    from tests.torch_ref import hgnetv2  # pylint: disable=g-import-not-at-top
    return hgnetv2.HGNetv2Ref(), (128, 512, 1024, 2048)
  s = model_cfg.swin
  enc = SwinEncoder(embed_dim=s.embed_dim, depths=tuple(s.depths), num_heads=tuple(s.num_heads),
                    window_size=s.window_size, mlp_ratio=s.mlp_ratio,
                    drop_path_rate=s.drop_path_rate)  # as ours (timm's default is 0.1 too)
  return enc, tuple(s.embed_dim * 2**i for i in range(4))


def build_change_model(config) -> ChangeModel:
  enc, channels = build_encoder(config.model)
  return ChangeModel(enc, channels, config.model, config.text.dim)
