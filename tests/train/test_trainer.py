"""The training driver end to end on a tiny model: outputs, exact resume, preemption, init_from."""

import csv
import json
import os

import jax
import numpy as np
import pytest

import segchange_jax
from segchange_jax import config_lib
from segchange_jax import evaluate as evaluate_command
from segchange_jax.data import fingerprint
from segchange_jax.data import input_pipeline
from segchange_jax.data import shards
from segchange_jax.interop import checkpoints
from segchange_jax.train import checkpointing
from segchange_jax.train import loop
from segchange_jax.train import model_card
from tests.train.conftest import tiny_overrides


def _config(repo_root, dataset, **overrides):
  return config_lib.load_config(str(repo_root / 'configs/demo.py'),
                                tiny_overrides(dataset, **overrides))


def _params(workdir, config):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), config)
  step = ckpt.latest_step()
  ckpt.close()
  path = os.path.join(workdir, 'checkpoints', 'latest', str(step))
  return step, jax.tree.map(np.asarray, checkpointing.restore_params(path))


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.csv')) as f:
    return {int(r['step']): float(r['loss']) for r in csv.DictReader(f) if r['split'] == 'train'}


@pytest.fixture(scope='module')
def full_run(repo_root, dataset, tmp_path_factory):
  """One uninterrupted 4-step run (4 epochs of 1 step, eval after each)."""
  config = _config(repo_root, dataset, **{'train.max_steps': 4})
  workdir = str(tmp_path_factory.mktemp('full'))
  return config, workdir, loop.train_and_evaluate(config, workdir)


def test_training_writes_logs_checkpoints_and_test_metrics(full_run):
  _, full, result = full_run
  for name in ('config.json', 'metrics.csv', 'eval_test.json'):
    assert os.path.isfile(os.path.join(full, name)), name
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(os.path.join(full, 'tb')))
  assert {'latest', 'best_f1', 'best_iou'} <= set(os.listdir(os.path.join(full, 'checkpoints')))
  with open(os.path.join(full, 'eval_test.json')) as f:
    saved = json.load(f)
  assert saved['num_examples'] == result['num_examples'] == 2
  assert 0.0 <= saved['f1'] <= 1.0 and 'f1_all_change' in saved
  with open(os.path.join(full, 'metrics.csv')) as f:
    rows = list(csv.DictReader(f))
  assert {'train', 'val', 'test'} <= {r['split'] for r in rows}
  assert sorted(int(r['step']) for r in rows if r['split'] == 'train') == [1, 2, 3, 4]


def test_every_checkpoint_and_the_workdir_carry_a_model_card(full_run):
  config, full, result = full_run
  root = os.path.join(full, 'checkpoints')
  step_dirs = [os.path.join(root, kind, step) for kind in checkpointing.KINDS
               for step in os.listdir(os.path.join(root, kind)) if step.isdigit()]
  assert len(step_dirs) >= 3
  fp = fingerprint.fingerprint(config.data.shards_dir)
  leaks = input_pipeline.load_dataset_info(config.data.shards_dir).get('leaks')
  for step_dir in step_dirs:
    card = model_card.check_card(checkpoints.read_card(step_dir), step_dir)
    kind, step = step_dir.split(os.sep)[-2:]
    assert card['checkpoint'] == {'kind': kind, 'step': int(step)}
    assert card['training']['step'] == int(step) and card['training']['total_steps'] == 4
    assert card['training']['wall_time_s'] > 0
    assert card['data']['fingerprint'] == fp and card['data']['leaks'] == leaks
    assert card['config'] == json.loads(config.to_json_best_effort())
    assert card['seed'] == config.seed
    assert card['code']['segchange_jax'] == segchange_jax.__version__
    assert card['hardware'] == {'platform': 'cpu', 'device_kind': jax.devices()[0].device_kind,
                                'device_count': 8, 'process_count': 1}
    # Every save in this run follows an evaluation: the card has the val metrics of its step.
    val = card['metrics']['val']
    assert val['step'] == int(step) and val['threshold'] == config.eval.threshold
    assert 0.0 <= val['f1'] <= 1.0
    assert os.path.isfile(os.path.join(step_dir, checkpoints.CARD_ITEM,
                                       checkpoints.CARD_MARKDOWN))
  with open(os.path.join(full, checkpoints.CARD_FILE)) as f:
    final = json.load(f)
  scored = os.path.join(root, 'best_iou', str(result['checkpoint_step']))
  assert final == checkpoints.read_card(scored)  # the scored checkpoint's card, test included
  assert final['checkpoint'] == {'kind': 'best_iou', 'step': result['checkpoint_step']}
  assert final['metrics']['test']['f1'] == result['f1']
  assert final['metrics']['test']['num_examples'] == result['num_examples'] == 2
  with open(os.path.join(full, checkpoints.CARD_MARKDOWN)) as f:
    text = f.read()
  assert fp['sha256'] in text and '| test |' in text


def test_verify_reproduces_the_cards_test_metrics_exactly(full_run):
  """`evaluate --verify` on the run's checkpoints folder re-scores its best checkpoint (the one
  scored on test) and finds every metric of the card bit for bit."""
  _, full, result = full_run
  ok, lines = evaluate_command.verify(os.path.join(full, 'checkpoints'))
  assert ok, lines
  assert lines[-1] == "the card's metrics reproduce exactly", lines
  rows = {ln.split()[0]: ln for ln in lines[2:-1]}
  assert {'f1', 'iou', 'precision', 'recall', 'loss', 'num_examples'} <= set(rows), lines
  assert all(ln.endswith('exact') for ln in rows.values()), lines
  assert repr(result['f1']) in rows['f1']


# Wall-clock columns of metrics.csv; every other column must repeat exactly.
TIMING_COLUMNS = {'examples_per_s'}


def _assert_same_run(workdir_a, workdir_b, config):
  with open(os.path.join(workdir_a, 'metrics.csv')) as f:
    rows_a = list(csv.DictReader(f))
  with open(os.path.join(workdir_b, 'metrics.csv')) as f:
    rows_b = list(csv.DictReader(f))
  assert len(rows_a) == len(rows_b) > 0
  for ra, rb in zip(rows_a, rows_b):
    assert {k: v for k, v in ra.items() if k not in TIMING_COLUMNS} == \
        {k: v for k, v in rb.items() if k not in TIMING_COLUMNS}, (ra, rb)
  step_a, params_a = _params(workdir_a, config)
  step_b, params_b = _params(workdir_b, config)
  assert step_a == step_b
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(x, y)  # bit for bit
  for name in ('eval_test.json',):
    with open(os.path.join(workdir_a, name)) as fa, open(os.path.join(workdir_b, name)) as fb:
      assert json.load(fa) == json.load(fb)


@pytest.mark.slow  # one more full tiny training run
def test_same_command_twice_gives_identical_metrics_and_checkpoints(full_run, tmp_path):
  """Reproducibility: a second run of the same config repeats metrics.csv and params exactly."""
  config, full, _ = full_run
  again = str(tmp_path / 'again')
  loop.train_and_evaluate(config, again)
  _assert_same_run(full, again, config)


@pytest.mark.slow
def test_same_command_twice_with_augmentation_and_reader_threads(repo_root, dataset, tmp_path):
  """As above with the paired augmentations on and 4 reader threads (data.num_workers=2)."""
  config = _config(repo_root, dataset, **{'train.max_steps': 3, 'data.augment.enabled': True,
                                          'data.num_workers': 2})
  runs = [str(tmp_path / f'run{i}') for i in range(2)]
  for workdir in runs:
    loop.train_and_evaluate(config, workdir)
  _assert_same_run(*runs, config)


@pytest.mark.slow
def test_preempted_and_resumed_run_equals_uninterrupted_run(full_run, tmp_path):
  config, full, _ = full_run
  resumed = str(tmp_path / 'resumed')
  calls = {'n': 0}

  def stop_after_two():  # polled once after every step
    calls['n'] += 1
    return calls['n'] >= 2
  out = loop.train_and_evaluate(config, resumed, should_stop=stop_after_two)
  assert out == {'stopped_at_step': 2}
  assert _params(resumed, config)[0] == 2
  loop.train_and_evaluate(config, resumed)

  step_full, p_full = _params(full, config)
  step_res, p_res = _params(resumed, config)
  assert step_full == step_res == 4
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p_full, p_res))
  assert max(diffs) == 0.0, f'resumed params differ by {max(diffs)}'
  full_losses, res_losses = _train_losses(full), _train_losses(resumed)
  assert [full_losses[s] for s in (3, 4)] == [res_losses[s] for s in (3, 4)]


@pytest.mark.slow
def test_init_from_our_checkpoint_reports_what_it_loaded(repo_root, dataset, tmp_path):
  base = _config(repo_root, dataset, **{'train.max_steps': 1})
  loop.train_and_evaluate(base, str(tmp_path / 'pre'))
  # Fine-tune with another text dimension: everything but the text projection loads.
  rng = np.random.default_rng(1)
  with np.load(dataset / 'emb.npz') as z:
    prompts = z['prompts']
  np.savez(tmp_path / 'emb24.npz', prompts=prompts,
           embeddings=rng.normal(size=(len(prompts), 8, 24)).astype(np.float32))
  tuned = _config(repo_root, dataset, **{
      'train.max_steps': 1, 'init_from': str(tmp_path / 'pre' / 'checkpoints'),
      'text.dim': 24, 'text.embeddings': str(tmp_path / 'emb24.npz')})
  loop.train_and_evaluate(tuned, str(tmp_path / 'tuned'))
  with open(tmp_path / 'tuned' / 'init_from_report.json') as f:
    report = json.load(f)
  assert report['loaded'] > 50
  assert report['skipped'] and all('lang2vis' in s for s in report['skipped']), report['skipped']


def test_batch_not_divisible_by_devices_is_a_clear_error(repo_root, dataset, tmp_path):
  config = _config(repo_root, dataset, **{'train.batch_size': 4})
  with pytest.raises(loop.TrainingError, match='train.batch_size=4 must be a multiple of the 8'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


def test_missing_data_is_a_clear_error(repo_root, dataset, tmp_path):
  config = _config(repo_root, dataset, **{'data.shards_dir': str(tmp_path / 'nope')})
  with pytest.raises(shards.DataSetupError, match='data_prep.convert'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


def test_text_dim_mismatch_is_a_clear_error(repo_root, dataset, tmp_path):
  config = _config(repo_root, dataset, **{'text.dim': 32})
  with pytest.raises(ValueError, match='text.dim'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


def test_reverse_export_of_a_trained_checkpoint_gives_torch_the_same_logits(full_run, tmp_path):
  """A model trained here (8 devices, 4 steps), `convert_torch --reverse`, loaded into the torch
  reference: the same eval-mode logits, running BatchNorm statistics included."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from segchange_jax import ChangeDetector  # pylint: disable=g-import-not-at-top
  from tests.torch_ref import segchange as ref  # pylint: disable=g-import-not-at-top
  from tests.torch_ref import util  # pylint: disable=g-import-not-at-top
  config, workdir, _ = full_run
  ckpt = os.path.join(workdir, 'checkpoints')
  out = tmp_path / 'trained.safetensors'
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, '-m', 'segchange_jax.convert_torch', '--reverse',
                         '--checkpoint', ckpt, '--out', str(out)], cwd=repo, capture_output=True,
                        text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  sd = load_file(str(out))
  # Training moved the running statistics away from their initial 0 / 1.
  bn = 'feature_diff.diff_conv.0.1'
  assert float(sd[f'{bn}.running_mean'].abs().max()) > 1e-3
  assert float((sd[f'{bn}.running_var'] - 1).abs().max()) > 1e-3
  tmodel = ref.build_change_model(config)
  tmodel.load_state_dict(sd, strict=True)
  tmodel.eval()
  det = ChangeDetector.from_checkpoint(ckpt)
  rs = np.random.RandomState(0)
  a, b = (rs.randn(2, 64, 64, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(2, 8, config.text.dim).astype(np.float32)
  got = det.predict_logits(a, b, text)
  with torch.no_grad():
    want = util.nhwc(tmodel(util.nchw(a), util.nchw(b), torch.from_numpy(text)))
  err = util.rel_err(got, want)
  print(f'trained checkpoint, ours vs torch reference after --reverse: {err:.2e} of max|logit|')
  assert err <= 1e-4
