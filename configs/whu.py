"""WHU-CD building change detection (open-cd layout, tiled to 256 px)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.pretrained = 'imagenet'  # as upstream: ImageNet backbone weights from the Hub
  c.name = 'whu'
  c.data.shards_dir = 'data/whu_shards'
  c.data.layout = 'opencd'
  c.data.image_size = 256
  c.model.img_size = 256
  c.data.prompt = 'Buildings with changes.'
  c.train.batch_size = 8
  return c
