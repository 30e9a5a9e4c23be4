"""A TFDS builder producing the same records as data_prep.convert (ArrayRecord, no TensorFlow).

    builder = tfds_builder.SegChangeCD(
        config=tfds_builder.SegChangeConfig(name='levir', layout='opencd', root='/data/LEVIR-CD',
                                            splits=('train', 'val', 'test')),
        data_dir='/data/tfds', file_format='array_record')
    builder.download_and_prepare()
    source = tfds.data_source('seg_change_cd/levir', data_dir='/data/tfds')
    # or builder.as_data_source()

Features match `segchange_jax.data.records`: image_a / image_b (PNG, RGB), label (PNG, 1
channel), file_name, prompt and targets, a Sequence of {prompt, mask (PNG, 1 channel)} that TFDS
stores as the record features `targets/prompt` and `targets/mask` (empty for a pair without
per-prompt targets), so `segchange_jax.data.records.decode` reads these shards as well.
Pairs are listed by `segchange_jax.data.layouts.list_pairs` and read, checked and tiled by
`segchange_jax.data.convert.convert_pair`; bad pairs fail the build (strict) or are skipped
with a warning naming them (strict=False).
"""

from __future__ import annotations

import dataclasses
import io
import logging

import tensorflow_datasets as tfds

from segchange_jax.data import convert
from segchange_jax.data import layouts
from segchange_jax.data import records


@dataclasses.dataclass
class SegChangeConfig(tfds.core.BuilderConfig):
  """Where the raw layout lives and how to read it."""
  layout: str = 'opencd'
  root: str = ''
  splits: tuple[str, ...] = ('train', 'val', 'test')
  tile: int = 0
  tile_stride: int = 0
  strict: bool = True


class SegChangeCD(tfds.core.GeneratorBasedBuilder):
  """Bi-temporal change-detection pairs from any layout of segchange_jax.data.layouts."""

  VERSION = tfds.core.Version(f'{convert.CONVERTER_VERSION}.1.0')
  RELEASE_NOTES = {f'{convert.CONVERTER_VERSION}.1.0': 'Per-prompt targets (prompt, mask).'}
  BUILDER_CONFIGS = [SegChangeConfig(name='default')]

  def _info(self) -> tfds.core.DatasetInfo:
    image = lambda c: tfds.features.Image(shape=(None, None, c), encoding_format='png')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image_a': image(3), 'image_b': image(3), 'label': image(1),
            'file_name': tfds.features.Text(), 'prompt': tfds.features.Text(),
            'targets': tfds.features.Sequence({'prompt': tfds.features.Text(),
                                               'mask': image(1)})}),
        description='Bi-temporal remote-sensing change detection pairs (SegChange-R1 inputs).')

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not cfg.root:
      raise ValueError('SegChangeConfig.root is empty: set the raw dataset folder')
    return {split: self._generate_examples(split) for split in cfg.splits}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    pairs = layouts.list_pairs(cfg.layout, cfg.root, split, num_splits=len(cfg.splits))
    problems = []
    for pair in pairs:
      result = convert.convert_pair(pair, cfg.tile, cfg.tile_stride)
      if result.problem:
        problems.append(result.problem)
        logging.warning('skipped in %s: %s', split, result.problem)
        continue
      for rec in result.records:
        ex = records.parse(rec)
        yield ex['file_name'], {
            'image_a': io.BytesIO(ex['image_a']), 'image_b': io.BytesIO(ex['image_b']),
            'label': io.BytesIO(ex['label']), 'file_name': ex['file_name'],
            'prompt': ex['prompt'],
            'targets': [{'prompt': p, 'mask': io.BytesIO(m)} for p, m in ex['targets']]}
    if cfg.strict and (problems or not pairs):
      raise convert.ConvertError(f'split {split!r}: {len(problems)} bad pair(s), '
                                 f'{len(pairs)} listed:\n' + '\n'.join(problems))
