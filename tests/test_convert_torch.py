"""convert_torch CLI (torch .pth -> Orbax dir -> safetensors) and the ChangeDetector API."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from segchange_jax import config_lib
from segchange_jax.interop import checkpoints
from tests.torch_ref import segchange as ref
from tests.torch_ref import util

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'segchange_jax.convert_torch', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  return proc


@pytest.fixture(scope='module')
def demo():
  config = config_lib.load_config(str(REPO / 'configs' / 'demo.py'))
  torch.manual_seed(0)
  tmodel = ref.randomize_(ref.build_change_model(config), 5).eval()
  return config, tmodel


@pytest.mark.slow
def test_cli_round_trip_and_api(tmp_path, demo):
  config, tmodel = demo
  sd = tmodel.state_dict()
  pth = tmp_path / 'best_iou.pth'
  opt = torch.optim.AdamW(tmodel.parameters())
  torch.save({'model': {f'module.{k}': v for k, v in sd.items()},
              'optimizer': opt.state_dict(), 'epoch': 3}, pth)
  out = tmp_path / 'converted'
  proc = _run('--checkpoint', str(pth), '--config', 'configs/demo.py', '--out', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / 'config.json').is_file() and (out / 'variables').is_dir()

  st = tmp_path / 'back.safetensors'
  proc = _run('--reverse', '--checkpoint', str(out), '--out', str(st))
  assert proc.returncode == 0, proc.stderr[-3000:]
  from safetensors.numpy import load_file
  back = load_file(str(st))
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], 0 if k.endswith('num_batches_tracked') else v.numpy(),
                                  err_msg=k)

  # The API: our dir and the .pth give identical logits, matching the torch reference.
  from segchange_jax import ChangeDetector
  rs = np.random.RandomState(0)
  a, b = (rs.randn(1, 64, 64, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(1, 8, config.text.dim).astype(np.float32)
  det = ChangeDetector.from_checkpoint(str(out))
  got = det.predict_logits(a, b, text)
  got_pth = ChangeDetector.from_checkpoint(str(pth), config=config).predict_logits(
      a[0], b[0], text[0])
  np.testing.assert_array_equal(got[0], got_pth)
  with torch.no_grad():
    want = util.nhwc(tmodel(util.nchw(a), util.nchw(b), torch.from_numpy(text)))
  err = util.rel_err(got, want)
  print(f'API vs torch reference (demo config, 64 px): {err:.2e}')
  assert err <= 1e-4
  with pytest.raises(ValueError, match='multiple of 32'):
    det.predict_logits(a[:, :48], b[:, :48], text)


def test_cli_wrong_variant_is_one_clear_error(tmp_path, demo):
  _, tmodel = demo
  pth = tmp_path / 'x.pth'
  torch.save(tmodel.state_dict(), pth)
  proc = _run('--checkpoint', str(pth), '--config', 'configs/demo.py', '--out',
              str(tmp_path / 'o'), '--config.model.diff_attention=SE')
  assert proc.returncode != 0
  assert 'feature_diff.attention.0.fc.0.weight' in proc.stderr
  assert 'feature_diff.attention.0.channel_attention.1.weight' in proc.stderr


def test_pth_needs_config(tmp_path, demo):
  _, tmodel = demo
  pth = tmp_path / 'x.pth'
  torch.save(tmodel.state_dict(), pth)
  with pytest.raises(ValueError, match='pass config='):
    checkpoints.load_variables(str(pth))


def test_package_import_is_lazy():
  code = ('import sys, segchange_jax, segchange_jax.interop.torch_pickle; '
          'assert "jax" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr
