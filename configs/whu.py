"""WHU-CD building change detection: the LEVIR-CD recipe (open-cd layout, 256 px tiles,
building prompt) on its own shards."""

from configs import levir


def get_config():
  c = levir.get_config()
  c.name = 'whu'
  c.data.shards_dir = 'data/whu_shards'
  return c
