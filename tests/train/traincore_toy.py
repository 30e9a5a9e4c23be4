"""A tiny change-detection model with the real model's call contract, for training tests."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from configs import base
from segchange_jax.models import layers


class ToyBackbone(nn.Module):
  """Siamese feature extractor; its name 'backbone' selects the backbone learning rate."""
  width: int = 8

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(self.width, (3, 3), name='conv')(x))


class ToyModel(nn.Module):
  """backbone(a), backbone(b) -> conv -> [BatchNorm] -> ReLU + text -> [Dropout] -> 1x1 conv."""
  num_classes: int = 1
  width: int = 8
  use_bn: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, image_a, image_b, text_emb, train: bool = False):
    backbone = ToyBackbone(self.width, name='backbone')
    fa, fb = backbone(image_a), backbone(image_b)
    # No bias before BatchNorm: its gradient is exactly 0, and Adam turns the float noise of a zero
    # gradient into +-lr steps that differ between meshes.
    x = jnp.concatenate([fa, fb, jnp.abs(fa - fb)], -1)
    x = nn.Conv(self.width, (3, 3), use_bias=not self.use_bn, name='fuse')(x)
    if self.use_bn:
      x = layers.batch_norm(train, jnp.float32, 'bn')(x)  # the model's torch-semantics BN
    x = nn.relu(x)
    t = nn.Dense(self.width, name='text')(jnp.mean(text_emb, axis=1))
    x = x + t[:, None, None, :]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1), name='head')(x)


def toy_config(**train) -> ml_collections.ConfigDict:
  """Base config with small text dims, a small fsdp threshold and the given train.* fields."""
  c = base.get_config()
  with c.unlocked():
    c.text.dim = 16
    c.text.max_tokens = 8
    c.mesh.fsdp_min_size = 64
    c.model.num_classes = 1
    for k, v in train.items():
      c.train[k] = v
  return c
