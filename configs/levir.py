"""LEVIR-CD (open-cd layout, 1024 px scenes tiled to 256 px; prompt about buildings)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.pretrained = 'imagenet'  # as upstream: ImageNet backbone weights from the Hub
  c.name = 'levir'
  c.data.shards_dir = 'data/levir_shards'
  c.data.layout = 'opencd'
  c.data.image_size = 256
  c.model.img_size = 256
  c.data.prompt = 'Buildings with changes.'
  c.train.batch_size = 8
  return c
