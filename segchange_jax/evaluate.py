r"""Scores a checkpoint on a dataset split: metrics JSON and worst/best comparison images.

  python -m segchange_jax.evaluate --config configs/demo.py --checkpoint runs/demo/checkpoints \
      [--split test] [--out DIR] [--num_images N] [--rank_by iou|f1]

--checkpoint: a training checkpoints directory, a `convert_torch` output directory, or an
upstream `.pth` (see segchange_jax.interop.checkpoints.load_variables). --config describes the
data, the text encoder and the model; without it the config saved with the checkpoint is used
(not possible for a `.pth`). Metrics come from the training loop's own code
(train/train_step.eval_outputs, train/metrics.confusion_matrix / compute_metrics via
train/loop.evaluate_split, driven by train/evaluation.evaluate), so they equal what training
reports for the same checkpoint and split.

Writes into --out (default `eval_<split>`):
- `metrics_<split>.json`: precision, recall, f1, iou, oa (change class for binary models, macro
  averages for multi-class), loss and its parts, num_examples, plus checkpoint / split /
  threshold.
- `per_example_<split>.csv` (single-process runs): index, file name, tp, fp, fn, iou, f1 of
  every example (change pixels = any non-zero class; a score whose denominator is 0 - nothing
  changed, nothing predicted - counts as 1, a perfect example).
- `images/{worst,best}_<rank>_<file>.png` for the N lowest / highest examples by --rank_by:
  one row A | B | label | overlay, panels separated by a 4 px grey gap. Label: change white on
  black. Overlay on a darkened B: true positive white, false positive red, false negative blue
  (true negatives show the darkened B); multi-class: a change pixel given the wrong change class
  is red.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax.interop.checkpoints import load_checkpoint
from segchange_jax.train.evaluation import evaluate


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  config_lib.define_checkpoint_flags(
      config_help="configs/*.py file (data, text, model); default: the checkpoint's own config.")
  flags.DEFINE_string('split', None, 'Split to score (default config.eval.split).')
  flags.DEFINE_string('out', None, 'Output directory (default ./eval_<split>).')
  flags.DEFINE_integer('num_images', None, 'Worst/best N comparison images '
                       '(default config.eval.num_images; 0 = none).')
  flags.DEFINE_enum('rank_by', 'iou', ['iou', 'f1'], 'Per-example score that ranks images.')
  flags.DEFINE_integer('batch_size', None, 'Global eval batch (default config.eval.batch_size).')
  flags.DEFINE_bool('overwrite', False, 'Replace the results of an earlier run in --out.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.checkpoint:
    raise cli.UsageError('--checkpoint is required')
  cli.positive('batch_size', f.batch_size)
  if f.num_images is not None and f.num_images < 0:
    raise cli.UsageError(f'--num_images={f.num_images} must be >= 0')
  cli.quiet_libraries()
  config = config_lib.validate_config(f.config) if f.config is not None else None
  if f.out and f.split:  # refuse before the (slow) checkpoint load when we can
    atomic.check_output(os.path.join(f.out, f'metrics_{f.split}.json'), [], f.overwrite, '--out')
  config, variables = load_checkpoint(f.checkpoint, config)
  split = f.split or config.eval.split
  num_images = config.eval.num_images if f.num_images is None else f.num_images
  out = f.out or f'eval_{split}'
  atomic.check_output(os.path.join(out, f'metrics_{split}.json'), [], f.overwrite, '--out')
  result = evaluate(config, variables, split, out, num_images, f.rank_by, f.batch_size,
                    checkpoint=os.path.abspath(f.checkpoint))
  scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  print(json.dumps(scalars, indent=1))
  print(f'wrote {os.path.join(out, f"metrics_{split}.json")}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
