"""DVCD-style training: the upstream default recipe (Swin-B, LinearAttention, L-FPN, CBAM, EGA).

Data in the SegChange "custom" layout converted with
`python -m data_prep.convert --layout segchange-custom --root data/dvcd --out data/dvcd_shards`.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.pretrained = 'imagenet'  # as upstream: ImageNet backbone weights from the Hub
  c.name = 'dvcd'
  c.data.shards_dir = 'data/dvcd_shards'
  c.data.layout = 'segchange-custom'
  return c
