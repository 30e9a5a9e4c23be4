"""Every command-line entry module starts and prints its usage with --help."""

import os
import subprocess
import sys

import pytest

# absl programs exit with status 1 after --help (absl's convention); argparse ones with 0.
ENTRY_POINTS = [
    ('segchange_jax.train', '--workdir'),
    ('segchange_jax.convert_torch', '--checkpoint'),
    ('segchange_jax.embed_prompts', '--text_model'),
    ('segchange_jax.infer', '--window'),
    ('segchange_jax.evaluate', '--num_images'),
    ('segchange_jax.export', '--platforms'),
    ('data_prep.convert', '--layout'),
    ('data_prep.synthetic', '--size'),
]


@pytest.mark.parametrize('module, flag', ENTRY_POINTS)
def test_help(repo_root, module, flag):
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', module, '--help'], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode in (0, 1), out.stderr[-2000:]
  assert flag in out.stdout, out.stdout[-2000:]
  assert 'Traceback' not in out.stderr
