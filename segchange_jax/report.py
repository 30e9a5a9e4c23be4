r"""Multi-seed report: mean +- std, min and max of the test metrics over runs of one experiment.

  python -m segchange_jax.report RUN_DIR [RUN_DIR ...] [--out PREFIX] [--split SPLIT]

Each RUN_DIR is a training workdir (`python -m segchange_jax.train --workdir RUN_DIR`;
`launch/seeds.sh` starts N seeds of one config and then runs this). Per run it reads:
- `config.json`, the resolved config training wrote (fields missing from an older run's file
  take their segchange_jax.default_config default);
- the metrics of --split (default: the config's eval.split): `eval_<split>.json`, the final
  evaluation training wrote, else an `evaluate` output `metrics_<split>.json` in RUN_DIR or in
  RUN_DIR/eval_<split>/ (`python -m segchange_jax.evaluate --split val --out RUN_DIR/eval_val`);
- the data fingerprint (segchange_jax.data.fingerprint): `model_card.json`'s
  data.fingerprint.sha256 when the run has a card, else computed from the shards its
  config.data.shards_dir names (relative paths from the current folder; the table says which
  runs had no card).

It refuses, in one line naming the differing values per run and writing nothing, runs whose
configs differ in anything but the seed and the fields of `NOT_THE_EXPERIMENT`, runs scored on
different data (fingerprints) or at different thresholds, two runs with the same seed (the
same numbers twice would shrink the spread) and a folder given twice.

Writes PREFIX.md (summary table, the runs, the data) and PREFIX.csv (metric, mean, std, min,
max, n; full precision), both or neither (default PREFIX `report`; a trailing .md or .csv is
dropped). Metrics: f1, iou, kappa, precision, recall, oa as segchange_jax.train.metrics
computes them (change class for binary models, macro averages for multi-class; kappa over the
whole confusion matrix). std is the sample standard deviation (n - 1 in the denominator),
empty for a single run; n counts the runs whose file holds the metric (older runs lack kappa).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
from typing import Any, Sequence

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import default_config

METRICS = ('f1', 'iou', 'kappa', 'precision', 'recall', 'oa')
SEED_FIELD = 'seed'
CONFIG_FILE = 'config.json'
CARD_FILE = 'model_card.json'  # written into the workdir by training (train/model_card.py)

# Config fields in which runs of one experiment may differ: they name or place a run, or change
# how it is computed but not what is computed. Keys are dotted fields, or prefixes ending in '.'.
# Paths to what a model learns from (init_from, model.pretrained, text.model, text.embeddings,
# data.train_list) stay compared: unlike the shards they carry no fingerprint here.
NOT_THE_EXPERIMENT = {
    SEED_FIELD: 'the field the runs vary',
    'name': 'names the run in the training log',
    'data.shards_dir': "where the shards sit; the data itself is compared by its fingerprint",
    'data.source_root': 'where the raw data sits (same)',
    'text.cache_dir': 'where prompt embeddings are cached',
    'data.num_workers': 'reading threads; the stream is fixed by (seed, position)',
    'data.prefetch_buffer': 'read-ahead depth (same)',
    'data.worker_processes': 'reading processes (same)',
    'train.progress_bar': 'terminal output',
    'train.log_every_steps': 'logging frequency',
    'train.stop_check_every': 'how often processes agree on a requested stop',
    'train.profile_steps': 'which steps a profiler traces',
    'train.compilation_cache_dir': 'where compiled steps are cached',
    'train.grad_reduction': 'how gradients are summed over devices (same sums, other dropout '
                            'draws)',
    'checkpoint.keep': 'how many latest checkpoints stay on disk',
    'checkpoint.every_steps': 'when checkpoints are written (resuming continues exactly)',
    'checkpoint.async_save': 'how checkpoints are written',
    'eval.batch_size': 'metrics are exact sums over examples, padding masked',
    'eval.num_images': 'comparison pictures only',
    'infer.': 'inference defaults, unused by training and evaluation',
    'mesh.': 'device layout of the same global batch',
    'distributed.': 'how processes find each other',
}


class ReportError(ValueError):
  """The runs cannot be reported together (or read); the message names runs and values."""


@dataclasses.dataclass
class Run:
  """One training run: its folder, flattened config, metrics file and data fingerprint."""
  path: str
  config: dict[str, Any]
  metrics: dict[str, Any]
  metrics_file: str
  fingerprint: str = ''  # sha256, filled by `add_fingerprints`
  card: bool = False     # True: the fingerprint came from model_card.json, else the shards

  @property
  def seed(self) -> Any:
    return self.config.get(SEED_FIELD)


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (config.json writes tuples as lists)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def is_experiment_field(name: str) -> bool:
  """False for the fields of NOT_THE_EXPERIMENT (exact names, or under a 'prefix.')."""
  return not any(name == k or (k.endswith('.') and name.startswith(k))
                 for k in NOT_THE_EXPERIMENT)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ReportError(f'{path} is not valid JSON ({e}); is the run still being written?') from e
  if not isinstance(data, dict):
    raise ReportError(f'{path} does not hold a JSON object')
  return data


def metrics_candidates(run_dir: str, split: str) -> list[str]:
  """Where a run's metrics of `split` may be, in the order they are looked for."""
  return [os.path.join(run_dir, f'eval_{split}.json'),
          os.path.join(run_dir, f'metrics_{split}.json'),
          os.path.join(run_dir, f'eval_{split}', f'metrics_{split}.json')]


def add_fingerprints(runs: list[Run]) -> None:
  """Sets each run's data fingerprint: its model card's, else computed from its shards."""
  for r in runs:
    card_path = os.path.join(r.path, CARD_FILE)
    if os.path.isfile(card_path):
      fp = (_read_json(card_path).get('data') or {}).get('fingerprint') or {}
      if fp.get('sha256'):
        r.fingerprint, r.card = str(fp['sha256']), True
        continue
    shards = r.config.get('data.shards_dir') or ''
    # Imported here: grain takes seconds to load, and runs with a card never need it.
    from segchange_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
    try:
      r.fingerprint, r.card = fingerprint.fingerprint(shards)['sha256'], False
    except (ValueError, OSError) as e:
      raise ReportError(f'{r.path}: no data fingerprint: it has no {CARD_FILE} and its '
                        f'config.data.shards_dir {shards!r} cannot be read ({cli.one_line(e)}); '
                        'run report from the folder the run was trained in') from e


def load_run(run_dir: str, split: str | None = None) -> Run:
  """Reads one run folder (see the module docstring for the files and their order)."""
  if not os.path.isdir(run_dir):
    raise ReportError(f'run folder {run_dir} does not exist')
  config_path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ReportError(f'{run_dir} has no {CONFIG_FILE}: not a training workdir '
                      '(python -m segchange_jax.train --workdir DIR writes it)')
  config = flatten(default_config.get_config().to_dict())
  config.update(flatten(_read_json(config_path)))
  split = split or config.get('eval.split') or 'test'
  candidates = metrics_candidates(run_dir, split)
  found = [p for p in candidates if os.path.isfile(p)]
  if not found:
    raise ReportError(f'{run_dir} has no metrics of split {split!r}: none of '
                      f'{", ".join(os.path.relpath(p, run_dir) for p in candidates)} exists '
                      '(training writes eval_<eval.split>.json when it finishes; or run '
                      f'python -m segchange_jax.evaluate --split {split} --out '
                      f'{os.path.join(run_dir, "eval_" + split)})')
  return Run(run_dir, config, _read_json(found[0]), found[0])


def _show(v: Any) -> str:
  return json.dumps(list(v) if isinstance(v, tuple) else v)


def _differences(runs: list[Run], values: list[Any], what: str) -> str:
  return f'{what} (' + ', '.join(f'{r.path}: {v}' for r, v in zip(runs, values)) + ')'


def check_comparable(runs: list[Run], max_fields: int = 6) -> None:
  """Raises ReportError naming what differs when `runs` are not one experiment's seeds.

  Configs first, then the data (`add_fingerprints`, reading the shards only where a run has
  no model card), thresholds and seeds.
  """
  real = {}
  for r in runs:
    key = os.path.realpath(r.path)
    if key in real:
      raise ReportError(f'{r.path} is given twice (also as {real[key]})')
    real[key] = r.path
  names = sorted(set().union(*(r.config for r in runs)))
  absent = object()
  differ = []
  for name in names:
    if not is_experiment_field(name):
      continue
    values = [r.config.get(name, absent) for r in runs]
    if any(v != values[0] for v in values[1:]):
      shown = ['<absent>' if v is absent else _show(v) for v in values]
      differ.append(_differences(runs, shown, name))
  if differ:
    more = f'; and {len(differ) - max_fields} more fields' if len(differ) > max_fields else ''
    raise ReportError('the runs are not one experiment: their configs differ in '
                      + '; '.join(differ[:max_fields]) + more
                      + '; report runs that differ only in the seed (fields that may differ: '
                      'segchange_jax.report.NOT_THE_EXPERIMENT)')
  add_fingerprints(runs)
  fps = [r.fingerprint for r in runs]
  if len(set(fps)) > 1:
    shown = [f'{fp[:12]} ({"model card" if r.card else "computed"})' for r, fp in zip(runs, fps)]
    raise ReportError('the runs were scored on different data: '
                      + _differences(runs, shown, 'data fingerprint sha256')
                      + '; report runs of one dataset')
  thresholds = [r.metrics.get('threshold', r.config.get('eval.threshold')) for r in runs]
  if len(set(thresholds)) > 1:
    raise ReportError('the runs were scored at different thresholds: '
                      + _differences(runs, thresholds, 'threshold'))
  seen: dict[Any, str] = {}
  for r in runs:
    if r.seed in seen:
      raise ReportError(f'{seen[r.seed]} and {r.path} have the same seed {r.seed}: the same '
                        'numbers twice would understate the spread; give each seed once')
    seen[r.seed] = r.path


def summarize(runs: list[Run]) -> dict[str, dict[str, float | int | None]]:
  """{metric: {mean, std (sample, n - 1; None for n < 2), min, max, n}} over `runs`."""
  table = {}
  for m in METRICS:
    xs = [float(r.metrics[m]) for r in runs if isinstance(r.metrics.get(m), (int, float))]
    n = len(xs)
    if not n:
      table[m] = {'mean': None, 'std': None, 'min': None, 'max': None, 'n': 0}
      continue
    # statistics sums in exact fractions: identical values give std 0.0, not rounding noise.
    std = statistics.stdev(xs) if n > 1 else None
    table[m] = {'mean': statistics.mean(xs), 'std': std, 'min': min(xs), 'max': max(xs), 'n': n}
  return table


def _f(v: float | None, digits: int = 4) -> str:
  return '-' if v is None else f'{v:.{digits}f}'


def render_markdown(runs: list[Run], table: dict, split: str) -> str:
  """The report for people: summary table, one row per run, the data and the rules."""
  first = runs[0]
  threshold = first.metrics.get('threshold', first.config.get('eval.threshold'))
  lines = [f'# Multi-seed report: {len(runs)} runs, split {split}', '',
           f'Split `{split}`, threshold {threshold}; runs whose configs differ only in the '
           f'seed ({", ".join(str(r.seed) for r in runs)}). std is the sample standard '
           'deviation (n - 1 in the denominator).', '',
           '| metric | mean ± std | min | max | n |', '|---|---|---|---|---|']
  for m, s in table.items():
    lines.append(f'| {m} | {_f(s["mean"])} ± {_f(s["std"])} | {_f(s["min"])} | '
                 f'{_f(s["max"])} | {s["n"]} |')
  lines += ['', '## Runs', '', '| run | seed | ' + ' | '.join(METRICS) + ' | metrics file |',
            '|---' * (len(METRICS) + 3) + '|']
  for r in runs:
    values = ' | '.join(_f(r.metrics.get(m)) if isinstance(r.metrics.get(m), (int, float))
                        else '-' for m in METRICS)
    step = r.metrics.get('checkpoint_step')
    where = os.path.relpath(r.metrics_file, r.path) + (f' (step {step})' if step else '')
    lines.append(f'| {r.path} | {r.seed} | {values} | {where} |')
  no_card = [r.path for r in runs if not r.card]
  lines += ['', f'Data fingerprint (sha256): `{first.fingerprint}`'
            + (f'; computed from the shards for the runs without a model card: '
               f'{", ".join(no_card)}' if no_card else '; from every run\'s model card') + '.',
            '']
  return '\n'.join(lines)


def render_csv(table: dict) -> str:
  """metric, mean, std, min, max, n; full precision (repr), empty where undefined."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(['metric', 'mean', 'std', 'min', 'max', 'n'])
  for m, s in table.items():
    w.writerow([m, *('' if s[k] is None else repr(s[k]) for k in ('mean', 'std', 'min', 'max')),
                s['n']])
  return buf.getvalue()


def output_paths(prefix: str) -> tuple[str, str]:
  """(PREFIX.md, PREFIX.csv), a trailing .md / .csv of `prefix` dropped."""
  stem, ext = os.path.splitext(prefix)
  if ext in ('.md', '.csv'):
    prefix = stem
  return f'{prefix}.md', f'{prefix}.csv'


def report(run_dirs: Sequence[str], prefix: str = 'report', split: str | None = None,
           overwrite: bool = False) -> tuple[str, dict]:
  """Reads, checks and summarises `run_dirs`; writes PREFIX.md and PREFIX.csv (both or neither).

  Returns the markdown and the summary table.
  """
  if not run_dirs:
    raise cli.UsageError('give the run folders: python -m segchange_jax.report RUN_DIR ...')
  md_path, csv_path = output_paths(prefix)
  runs = [load_run(d, split) for d in run_dirs]
  inputs = [r.metrics_file for r in runs] + [os.path.join(r.path, CONFIG_FILE) for r in runs]
  for p in (md_path, csv_path):
    atomic.check_output(p, inputs, overwrite, '--out')
  check_comparable(runs)
  table = summarize(runs)
  text = render_markdown(runs, table, split or str(runs[0].config.get('eval.split')))
  with atomic.Outputs() as out:
    for path, content in ((md_path, text), (csv_path, render_csv(table))):
      with open(out.path(path), 'w', encoding='utf-8', newline='') as f:
        f.write(content)
  return text, table


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string('out', 'report', 'Output prefix: writes PREFIX.md and PREFIX.csv.')
  flags.DEFINE_string('split', None, "Split whose metrics are reported (default: the runs' "
                      'config eval.split).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing PREFIX.md / PREFIX.csv.')


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  bad = [a for a in argv[1:] if a.startswith('-')]
  if bad:
    raise cli.UsageError(f'unknown flag {bad[0]} (see --help)')
  text, _ = report(argv[1:], f.out, f.split, f.overwrite)
  print(text)
  md_path, csv_path = output_paths(f.out)
  print(f'wrote {md_path} and {csv_path}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
