"""Input-pipeline throughput: examples/s at 512x512 with the default augmentations.

    python -m bench.input_pipeline [--workers 0,1,2] [--batches 10]

Builds synthetic 512x512 shards in a temp folder, then times `create_train_iterator` after
one warm-up batch for each config.data.num_workers.
"""

from __future__ import annotations

import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

from configs import base
from segchange_jax.data import convert
from segchange_jax.data import input_pipeline
from segchange_jax.data import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_list('workers', ['0', '1', '2'], 'config.data.num_workers values to time '
                  '(reader threads = 2 * max(1, n)).')
flags.DEFINE_integer('batches', 10, 'Timed batches per setting.')
flags.DEFINE_integer('batch_size', 4, 'Batch size.')
flags.DEFINE_integer('size', 512, 'Image size.')


def main(argv: Sequence[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(f'{tmp}/raw', n=20, size=FLAGS.size, seed=0)
    convert.convert('segchange-default', f'{tmp}/raw', f'{tmp}/shards', ['train'], workers=2)
    info = input_pipeline.load_dataset_info(f'{tmp}/shards')
    table = {p: i for i, p in enumerate(info['prompts'])}
    for workers in map(int, FLAGS.workers):
      c = base.get_config()
      with c.unlocked():
        c.data.shards_dir = f'{tmp}/shards'
        c.data.image_size = FLAGS.size
        c.data.num_workers = workers
        c.train.batch_size = FLAGS.batch_size
      it, _ = input_pipeline.create_train_iterator(c, table, 0, 1)
      next(it)
      start = time.perf_counter()
      for _ in range(FLAGS.batches):
        next(it)
      rate = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)
      print(f'workers={workers}: {rate:.1f} examples/s ({FLAGS.size}x{FLAGS.size}, augmented)')
      del it


if __name__ == '__main__':
  app.run(main)
