"""SYSU-CD few-shot fine-tuning on a ChangeAnywhere subset list.

Pick the fraction after a colon: `--config configs/sysu_fewshot.py:5` (default) or `:10`.
The list file `dataset_list/sysucd-train-{5,10}%` from ChangeAnywhere names the training
subset; convert with `python -m data_prep.convert --layout sysu --list ...`.
Usually combined with `--config.init_from` (a pretrained checkpoint).
"""

from configs import base

FRACTIONS = ('5', '10')


def get_config(arg: str = '5'):
  arg = (arg or '5').rstrip('%')
  if arg not in FRACTIONS:
    raise ValueError(f'configs/sysu_fewshot.py: fraction {arg!r} is not one of {FRACTIONS}; '
                     'use e.g. --config configs/sysu_fewshot.py:10')
  c = base.get_config()
  c.model.pretrained = 'imagenet'  # as upstream: ImageNet backbone weights from the Hub
  c.name = f'sysu_fewshot_{arg}pct'
  c.data.shards_dir = f'data/sysu_{arg}pct_shards'
  c.data.layout = 'sysu'
  c.data.train_list = f'data/SYSU-CD/dataset_list/sysucd-train-{arg}%'
  c.data.image_size = 256
  c.model.img_size = 256
  c.data.prompt = 'Changes of buildings, roads, vegetation and land.'
  c.train.epochs = 50
  c.train.lr_drop = 20
  return c
