"""Issue 19: where does the full-size Swin-B float32 gradient excess come from? (a dev tool)

The full-size v1 train step showed float32 gradients of one stride path (`conv_list_k`, `bev_k`,
`feature_diff/scale_k`) much further from float64 than torch's own float32 gradients. This
probe isolates one feature-difference block (`DiffBlock`, the first module of that path whose
gradient is off) on the full model's real activations:

  capture   torch float64 run of the full-size v1 model (randomised weights, the parity test's
            batch): saves the BEV outputs of both times (the DiffBlock inputs), the cotangent of
            the loss at each `feature_diff` output, and the `feature_diff` weights (~11 GB RSS,
            a few minutes on 2 cores).
  probe     per scale: our float32 DiffBlock gradient (jit(vjp), as in training) and torch
            float32's, both against torch float64 on the same inputs and cotangent; the ReLU
            decisions after `diff_bn` that differ from float64; and the same again with the
            inputs perturbed by +-N float32 ulps (`--ulps`), i.e. within the float32 rounding
            the inputs already carry in a real float32 forward pass.

Finding (see the issue 19 report): the excess is ONE ReLU decision after `diff_bn` at a
pre-activation of -9.2e-7 (values up to 5.8, float32 forward error of either implementation
~7e-6 there): our compiled forward puts it at +3.7e-9, torch's at -2.0e-7; the flipped
element's float64 gradient (5.796e-5) is exactly the whole bias-gradient error. With the inputs
perturbed by an ulp the flip is gone and our errors equal torch's.

  python -m tests.train.relu_kink_probe capture --out /tmp/kink.pkl
  python -m tests.train.relu_kink_probe probe --cap /tmp/kink.pkl --scales 2 3 --perturb 10
"""

from __future__ import annotations

import argparse
import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import torch

from segchange_jax.models import diff as diff_lib
from tests.models.test_segchange import upstream_config
from tests.torch_ref import losses as ref_losses
from tests.torch_ref import segchange as ref
from tests.torch_ref import util
from tests.train.test_step_parity import _rel, _step_config

VARIANT = 'swin_base_patch4_window7_224'


def capture(out: str, size: int = 256, batch: int = 2, seed: int = 0) -> None:
  """Same weights and batch as `test_step_parity.step_parity` (full config), float64."""
  config = _step_config(upstream_config(VARIANT), batch)
  torch.manual_seed(seed)
  tmodel = ref.randomize_(ref.build_change_model(config), seed)
  rs = np.random.RandomState(seed + 1)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(batch, 8, config.text.dim).astype(np.float32)
  label = (rs.rand(batch, size, size) < 0.3).astype(np.int32)
  fd_sd = {k: v.detach().numpy().copy() for k, v in tmodel.feature_diff.state_dict().items()}
  mod = tmodel.double().train()
  with torch.no_grad():
    fa, fb = mod.dual_encoder(util.nchw(a).double(), util.nchw(b).double())
  d = mod.feature_diff(fa, fb)
  for t in d:
    t.retain_grad()
  logits = mod.mask_head(mod.fpn(d), torch.from_numpy(text).double())
  parts = ref_losses.torch_binary(logits[:, 0], torch.from_numpy(label), config.loss.alpha,
                                  config.loss.gamma, config.loss.bcl_margin)
  ref_losses.torch_total(parts, config.loss).backward()
  with open(out, 'wb') as f:
    pickle.dump({'fa': [x.numpy() for x in fa], 'fb': [x.numpy() for x in fb],
                 'ct': [t.grad.numpy() for t in d], 'fd_sd': fd_sd}, f)
  print(f'saved {out}: DiffBlock inputs {[tuple(x.shape) for x in fa]}')


def _jax_variables(sd: dict, k: int):
  """Our DiffBlock variables from upstream `feature_diff` weights of scale k."""
  t = lambda n: np.asarray(sd[n], np.float32)
  c, a = f'diff_conv.{k}', f'attention.{k}'
  conv1x1 = lambda n: t(n)[:, :, 0, 0].T
  params = {
      'diff_conv': {'kernel': conv1x1(f'{c}.0.weight'), 'bias': t(f'{c}.0.bias')},
      'diff_bn': {'scale': t(f'{c}.1.weight'), 'bias': t(f'{c}.1.bias')},
      'attention': {
          'channel_fc1': {'kernel': conv1x1(f'{a}.channel_attention.1.weight')},
          'channel_fc2': {'kernel': conv1x1(f'{a}.channel_attention.3.weight')},
          'spatial_conv': {'kernel': t(f'{a}.spatial_attention.0.weight').transpose(2, 3, 1, 0),
                           'bias': t(f'{a}.spatial_attention.0.bias')},
          'spatial_bn': {'scale': t(f'{a}.spatial_attention.1.weight'),
                         'bias': t(f'{a}.spatial_attention.1.bias')},
          'spatial_fc': {'kernel': conv1x1(f'{a}.spatial_attention.3.weight'),
                         'bias': t(f'{a}.spatial_attention.3.bias')}}}
  stats = {'diff_bn': {'mean': t(f'{c}.1.running_mean'), 'var': t(f'{c}.1.running_var')},
           'attention': {'spatial_bn': {'mean': t(f'{a}.spatial_attention.1.running_mean'),
                                        'var': t(f'{a}.spatial_attention.1.running_var')}}}
  return params, stats


def _torch_block(fd, k, dtype, a, b, ct):
  """(pre-ReLU diff_bn output NHWC, its gradient at the ReLU output, named grads)."""
  convk = copy.deepcopy(fd.diff_conv[k]).to(dtype).train()
  att = copy.deepcopy(fd.attention[k]).to(dtype).train()
  a = torch.from_numpy(a).to(dtype).requires_grad_(True)
  b = torch.from_numpy(b).to(dtype).requires_grad_(True)
  y = convk[1](convk[0](torch.cat([a, b, (a - b).abs(), a * b], dim=1)))
  r = torch.relu(y)
  r.retain_grad()
  att(r).backward(torch.from_numpy(ct).to(dtype))
  nhwc = lambda x: x.detach().double().numpy().transpose(0, 2, 3, 1)
  g = {'diff_conv/kernel': convk[0].weight.grad[:, :, 0, 0].T, 'diff_bn/scale': convk[1].weight.grad,
       'diff_bn/bias': convk[1].bias.grad,
       'attention/spatial_conv/kernel': att.spatial_attention[0].weight.grad.permute(2, 3, 1, 0),
       'attention/spatial_bn/bias': att.spatial_attention[1].bias.grad}
  g = {n: v.detach().double().numpy() for n, v in g.items()}
  g['input_a'], g['input_b'] = nhwc(a.grad), nhwc(b.grad)
  return nhwc(y), nhwc(r.grad), g


def probe(cap_path: str, scales, perturb: int, ulps: float) -> None:
  with open(cap_path, 'rb') as f:
    cap = pickle.load(f)
  fd = ref.FeatureDiff((cap['fa'][0].shape[1],) * len(cap['fa']), 'CBAM')
  fd.load_state_dict({k: torch.from_numpy(v) for k, v in cap['fd_sd'].items()})
  block = diff_lib.DiffBlock('CBAM', jnp.float32)
  to_nhwc = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))

  @jax.jit
  def ours(params, stats, a, b, ct):
    """Our training-mode vjp, and the pre-ReLU diff_bn output it used."""
    def f(p, a, b):
      out, st = block.apply({'params': p, 'batch_stats': stats}, a, b, True,
                            mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
      return out, st['intermediates']['diff_bn']['__call__'][0]
    (_, y), fn = jax.vjp(f, params, a, b)
    gp, ga, gb = fn((ct, jnp.zeros_like(y)))
    return gp, ga, gb, y

  for k in scales:
    fa64, fb64, ct64 = cap['fa'][k], cap['fb'][k], cap['ct'][k]
    y64, gr64, g64 = _torch_block(fd, k, torch.float64, fa64, fb64, ct64)
    params, stats = _jax_variables(cap['fd_sd'], k)
    rows = []
    for i in range(perturb + 1):
      rs = np.random.RandomState(i)
      # i = 0: the inputs rounded to float32; i > 0: and moved by -N, 0 or +N ulps each.
      pert = lambda x: (x.astype(np.float32) if i == 0 else (x.astype(np.float32) * (
          1 + np.float32(ulps * 2.0 ** -23) * rs.randint(-1, 2, x.shape).astype(np.float32)))
                        ).astype(np.float32)
      a32, b32 = pert(fa64), pert(fb64)
      y32, _, g32 = _torch_block(fd, k, torch.float32, a32, b32, ct64)
      gp, ga, gb, yo = jax.device_get(ours(params, stats, to_nhwc(a32), to_nhwc(b32),
                                           to_nhwc(ct64)))
      yo = np.asarray(yo, np.float64)
      go = {'diff_conv/kernel': gp['diff_conv']['kernel'], 'diff_bn/scale': gp['diff_bn']['scale'],
            'diff_bn/bias': gp['diff_bn']['bias'],
            'attention/spatial_conv/kernel': gp['attention']['spatial_conv']['kernel'],
            'attention/spatial_bn/bias': gp['attention']['spatial_bn']['bias'],
            'input_a': ga, 'input_b': gb}
      err_o = {n: _rel(go[n], g64[n]) for n in g64}
      err_t = {n: _rel(g32[n], g64[n]) for n in g64}
      flips_o = np.argwhere((yo > 0) != (y64 > 0))
      flips_t = np.argwhere((y32 > 0) != (y64 > 0))
      rows.append((max(err_o.values()), max(err_t.values()), len(flips_o), len(flips_t)))
      print(f'scale {k} {"float32 inputs" if i == 0 else f"perturbation {i} (+-{ulps:g} ulp)"}: '
            f'max rel grad err vs f64 ours {rows[-1][0]:.1e} torch f32 {rows[-1][1]:.1e} '
            f'(diff_bn/bias {err_o["diff_bn/bias"]:.1e} / {err_t["diff_bn/bias"]:.1e}); '
            f'ReLU decisions unlike f64: ours {len(flips_o)}, torch f32 {len(flips_t)}; '
            f'forward err of pre-ReLU (max abs) ours {np.abs(yo - y64).max():.1e} torch f32 '
            f'{np.abs(y32 - y64).max():.1e} (max |y| {np.abs(y64).max():.2g})', flush=True)
      for who, flips in (('ours', flips_o), ('torch f32', flips_t)):
        for idx in flips:
          j = tuple(idx)
          print(f'    {who} flips at {j}: pre-ReLU f64 {y64[j]:.3e} ours {yo[j]:.3e} torch f32 '
                f'{y32[j]:.3e}; f64 gradient at the ReLU output there {gr64[j]:.4e}; '
                f'bias-grad error in channel {j[-1]}: ours '
                f'{float(go["diff_bn/bias"][j[-1]]) - g64["diff_bn/bias"][j[-1]]:.4e}')
    r = np.array(rows, np.float64)
    print(f'scale {k} over {len(rows)} runs: median max-err ours {np.median(r[:, 0]):.1e} torch '
          f'f32 {np.median(r[:, 1]):.1e}; worst ours {r[:, 0].max():.1e} torch f32 '
          f'{r[:, 1].max():.1e}; runs with a ReLU flip ours {int((r[:, 2] > 0).sum())} torch f32 '
          f'{int((r[:, 3] > 0).sum())}', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='cmd', required=True)
  c = sub.add_parser('capture')
  c.add_argument('--out', required=True)
  c.add_argument('--size', type=int, default=256)
  q = sub.add_parser('probe')
  q.add_argument('--cap', required=True, help='file written by `capture`')
  q.add_argument('--scales', type=int, nargs='+', default=[0, 1, 2, 3])
  q.add_argument('--perturb', type=int, default=0, help='extra runs with perturbed inputs')
  q.add_argument('--ulps', type=float, default=1.0, help='perturbation size in float32 ulps')
  args = p.parse_args()
  if args.cmd == 'capture':
    capture(args.out, args.size)
  else:
    probe(args.cap, args.scales, args.perturb, args.ulps)


if __name__ == '__main__':
  main()
