"""Every command-line entry module prints its usage with --help and exits 0."""

import os
import subprocess
import sys

import pytest

# (module, a flag of its own, takes --config)
ENTRY_POINTS = [
    ('segchange_jax.train', '--workdir', True),
    ('segchange_jax.convert_torch', '--checkpoint', True),
    ('segchange_jax.embed_prompts', '--text_model', False),
    ('segchange_jax.infer', '--window', True),
    ('segchange_jax.evaluate', '--num_images', True),
    ('segchange_jax.export', '--platforms', True),
    ('segchange_jax.report', '--split', False),
    ('data_prep.convert', '--layout', False),
    ('data_prep.synthetic', '--size', False),
    ('segchange_jax.app', '--port', True),
]


@pytest.mark.parametrize('module, flag, has_config', ENTRY_POINTS)
def test_help(repo_root, module, flag, has_config):
  env = {**os.environ, 'PYTHONPATH': str(repo_root), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', module, '--help'], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert flag in out.stdout, out.stdout[-2000:]
  assert ('--config:' in out.stdout) == has_config, out.stdout[-3000:]
  assert 'Traceback' not in out.stderr
