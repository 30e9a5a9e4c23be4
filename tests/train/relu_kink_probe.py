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

Finding (issue 19 report): the excess is ReLU decisions after `diff_bn` at pre-activations below
float32 forward resolution, not a rewrite, dtype or compiler flag. On the float64 inputs (rounded)
one element at scale 3 has pre-activation -9.2e-7 (values up to 5.8; the float32 forward error of
either implementation there is ~7e-6): our compiled forward puts it at +3.7e-9, torch's at
-2.0e-7, and the flipped element's float64 gradient (5.796e-5) is exactly our whole
`diff_bn/bias` error (4.2e-2 relative). With the inputs moved by +-8 ulps torch flips it too (5 of
16 runs, ours 6); with the inputs a float32 forward pass really computes (torch's or ours, BEV
outputs 1e-6 from float64) both implementations flip the same elements, and torch's own full-size
float32 step (`torch-only`) is 4.2e-2 from float64 on that tensor.

  python -m tests.train.relu_kink_probe capture --out /tmp/kink.pkl
  python -m tests.train.relu_kink_probe capture32 --cap /tmp/kink.pkl
  python -m tests.train.relu_kink_probe probe --cap /tmp/kink.pkl --inputs torch32
  python -m tests.train.relu_kink_probe probe --cap /tmp/kink.pkl --scales 3 --perturb 6 --ulps 8
  python -m tests.train.relu_kink_probe torch-only
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
from tests.train.test_step_parity import _rel
from tests.train.test_step_parity import _step_config

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


def capture32(cap_path: str, size: int = 256, batch: int = 2, seed: int = 0) -> None:
  """Adds the DiffBlock inputs as a float32 model computes them: torch f32 and ours (jit)."""
  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import torch_rules as tc  # pylint: disable=g-import-not-at-top
  with open(cap_path, 'rb') as f:
    cap = pickle.load(f)
  config = _step_config(upstream_config(VARIANT), batch)
  torch.manual_seed(seed)
  tmodel = ref.randomize_(ref.build_change_model(config), seed).train()
  rs = np.random.RandomState(seed + 1)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  with torch.no_grad():
    fa, fb = tmodel.dual_encoder(util.nchw(a), util.nchw(b))
  cap['fa_torch32'], cap['fb_torch32'] = [x.numpy() for x in fa], [x.numpy() for x in fb]
  rules, aliases, ignore = segchange.torch_mapping(config)
  model = segchange.build_model(config)
  variables = tc.convert(util.state_dict_numpy(tmodel), rules,
                         expected=segchange.variable_shapes(model, size), aliases=aliases,
                         ignore=(r'.*num_batches_tracked$', *ignore), source='torch_ref')
  del tmodel
  text = np.zeros((batch, 8, config.text.dim), np.float32)

  @jax.jit
  def bev_outputs(v, a, b):
    _, st = model.apply(v, a, b, text, train=False, capture_intermediates=(
        lambda mdl, name: name == '__call__' and mdl.name is not None and
        mdl.name.startswith('bev_')), mutable=['intermediates'])
    return [st['intermediates'][f'bev_{i}']['__call__'][0] for i in range(4)]

  outs = jax.device_get(bev_outputs(variables, a, b))
  nchw = lambda x: np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))
  cap['fa_ours32'] = [nchw(o[:batch]) for o in outs]
  cap['fb_ours32'] = [nchw(o[batch:]) for o in outs]
  for k in range(4):
    print(f'scale {k}: BEV output rel err vs f64: torch f32 '
          f'{_rel(cap["fa_torch32"][k], cap["fa"][k]):.1e}, '
          f'ours {_rel(cap["fa_ours32"][k], cap["fa"][k]):.1e}')
  with open(cap_path, 'wb') as f:
    pickle.dump(cap, f)


def torch_only(size: int = 256, batch: int = 2, seed: int = 0, top: int = 12) -> None:
  """torch's own full-size float32 step against float64 (backbone frozen: its gradients are not
  needed for the rest and would double the memory; the other gradients are unchanged)."""
  from tests.train.test_step_parity import _torch_step  # pylint: disable=g-import-not-at-top
  config = _step_config(upstream_config(VARIANT), batch)
  torch.manual_seed(seed)
  tmodel = ref.randomize_(ref.build_change_model(config), seed)
  rs = np.random.RandomState(seed + 1)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(batch, 8, config.text.dim).astype(np.float32)
  label = (rs.rand(batch, size, size) < 0.3).astype(np.int32)
  frozen = {k for k in tmodel.state_dict() if k.startswith('dual_encoder.encoder')}
  _, g32, _ = _torch_step(tmodel, config, frozen, a, b, text, label, torch.float32)
  _, g64, _ = _torch_step(tmodel, config, frozen, a, b, text, label, torch.float64)
  err = {k: _rel(g32[k], g64[k]) for k in g64
         if k not in frozen and not k.endswith(('running_mean', 'running_var'))}
  err = {k: v for k, v in err.items() if v < 1}  # as the parity test: exactly-zero gradients aside
  print(f'torch f32 vs f64, full size {size}px, non-backbone tensors: max {max(err.values()):.2e}, '
        f'median {np.median(list(err.values())):.2e}')
  for k in sorted(err, key=lambda k: -err[k])[:top]:
    print(f'  {k}: {err[k]:.2e}')


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
  g = {'diff_conv/kernel': convk[0].weight.grad[:, :, 0, 0].T,
       'diff_bn/scale': convk[1].weight.grad, 'diff_bn/bias': convk[1].bias.grad,
       'attention/spatial_conv/kernel': att.spatial_attention[0].weight.grad.permute(2, 3, 1, 0),
       'attention/spatial_bn/bias': att.spatial_attention[1].bias.grad}
  g = {n: v.detach().double().numpy() for n, v in g.items()}
  g['input_a'], g['input_b'] = nhwc(a.grad), nhwc(b.grad)
  return nhwc(y), nhwc(r.grad), g


def probe(cap_path: str, scales, perturb: int, ulps: float, inputs: str = 'f64') -> None:
  with open(cap_path, 'rb') as f:
    cap = pickle.load(f)
  src = {'f64': ('fa', 'fb'), 'torch32': ('fa_torch32', 'fb_torch32'),
         'ours32': ('fa_ours32', 'fb_ours32')}[inputs]
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
    # float64 reference on the float64 inputs; both float32 blocks get `inputs`.
    fa64, fb64, ct64 = cap['fa'][k], cap['fb'][k], cap['ct'][k]
    y64, gr64, g64 = _torch_block(fd, k, torch.float64, fa64, fb64, ct64)
    fa64, fb64 = cap[src[0]][k], cap[src[1]][k]
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
      print(f'scale {k} {f"{inputs} inputs" if i == 0 else f"perturbation {i} (+-{ulps:g} ulp)"}: '
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
  sub.add_parser('torch-only', help="torch's own float32 vs float64 full-size step (~13 GB)")
  c32 = sub.add_parser('capture32', help='add float32-computed DiffBlock inputs to a capture')
  c32.add_argument('--cap', required=True)
  q = sub.add_parser('probe')
  q.add_argument('--cap', required=True, help='file written by `capture`')
  q.add_argument('--scales', type=int, nargs='+', default=[0, 1, 2, 3])
  q.add_argument('--perturb', type=int, default=0, help='extra runs with perturbed inputs')
  q.add_argument('--ulps', type=float, default=1.0, help='perturbation size in float32 ulps')
  q.add_argument('--inputs', default='f64', choices=('f64', 'torch32', 'ours32'),
                 help='DiffBlock inputs of the float32 runs: the float64 BEV outputs rounded, or '
                      'as computed by a float32 torch / our (capture32) forward pass')
  args = p.parse_args()
  if args.cmd == 'capture':
    capture(args.out, args.size)
  elif args.cmd == 'torch-only':
    torch_only()
  elif args.cmd == 'capture32':
    capture32(args.cap)
  else:
    probe(args.cap, args.scales, args.perturb, args.ulps, args.inputs)


if __name__ == '__main__':
  main()
