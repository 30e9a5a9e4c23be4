"""Making sure the shards a config names exist and fit the model, before any training starts.

`ensure_dataset` generates the synthetic demo scenes when the config asks for them
(`data.synthetic.n > 0`) and converts `data.source_root` into `data.shards_dir` when the shards
are missing. In a multi-process run only process 0 writes; the others wait for it.
"""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils

from segchange_jax import paths


class DataSetupError(ValueError):
  """The configured data cannot be found or does not fit the model config."""


def _prepare(config) -> None:
  d = config.data
  info_path = os.path.join(d.shards_dir, 'dataset_info.json')
  if os.path.isfile(info_path):
    return
  if d.synthetic.n > 0 and d.source_root and not os.path.isdir(d.source_root):
    from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    logging.info('generating %d synthetic scenes of %d px into %s', d.synthetic.n,
                 d.synthetic.size, d.source_root)
    synthetic.generate(d.source_root, d.synthetic.n, d.synthetic.size, d.synthetic.seed)
  if not d.source_root:
    raise DataSetupError(
        f'config.data.shards_dir={d.shards_dir!r} has no dataset_info.json and '
        'config.data.source_root is empty: convert your data first with `python -m '
        'data_prep.convert --layout ... --root RAW --out SHARDS` and pass '
        '--config.data.shards_dir=SHARDS (or set --config.data.source_root=RAW to convert now)')
  if not os.path.isdir(d.source_root):
    raise DataSetupError(f'config.data.source_root={d.source_root!r} does not exist')
  from segchange_jax.data import convert  # pylint: disable=g-import-not-at-top
  splits = [s for s in (d.train_split, d.val_split, d.test_split) if s]
  logging.info('converting %s (%s layout) into %s', d.source_root, d.layout, d.shards_dir)
  info = convert.convert(d.layout, d.source_root, d.shards_dir,
                         splits=tuple(dict.fromkeys(splits)),
                         list_file=d.train_list if len(splits) == 1 else '')
  if info['leaks']['num_leaks']:
    # The default on_leak='warn' wrote them all; `python -m data_prep.convert --on_leak` decides.
    logging.warning('%s: %d pair(s) duplicated across splits, listed in its dataset_info.json '
                    'under "leaks"', d.shards_dir, info['leaks']['num_leaks'])


def ensure_dataset(config) -> str:
  """Returns `config.data.shards_dir`, generating/converting it first where configured."""
  if not config.data.shards_dir:
    raise DataSetupError('config.data.shards_dir is empty: set it to the output folder of '
                         '`python -m data_prep.convert`')
  try:
    paths.check_local_readable(config.data.shards_dir, 'config.data.shards_dir')
  except ValueError as e:
    raise DataSetupError(str(e)) from None
  if jax.process_index() == 0:
    _prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('segchange_data_ready')
  return config.data.shards_dir


def check_dataset_matches_config(info: dict, config, shards_dir: str) -> None:
  """Clear errors when the shards cannot feed this model config (splits, sizes, classes)."""
  d = config.data
  splits = info.get('splits', {})
  for role, split in (('train_split', d.train_split), ('val_split', d.val_split)):
    if split not in splits or not splits[split].get('num_examples'):
      have = {k: v.get('num_examples', 0) for k, v in splits.items()}
      raise DataSetupError(f'{shards_dir} has no {split!r} records (config.data.{role}); it '
                           f'holds {have}. Convert that split or set --config.data.{role}')
  if d.image_size != config.model.img_size:
    logging.warning('config.data.image_size=%d differs from config.model.img_size=%d; the '
                    'model runs at the data size', d.image_size, config.model.img_size)
  values = splits[d.train_split].get('label_values') or []
  if config.model.num_classes > 1 and values and max(values) >= config.model.num_classes:
    raise DataSetupError(f'{shards_dir}: labels take values {values} but '
                         f'config.model.num_classes={config.model.num_classes}')
  # Record sizes and prompt lookups are checked per split by the input pipeline.
