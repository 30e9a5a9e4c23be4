"""Launch scripts validate their arguments and print their commands with --dry_run."""

import os
import subprocess

import pytest

from segchange_jax.train import distributed


def _run(args, repo_root, env=None):
  return subprocess.run(args, cwd=repo_root, capture_output=True, text=True,
                        env={**os.environ, **(env or {})})


def test_tpu_vm_dry_run_prints_every_step(repo_root):
  out = _run(['bash', 'launch/tpu_vm.sh', '--name', 'cd', '--zone', 'us-central2-b', '--type',
              'v4-32', '--config', 'configs/levir.py', '--workdir', 'gs://b/runs/levir',
              '--dry_run', '--', '--config.train.batch_size=64'], repo_root)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert any('tpu-vm create cd' in l and '--accelerator-type v4-32' in l for l in lines)
  assert any('--worker=all' in l and 'pip install' in l for l in lines)
  train = [l for l in lines if 'segchange_jax.train' in l]
  assert train and 'configs/levir.py' in train[0] and 'batch_size=64' in train[0]


def test_tpu_vm_stages_shards_and_installs_gcs_support(repo_root):
  out = _run(['bash', 'launch/tpu_vm.sh', '--name', 'cd', '--zone', 'z', '--type', 'v4-8',
              '--config', 'configs/levir.py', '--workdir', 'gs://b/runs/x', '--shards',
              'gs://b/shards/levir', '--dry_run'], repo_root)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert any('pip install' in l and '.[gcs]' in l for l in lines)
  assert any('gcloud storage rsync --recursive gs://b/shards/levir ~/segchange_shards' in l
             for l in lines)
  train = [l for l in lines if 'segchange_jax.train' in l]
  assert train and '--config.data.shards_dir=$HOME/segchange_shards' in train[0]
  local = _run(['bash', 'launch/tpu_vm.sh', '--name', 'cd', '--zone', 'z', '--type', 'v4-8',
                '--config', 'configs/levir.py', '--workdir', '/mnt/nfs/x', '--dry_run'], repo_root)
  assert local.returncode == 0 and '[gcs]' not in local.stdout and 'rsync' not in local.stdout


@pytest.mark.parametrize('args, message', [
    (['--name', 'n', '--zone', 'z', '--type', 'v4-8', '--config', 'configs/levir.py',
      '--workdir', 'w', '--shards', '/local/shards'], 'must be a gs:// folder'),
    (['--zone', 'z', '--type', 'v4-8', '--config', 'configs/levir.py', '--workdir', 'w'], '--name'),
    (['--name', 'n', '--zone', 'z', '--type', 'v4-8', '--config', 'configs/nope.py',
      '--workdir', 'w'], 'configs/nope.py not found'),
    (['--name', 'n', '--zone', 'z', '--type', 'a100', '--config', 'configs/levir.py',
      '--workdir', 'w'], 'does not look like a TPU type'),
    (['--name', 'n', '--zone', 'z', '--bogus'], 'unknown argument'),
])
def test_tpu_vm_rejects_bad_arguments(repo_root, args, message):
  out = _run(['bash', 'launch/tpu_vm.sh', *args, '--dry_run'], repo_root)
  assert out.returncode == 2 and message in out.stderr


def test_slurm_dry_run_and_validation(repo_root):
  out = _run(['bash', 'launch/slurm_gpu.sbatch', 'configs/levir.py', '/shared/runs/x',
              '--config.train.batch_size=8'], repo_root,
             {'DRY_RUN': '1', 'SLURM_GPUS_ON_NODE': '4'})
  assert out.returncode == 0, out.stderr
  assert 'srun --ntasks-per-node=4 --gpus-per-task=1' in out.stdout
  assert 'segchange_jax.train --config configs/levir.py --workdir /shared/runs/x' in out.stdout
  missing = _run(['bash', 'launch/slurm_gpu.sbatch'], repo_root, {'DRY_RUN': '1'})
  assert missing.returncode == 2 and 'usage' in missing.stderr
  outside = _run(['bash', 'launch/slurm_gpu.sbatch', 'configs/levir.py', '/x'], repo_root,
                 {'SLURM_JOB_ID': ''})
  assert outside.returncode == 2 and 'not inside a SLURM allocation' in outside.stderr


@pytest.mark.parametrize('kwargs, message', [
    (dict(coordinator_address='127.0.0.1:1234'), 'needs all three'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2), 'must be <'),
])
def test_distributed_argument_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize(**kwargs)


def test_distributed_single_process_is_a_no_op(monkeypatch):
  for var in ('SLURM_NTASKS', 'SLURM_STEP_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
              'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.maybe_initialize() is False
