"""torch_pickle reads files written by torch.save, without importing torch itself."""

import collections

import numpy as np
import pytest
import torch

from segchange_jax.interop import torch_pickle
from segchange_jax.models import torch_rules as tc


def _state_dict():
  m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                          torch.nn.Linear(5, 6).to(torch.float64))
  sd = m.state_dict()
  sd['extra.half'] = torch.randn(3, 2).half()
  sd['extra.bf16'] = torch.randn(4).bfloat16()
  sd['extra.noncontig'] = torch.randn(4, 6)[:, ::2].t()  # strided view of a larger storage
  sd['extra.offset'] = torch.arange(10)[3:7]
  sd['extra.bool'] = torch.tensor([True, False])
  return sd


def _check(loaded, sd):
  assert list(loaded.keys()) == list(sd.keys())
  for k, v in sd.items():
    want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    got = loaded[k].astype(np.float32) if v.dtype == torch.bfloat16 else loaded[k]
    assert got.shape == want.shape, k
    assert got.dtype == want.dtype, (k, got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.mark.parametrize('zipfmt', [True, False])
def test_bare_state_dict(tmp_path, zipfmt):
  sd = _state_dict()
  path = tmp_path / 'sd.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=zipfmt)
  loaded = torch_pickle.load(path)
  assert isinstance(loaded, collections.OrderedDict)
  _check(loaded, sd)


def test_training_checkpoint_with_module_prefix(tmp_path):
  sd = _state_dict()
  model = torch.nn.Linear(5, 6)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  model(torch.randn(2, 5)).sum().backward()
  opt.step()
  sched = torch.optim.lr_scheduler.StepLR(opt, 20)
  wrapped = collections.OrderedDict((f'module.{k}', v) for k, v in sd.items())
  path = tmp_path / 'best_iou.pth'
  torch.save({'model': wrapped, 'optimizer': opt.state_dict(), 'lr_scheduler': sched.state_dict(),
              'epoch': 7, 'args': torch.device('cpu'), 'best': np.float64(0.5)}, path)
  ckpt = torch_pickle.load(path)
  assert ckpt['epoch'] == 7
  assert float(ckpt['best']) == 0.5
  state = ckpt['optimizer']['state'][0]
  np.testing.assert_array_equal(state['exp_avg'], opt.state_dict()['state'][0]['exp_avg'].numpy())
  _check(tc.strip_prefixes(ckpt), sd)


def test_missing_file_and_garbage(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    torch_pickle.load(tmp_path / 'nope.pth')
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(Exception):
    torch_pickle.load(bad)


def test_never_executes_pickled_code(tmp_path):
  import pickle
  target = str(tmp_path / 'pwned')
  class Evil:
    def __reduce__(self):
      return (exec, (f'open({target!r}, "w").write("x")',))
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    pickle.dump({'a': Evil()}, f)  # not a torch file: rejected without running its code
  with pytest.raises(ValueError, match='neither'):
    torch_pickle.load(path)
  assert not (tmp_path / 'pwned').exists()
  torch.save({'a': Evil()}, tmp_path / 'evil2.pth')
  out = torch_pickle.load(tmp_path / 'evil2.pth')
  assert isinstance(out['a'], torch_pickle.Opaque)
  assert not (tmp_path / 'pwned').exists()
