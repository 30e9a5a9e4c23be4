"""Converts a raw change-detection layout into ArrayRecord shards plus dataset_info.json.

    python -m data_prep.convert --layout opencd --root /data/LEVIR-CD --out /data/levir_shards

Writes `<split>-XXXXX-of-YYYYY.array_record` (records: `segchange_jax.data.records`) and, last,
`dataset_info.json` (counts, skipped pairs with reasons, image sizes, label statistics,
prompts, optional prompt-embedding table). Layouts: `segchange_jax.data.layouts`.
Bad input is never skipped silently: with --strict (default for val/test) the run fails with
one error listing every bad pair; with --nostrict bad pairs are skipped, printed and recorded
in dataset_info.json. Shards are written under a temporary folder and moved into --out only
when every split succeeded, so an interrupted run leaves no half-written dataset.
Large images are cut into --tile x --tile windows (stride --tile_stride, the last window
clamped to the edge); each tile keeps the pair's prompt and is named `<stem>_y<Y>_x<X><ext>`.
Split leaks (`segchange_jax.data.leaks`): source pairs that are exact or near copies of a pair
in another split are listed in dataset_info.json under "leaks" and printed; --on_leak=error
fails with nothing written, --on_leak=drop_from_train leaves the train copies out.
Per-prompt targets (segchange-default's `{split}/targets.json`, or derived from the two
land-cover maps of --layout second) go into each record beside its label (each tile keeps its
window of every mask); their prompts are listed in dataset_info.json under "target_prompts"
and embedded into the --text_model table too.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from segchange_jax import cli
from segchange_jax.data import layouts
from segchange_jax.data import leaks
from segchange_jax.data.convert import INFO_FILE
from segchange_jax.data.convert import ConvertError
from segchange_jax.data.convert import convert

_LIST = 20  # leaks printed in the summary; dataset_info.json lists them all


def define_flags() -> None:
  flags.DEFINE_enum('layout', None, list(layouts.layout_names()),
                    'Raw layout (segchange_jax.data.layouts.REGISTRY), one of:\n'
                    + layouts.help_text(), required=True)
  flags.DEFINE_string('root', None, 'Raw dataset root.', required=True)
  flags.DEFINE_string('out', None, 'Output folder for shards and dataset_info.json.',
                      required=True)
  flags.DEFINE_list('splits', ['train', 'val', 'test'], 'Splits to convert.')
  flags.DEFINE_string('list', '', 'File of names selecting a subset of the one split given.')
  flags.DEFINE_integer('tile', 0, 'Cut images larger than this into tiles (0 = whole images).',
                       lower_bound=0)
  flags.DEFINE_integer('tile_stride', 0, 'Tile stride (0 = --tile, no overlap).', lower_bound=0)
  flags.DEFINE_string('text_model', '', 'Text encoder dir/file: also write the prompt '
                      'embedding table (segchange_jax.text).')
  flags.DEFINE_integer('num_shards', 0, 'Shards per split (0 = ~1 per 512 pairs).', lower_bound=0)
  flags.DEFINE_bool('strict', None, 'Fail on any bad pair (default: strict except for train).')
  flags.DEFINE_bool('overwrite', False, 'Replace the dataset already in --out.')
  flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Conversion processes.', lower_bound=1)
  flags.DEFINE_enum('on_leak', 'warn', list(leaks.MODES),
                    'Pairs duplicated across splits (exact or near copies, '
                    'segchange_jax.data.leaks): error = fail, nothing written; warn = write '
                    'all and list them; drop_from_train = leave the train copies out. All '
                    'found pairs are listed in dataset_info.json under "leaks".')


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  info = convert(f.layout, f.root, f.out, f.splits, f.list, f.tile, f.tile_stride,
                 f.text_model, f.num_shards, f.strict, f.overwrite, f.workers, f.on_leak)
  for split, s in info['splits'].items():
    dropped = f" ({s['num_dropped_leaks']} split leaks)" if s['num_dropped_leaks'] else ''
    print(f"{split}: {s['num_examples']} records from {s['num_pairs']} pairs, "
          f"{s['num_skipped']} skipped{dropped}, size {s['image_size'] or s['image_sizes']}")
  lk = info['leaks']
  print(f"split leaks: {lk['num_leaks']} ({lk['num_exact']} exact, {lk['num_near']} near"
        + ''.join(f', {k}: {n}' for k, n in lk['counts'].items())
        + f"), {lk['num_dropped']} dropped from train (--on_leak={lk['on_leak']})")
  for pair in lk['pairs'][:_LIST]:
    print('  ' + leaks.Leak(**pair).describe())
  if lk['num_leaks'] > _LIST:
    print(f"  ... {lk['num_leaks'] - _LIST} more in {f.out}/{INFO_FILE}")
  print(f'wrote {f.out}/{INFO_FILE}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, extra_errors=(ConvertError,))
