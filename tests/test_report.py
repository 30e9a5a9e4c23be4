"""Multi-seed report (`python -m segchange_jax.report`) and launch/seeds.sh on synthetic runs.

Run folders are written here as training writes them (config.json from default_config with the
seed changed, eval_<split>.json with known numbers, optionally model_card.json), so the means
and standard deviations are checked against hand-computed values without training anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from segchange_jax import default_config
from segchange_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
SHA = 'ab' * 32


def make_run(root, name: str, seed: int, metrics: dict, *, fingerprint: str | None = SHA,
             overrides: dict | None = None, metrics_file: str = 'eval_test.json') -> str:
  """A training workdir: config.json (default config, `seed`, `overrides` by dotted name),
  `metrics_file` holding `metrics`, and a model card with `fingerprint` (None: no card)."""
  run = pathlib.Path(root) / name
  config = default_config.get_config()
  config.seed = seed
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  (run / os.path.dirname(metrics_file)).mkdir(parents=True, exist_ok=True)
  (run / 'config.json').write_text(config.to_json_best_effort(indent=2))
  (run / metrics_file).write_text(json.dumps(metrics))
  if fingerprint is not None:
    card = {'seed': seed, 'data': {'fingerprint': {'sha256': fingerprint, 'splits': {}}}}
    (run / 'model_card.json').write_text(json.dumps(card))
  return str(run)


def _metrics(f1: float, **more) -> dict:
  base = {'f1': f1, 'iou': f1 / 2, 'kappa': f1 - 0.1, 'precision': 0.9, 'recall': f1,
          'oa': 0.95, 'loss': 0.3, 'num_examples': 10, 'checkpoint_step': 100}
  base.update(more)
  return base


def _read_csv(path) -> dict[str, dict[str, str]]:
  with open(path, newline='') as f:
    return {row['metric']: row for row in csv.DictReader(f)}


def _three_seeds(tmp_path) -> list[str]:
  runs = [make_run(tmp_path, 'seed_0', 0, _metrics(0.7)),
          make_run(tmp_path, 'seed_1', 1, _metrics(0.8)),
          make_run(tmp_path, 'seed_2', 2, _metrics(0.9))]
  # An older eval JSON without kappa: that metric counts 2 runs.
  data = json.loads(pathlib.Path(runs[2], 'eval_test.json').read_text())
  del data['kappa']
  pathlib.Path(runs[2], 'eval_test.json').write_text(json.dumps(data))
  return runs


def test_mean_sample_std_min_max_n(tmp_path):
  runs = _three_seeds(tmp_path)
  text, table = report.report(runs, str(tmp_path / 'out' / 'seeds'))
  # f1 0.7, 0.8, 0.9: mean 0.8, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1 (the population
  # std would be 0.0816).
  rows = _read_csv(tmp_path / 'out' / 'seeds.csv')
  assert list(rows) == list(report.METRICS)
  f1 = rows['f1']
  assert float(f1['mean']) == pytest.approx(0.8, abs=1e-15)
  assert float(f1['std']) == pytest.approx(0.1, abs=1e-15)
  assert (float(f1['min']), float(f1['max']), int(f1['n'])) == (0.7, 0.9, 3)
  assert float(rows['iou']['std']) == pytest.approx(0.05, abs=1e-15)
  # kappa 0.6, 0.7 (the third run has none): mean 0.65, std sqrt(2 * 0.05^2 / 1).
  assert int(rows['kappa']['n']) == 2
  assert float(rows['kappa']['mean']) == pytest.approx(0.65, abs=1e-15)
  assert float(rows['kappa']['std']) == pytest.approx(math.sqrt(0.005), abs=1e-15)
  assert float(rows['precision']['std']) == 0.0 and float(rows['oa']['mean']) == 0.95  # exact
  assert table['f1']['n'] == 3
  md = (tmp_path / 'out' / 'seeds.md').read_text()
  assert md == text
  assert '| f1 | 0.8000 ± 0.1000 | 0.7000 | 0.9000 | 3 |' in md
  assert '| kappa | 0.6500 ± 0.0707 | 0.6000 | 0.7000 | 2 |' in md
  assert 'sample standard deviation (n - 1' in md
  assert f'| {runs[1]} | 1 | 0.8000 |' in md and 'eval_test.json (step 100)' in md
  assert SHA in md and 'from every run\'s model card' in md


def test_single_run_has_no_std(tmp_path):
  run = make_run(tmp_path, 'only', 3, _metrics(0.5))
  _, table = report.report([run], str(tmp_path / 'r.md'))  # the .md is dropped from the prefix
  assert table['f1'] == {'mean': 0.5, 'std': None, 'min': 0.5, 'max': 0.5, 'n': 1}
  assert _read_csv(tmp_path / 'r.csv')['f1']['std'] == ''
  assert '| f1 | 0.5000 ± - |' in (tmp_path / 'r.md').read_text()


def test_fields_that_do_not_change_the_experiment_may_differ(tmp_path):
  runs = [make_run(tmp_path, 'a', 0, _metrics(0.7)),
          make_run(tmp_path, 'b', 1, _metrics(0.8), overrides={
              'name': 'other', 'data.shards_dir': '/elsewhere', 'mesh.fsdp': 2,
              'infer.window': 256, 'eval.batch_size': 32, 'checkpoint.keep': 5})]
  _, table = report.report(runs, str(tmp_path / 'rep'))
  assert table['f1']['n'] == 2
  for field in ('name', 'data.shards_dir', 'mesh.fsdp', 'infer.window', 'checkpoint.keep'):
    assert not report.is_experiment_field(field), field
  for field in ('train.lr', 'model.backbone', 'data.synthetic.seed', 'eval.threshold',
                'checkpoint.keep_best', 'data.augment.hflip'):
    assert report.is_experiment_field(field), field


def _refused(tmp_path, runs, *words, split=None):
  prefix = tmp_path / 'refused'
  with pytest.raises(report.ReportError) as e:
    report.report(runs, str(prefix), split)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert '\n' not in str(e.value)
  assert not list(tmp_path.glob('refused*'))
  return str(e.value)


def test_refuses_runs_whose_configs_differ_naming_fields_and_values(tmp_path):
  a = make_run(tmp_path, 'a', 0, _metrics(0.7))
  b = make_run(tmp_path, 'b', 1, _metrics(0.8), overrides={'train.lr': 5e-4,
                                                           'model.backbone': 'resnet50'})
  msg = _refused(tmp_path, [a, b], 'train.lr', f'{a}: 0.0001', f'{b}: 0.0005',
                 'model.backbone', '"swin_base_patch4_window7_224"', '"resnet50"')
  assert 'seed' not in msg.split('report runs')[0]  # the seed is not listed as a difference


def test_refuses_runs_on_different_data(tmp_path):
  a = make_run(tmp_path, 'a', 0, _metrics(0.7))
  b = make_run(tmp_path, 'b', 1, _metrics(0.8), fingerprint='cd' * 32)
  _refused(tmp_path, [a, b], 'different data', f'{a}: abababababab (model card)',
           f'{b}: cdcdcdcdcdcd (model card)')


def _fake_shards(folder, num_test: int) -> str:
  """A shards folder as the fingerprint sees it: dataset_info.json and shard files."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True)
  info = {'created': 'now', 'splits': {'test': {'num_examples': num_test,
                                                'shards': ['test-00000-of-00001']}}}
  (folder / 'dataset_info.json').write_text(json.dumps(info))
  (folder / 'test-00000-of-00001').write_bytes(b'x' * num_test)
  return str(folder)


def test_runs_without_a_card_are_fingerprinted_from_their_shards(tmp_path):
  from segchange_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
  shards = _fake_shards(tmp_path / 'shards', 4)
  copy = _fake_shards(tmp_path / 'copy_of_shards', 4)  # same data elsewhere: same fingerprint
  sha = fingerprint.fingerprint(shards)['sha256']
  runs = [make_run(tmp_path, 'a', 0, _metrics(0.7), fingerprint=None,
                   overrides={'data.shards_dir': shards}),
          make_run(tmp_path, 'b', 1, _metrics(0.8), fingerprint=None,
                   overrides={'data.shards_dir': copy}),
          make_run(tmp_path, 'c', 2, _metrics(0.9), fingerprint=sha)]
  text, _ = report.report(runs, str(tmp_path / 'rep'))
  assert f'computed from the shards for the runs without a model card: {runs[0]}, {runs[1]}' \
      in text and sha in text
  other = _fake_shards(tmp_path / 'other', 5)
  d = make_run(tmp_path, 'd', 3, _metrics(0.9), fingerprint=None,
               overrides={'data.shards_dir': other})
  _refused(tmp_path, [runs[0], d], 'different data', f'{d}: ', '(computed)')
  gone = make_run(tmp_path, 'e', 4, _metrics(0.9), fingerprint=None,
                  overrides={'data.shards_dir': str(tmp_path / 'missing')})
  _refused(tmp_path, [runs[0], gone], f'{gone}: no data fingerprint', 'model_card.json',
           'missing')


def test_refuses_same_seed_same_folder_and_thresholds(tmp_path):
  a = make_run(tmp_path, 'a', 0, _metrics(0.7))
  b = make_run(tmp_path, 'b', 0, _metrics(0.8))
  _refused(tmp_path, [a, b], f'{a} and {b} have the same seed 0')
  _refused(tmp_path, [a, a + '/'], 'given twice')
  c = make_run(tmp_path, 'c', 2, _metrics(0.8, threshold=0.4), metrics_file='metrics_test.json')
  _refused(tmp_path, [a, c], 'different thresholds', f'{a}: 0.5', f'{c}: 0.4')


def test_split_and_evaluate_outputs(tmp_path):
  # `evaluate --split val --out RUN/eval_val` beside training's own eval_test.json.
  a = make_run(tmp_path, 'a', 0, _metrics(0.7))
  b = make_run(tmp_path, 'b', 1, _metrics(0.8))
  for run, f1 in ((a, 0.6), (b, 0.4)):
    path = pathlib.Path(run, 'eval_val', 'metrics_val.json')
    path.parent.mkdir()
    path.write_text(json.dumps(_metrics(f1, threshold=0.5, checkpoint_step=None)))
  _, table = report.report([a, b], str(tmp_path / 'val'), split='val')
  assert table['f1']['mean'] == pytest.approx(0.5, abs=1e-15)
  assert 'eval_val/metrics_val.json' in (tmp_path / 'val.md').read_text()
  _, table = report.report([a, b], str(tmp_path / 'test'))  # default: config eval.split
  assert table['f1']['mean'] == pytest.approx(0.75, abs=1e-15)
  msg = _refused(tmp_path, [a, b], "no metrics of split 'train'", 'eval_train.json',
                 'metrics_train.json', split='train')
  assert 'segchange_jax.evaluate --split train' in msg
  _refused(tmp_path, [str(tmp_path / 'nothing')], 'does not exist')
  (tmp_path / 'empty').mkdir()
  _refused(tmp_path, [str(tmp_path / 'empty')], 'no config.json')


def _subprocess(*args, cwd=REPO, env=None):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_command_writes_both_files_or_neither(tmp_path):
  runs = _three_seeds(tmp_path)
  proc = _subprocess(sys.executable, '-m', 'segchange_jax.report', *runs, '--out',
                     str(tmp_path / 'rep'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| f1 | 0.8000 ± 0.1000 |' in proc.stdout and 'wrote' in proc.stdout
  md = (tmp_path / 'rep.md').read_text()
  proc = _subprocess(sys.executable, '-m', 'segchange_jax.report', *runs, '--out',
                     str(tmp_path / 'rep'))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      f'error: --out {tmp_path / "rep.md"} already exists')
  assert (tmp_path / 'rep.md').read_text() == md
  help_out = _subprocess(sys.executable, '-m', 'segchange_jax.report', '--help')
  assert help_out.returncode == 0 and '--split' in help_out.stdout


_STAND_IN = '''\
#!{python}
"""Stands in for python: `-m segchange_jax.train` writes a finished run, the rest runs."""
import json, os, sys
args = sys.argv[1:]
if args[:2] != ['-m', 'segchange_jax.train']:
  os.execv({python!r}, [{python!r}, *args])
workdir = args[args.index('--workdir') + 1]
seed = int([a for a in args if a.startswith('--config.seed=')][0].split('=')[1])
if seed == int(os.environ.get('FAIL_SEED', '-1')):
  sys.exit(3)
from segchange_jax import default_config
config = default_config.get_config()
config.seed = seed
config.train.max_steps = int([a for a in args if a.startswith('--config.train.max_steps=')][0]
                             .split('=')[1])
os.makedirs(workdir, exist_ok=True)
open(os.path.join(workdir, 'config.json'), 'w').write(config.to_json_best_effort())
json.dump({{'f1': 0.5 + seed / 10, 'iou': 0.4, 'kappa': 0.45, 'precision': 0.5, 'recall': 0.6,
           'oa': 0.9}}, open(os.path.join(workdir, 'eval_test.json'), 'w'))
json.dump({{'data': {{'fingerprint': {{'sha256': '{sha}'}}}}}},
          open(os.path.join(workdir, 'model_card.json'), 'w'))
'''


def test_seeds_script_dry_run_prints_every_command(tmp_path):
  proc = _subprocess('bash', 'launch/seeds.sh', 'configs/demo.py', str(tmp_path / 'p'), '3',
                     '--first_seed', '4', '--', '--config.train.epochs=2',
                     env={'DRY_RUN': '1'})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[:3] == [f'+ python -m segchange_jax.train --config configs/demo.py --workdir '
                       f'{tmp_path}/p/seed_{s} --config.seed={s} --config.train.epochs=2'
                       for s in (4, 5, 6)]
  assert lines[3] == (f'+ python -m segchange_jax.report {tmp_path}/p/seed_4 {tmp_path}/p/seed_5 '
                      f'{tmp_path}/p/seed_6 --out {tmp_path}/p/report --overwrite')
  assert not (tmp_path / 'p').exists()


@pytest.mark.parametrize('args, words', [
    (['configs/demo.py', 'p'], ['usage', '2 positional']),
    (['configs/demo.py', 'p', '0'], ['N=0', '>= 1']),
    (['configs/demo.py', 'p', '2', '--jobs', 'x'], ['--jobs x']),
    (['configs/nope.py', 'p', '2'], ['configs/nope.py not found']),
    (['configs/demo.py', 'p', '2', '--config.seed=1'], ['--config.seed=1', 'per run']),
])
def test_seeds_script_rejects_bad_arguments(tmp_path, args, words):
  proc = _subprocess('bash', 'launch/seeds.sh', *args, '--dry_run', cwd=REPO)
  assert proc.returncode == 2, proc.stdout
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: seeds.sh: '), proc.stderr
  for w in words:
    assert w in err[0], (w, err[0])


@pytest.mark.parametrize('jobs', ['1', '2'])
def test_seeds_script_trains_every_seed_then_reports(tmp_path, jobs):
  stand_in = tmp_path / 'python'
  stand_in.write_text(textwrap.dedent(_STAND_IN.format(python=sys.executable, sha=SHA)))
  stand_in.chmod(0o755)
  prefix = tmp_path / 'runs'
  env = {'PYTHON': str(stand_in)}
  proc = _subprocess('bash', 'launch/seeds.sh', 'configs/demo.py', str(prefix), '3',
                     '--jobs', jobs, '--config.train.max_steps=2', env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _read_csv(prefix / 'report.csv')
  # f1 0.5, 0.6, 0.7 over seeds 0, 1, 2.
  assert float(rows['f1']['mean']) == pytest.approx(0.6, abs=1e-15)
  assert float(rows['f1']['std']) == pytest.approx(0.1, abs=1e-15)
  assert rows['f1']['n'] == '3'
  assert sorted(p.name for p in prefix.glob('seed_*') if p.is_dir()) == [
      'seed_0', 'seed_1', 'seed_2']
  # One seed fails: no report, the failing seed named, status not 0.
  failed = tmp_path / 'failed'
  proc = _subprocess('bash', 'launch/seeds.sh', 'configs/demo.py', str(failed), '3',
                     '--jobs', jobs, '--config.train.max_steps=2', env={**env, 'FAIL_SEED': '1'})
  assert proc.returncode == 2 and 'seed' in proc.stderr and '1' in proc.stderr, proc.stderr
  assert not (failed / 'report.md').exists() and not (failed / 'report.csv').exists()
