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
  averages for multi-class), kappa (Cohen's, whole matrix), loss and its parts, num_examples,
  plus checkpoint / split / threshold, tta. A model trained with config.data.targets='prompts'
  (and scored with that config) is asked every target prompt of the split on every pair: the
  keys above pool all (pair, prompt) masks, and `f1/<prompt>`, `iou/<prompt>`,
  `precision/<prompt>`, `recall/<prompt>` score each prompt, `macro_f1` / `macro_iou` /
  `macro_precision` / `macro_recall` their means (train/metrics.prompt_metrics). On semantic
  change data (the `second` layout's directional prompts 'A -> B' among the targets) also the
  SeK of semantic change detection papers (train/metrics.sek): `sek`, `sek_score` (0.3 mIoU +
  0.7 SeK, the SECOND benchmark's score), `sek_miou`, `sek_kappa_n0`, `sek_iou_change`,
  `sek_iou_no_change`, the matrix `semantic_confusion` of both dates' class maps and its
  `semantic_classes`; the class maps come from the prompt masks as
  train/evaluation.SemanticPlan describes.
- `per_example_<split>.csv` (single-process runs): index, file name, tp, fp, fn, iou, f1 of
  every example (change pixels = any non-zero class; a score whose denominator is 0 - nothing
  changed, nothing predicted - counts as 1, a perfect example).
- `images/{worst,best}_<rank>_<file>.png` for the N lowest / highest examples by --rank_by:
  one row A | B | label | overlay, panels separated by a 4 px grey gap. Label: change white on
  black. Overlay on a darkened B: true positive white, false positive red, false negative blue
  (true negatives show the darkened B); multi-class: a change pixel given the wrong change class
  is red.

  python -m segchange_jax.evaluate --verify CKPT [--config configs/x.py --config.data.shards_dir=D]

--verify re-scores a checkpoint as its model card (train/model_card.py) says it was scored:
the card's config and evaluation split, on the card's data, whose fingerprint
(segchange_jax.data.fingerprint) must match the card's (else one error line naming both
hashes and the shards dir, exit 2). The data is config.data.shards_dir of the card's config,
or of --config when given (only its data.shards_dir is used). It prints each metric, card vs
now, then whether they reproduce: exactly (every value bit for bit: expected on the same
hardware and code), or within model_card.TOLERANCE (absolute; num_examples exact) where the
hardware or code differ. Exit 0 when they reproduce, 1 when not. It writes nothing. The
checkpoint to verify is the one scored at the end of training (`<workdir>/checkpoints` picks
it: best_iou, or latest without checkpoint.keep_best), whose card holds the test metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib
from segchange_jax.interop import checkpoints
from segchange_jax.interop.checkpoints import load_checkpoint
from segchange_jax.models import tta
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
  flags.DEFINE_string('verify', None, 'Checkpoint whose model card\'s test metrics to recompute '
                      'on the fingerprinted data (see the module docstring); exit 0 when they '
                      'reproduce, 1 when not. Writes nothing.')
  flags.DEFINE_enum('tta', 'none', list(tta.SETS), 'Test-time augmentation: none, flips (4 '
                    'views) or d4 (8 views, square records only); logits averaged in the jitted '
                    'eval step (segchange_jax/models/tta.py).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.verify is not None:
    raise SystemExit(verify_main(f))
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
                    checkpoint=os.path.abspath(f.checkpoint), tta=f.tta)
  scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  print(json.dumps(scalars, indent=1))
  print(f'wrote {os.path.join(out, f"metrics_{split}.json")}')


class VerifyError(ValueError):
  """--verify cannot check this checkpoint (no card, other data); the message says why."""


# Flags --verify refuses: it scores what the card says (split, batch, no TTA) and writes nothing.
VERIFY_EXCLUSIVE = ('checkpoint', 'split', 'out', 'num_images', 'rank_by', 'batch_size',
                    'overwrite', 'tta')


def verify(path: str, shards_dir: str | None = None) -> tuple[bool, list[str]]:
  """Re-scores checkpoint `path` as its model card says; (reproduced, report lines).

  `shards_dir`: the converted data (default: the card's config.data.shards_dir). Raises
  VerifyError (no card, no test metrics in it, data with another fingerprint) before anything
  is evaluated.
  """
  from segchange_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import model_card  # pylint: disable=g-import-not-at-top
  from segchange_jax.train.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise VerifyError(f'--verify {path!r} does not exist')
  card = checkpoints.read_card(path)
  if card is None:
    raise VerifyError(f'--verify {path} has no model card ({checkpoints.CARD_FILE}): it was '
                      'saved before model cards existed, or is not a training checkpoint; '
                      'score it with --checkpoint instead')
  source = f'the model card of {path}'
  model_card.check_card(card, source)
  config = config_lib.config_from_dict(card['config'])
  split = config.eval.split
  want = (card.get('metrics') or {}).get(split)
  if not want:
    raise VerifyError(f'{source} ({card["checkpoint"]["kind"]} at step '
                      f'{card["checkpoint"]["step"]}) has no {split!r} metrics: only the '
                      'checkpoint scored at the end of training carries them; verify that one '
                      '(pass the run\'s checkpoints folder)')
  if shards_dir:
    with config.unlocked():
      config.data.shards_dir = shards_dir
  data = config.data.shards_dir
  now_fp = fingerprint.fingerprint(data)['sha256']
  card_fp = card['data']['fingerprint']['sha256']
  if now_fp != card_fp:
    raise VerifyError(f'--verify: the data in {data} has fingerprint {now_fp}, but {source} '
                      f'was scored on data with fingerprint {card_fp}: other data (a split, '
                      'a shard or dataset_info.json differs); pass the data the card names '
                      'with --config.data.shards_dir')
  config, variables = load_checkpoint(path, config)
  with tempfile.TemporaryDirectory() as tmp:  # evaluate's files are not verify's output
    now = evaluate(config, variables, split, tmp, num_images=0,
                   checkpoint=os.path.abspath(path))
  reasons = model_card.same_setup(card, checkpoints.code_version(), model_card.hardware())
  rows = model_card.compare_metrics(want, now)
  ck = card['checkpoint']
  lines = [f'verify {path}: {ck["kind"]} at step {ck["step"]}, {split} split of {data} '
           f'(fingerprint {now_fp[:16]}... as in the card)',
           f'{"metric":<16} {"card":>22} {"now":>22}  match']
  for r in rows:
    match = ('exact' if r['exact'] else
             'missing now' if r['now'] is None else
             f'{"within" if r["within"] else "OFF"} ({r["now"] - r["card"]:+.2e})')
    lines.append(f'{r["metric"]:<16} {r["card"]!r:>22} {r["now"]!r:>22}  {match}')
  if all(r['exact'] for r in rows):
    ok, verdict = True, 'the card\'s metrics reproduce exactly'
  elif not reasons:
    ok, verdict = False, ('the card\'s metrics do NOT reproduce: same hardware and code, so '
                          'every value should be equal bit for bit')
  elif all(r['within'] for r in rows):
    ok, verdict = True, (f'the card\'s metrics reproduce within {model_card.TOLERANCE} '
                         f'(absolute), not exactly: {"; ".join(reasons)}')
  else:
    ok, verdict = False, (f'the card\'s metrics do NOT reproduce (beyond '
                          f'{model_card.TOLERANCE} absolute); setup: '
                          f'{"; ".join(reasons) or "the same"}')
  lines.append(verdict)
  return ok, lines


def verify_main(f) -> int:
  """--verify: the report on stdout; exit status 0 (reproduces) or 1 (does not)."""
  given = [f'--{n}' for n in VERIFY_EXCLUSIVE if n in f and f[n].present]
  if given:
    raise cli.UsageError(f'--verify scores what the model card says and writes nothing: drop '
                         f'{", ".join(given)}')
  if not f.verify:
    raise cli.UsageError('--verify needs the checkpoint to verify')
  cli.quiet_libraries()
  shards_dir = f.config.data.shards_dir if f.config is not None else None
  ok, lines = verify(f.verify, shards_dir)
  print('\n'.join(lines))
  return 0 if ok else 1


if __name__ == '__main__':
  define_flags()
  cli.run(main)
