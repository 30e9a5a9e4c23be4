"""One training step against the torch reference: loss, BatchNorm statistics, gradients, AdamW.

Same weights (random, converted from the torch reference), same batch, dropout and drop-path
off. The torch step is computed in float32 and float64; float64 is the truth against which our
float32 gradients are judged, with torch's own float32 error as the yardstick:
  loss                      <= 1e-6 relative to torch float32
  every BN running stat     <= 1e-5 relative (max abs diff / max abs value, per tensor) to
                            torch float32; where torch float32 itself is further than 1e-5
                            from float64 (full size, measured: Swin-B `fpn/ega/gaussian_bn/var`
                            3.2e-5, ResNet-50 `feature_diff/scale_3/diff_bn/mean` 3.8e-5, the
                            forward pass's float32 error reaching the batch statistics), ours
                            must be no further from float64 than torch float32 is
  gradient of each tensor   error vs float64 <= max(1e-4, 4 x torch float32's error vs float64)
                            (relative, max abs diff / max abs value; for tensors whose exact
                            gradient is 0, where both float32 gradients are pure rounding noise,
                            the same rule on absolute values)
  parameters after AdamW    equal to torch float32's (1e-3 lr + 2 float32 ulps) on elements whose
                            |gradient| is above 1e3 x Adam's eps and 10x above both float32
                            errors there: the first Adam step g / (|g| + eps) is sign(g), so a
                            gradient that float32 cannot resolve moves by +-lr either way

Torch float32's error is measured on the test's batch and, with `ref_runs` > 0, also on that
batch moved by +-8 float32 ulps (`ref_runs` independent draws; float64 stays the truth of the
unmoved batch): the yardstick is the largest of these errors, per tensor. Why: at full size a
ReLU after a BatchNorm can receive a pre-activation (-9.2e-7 in the Swin-B model, values up to
5.8) far below the float32 forward error there (~7e-6 in both frameworks); which side of zero
float32 lands on is chance, and one flipped element moves its BatchNorm bias gradient by 4e-2.
Torch flips it too under 8-ulp input changes, ours on the unmoved batch
(tests/train/relu_kink_probe.py). A single torch run is therefore not the reference's float32
error, the envelope over inputs float32 cannot tell apart is.

`python -m tests.train.test_step_parity` prints the figures of every variant (tiny configs;
`--full` for the full-size variants, `--ref_runs N` for the envelope).
"""

from __future__ import annotations

import argparse
import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from segchange_jax.models import segchange
from segchange_jax.models import torch_rules as tc
from segchange_jax.train import optim
from segchange_jax.train import param_groups
from segchange_jax.train import train_step
from tests.models.test_segchange import small_config
from tests.models.test_segchange import upstream_config
from tests.torch_ref import losses as ref_losses
from tests.torch_ref import segchange as ref
from tests.torch_ref import util

VARIANTS = ('swin_base_patch4_window7_224', 'resnet50', 'hgnetv2')
SHORT = {'swin_base_patch4_window7_224': 'v1 Swin-B', 'resnet50': 'v2 ResNet-50',
         'hgnetv2': 'v3 HGNetv2'}
# |g| above this x eps takes a sign-exact first Adam step: g / (|g| + eps) = sign(g) to 1e-3.
ADAM_EPS_SCALE = 1e3
# Tensors whose exact gradient is 0: ours must be within 4x torch's noise, or float32 noise this
# far below the largest gradient of the model (measured: 2e-9 to 4e-8 of it, torch's alike).
ZERO_GRAD_NOISE = 1e-6
# Input moves (in float32 ulps) of the reference's extra float32 runs (`ref_runs`).
REF_ULPS = 8
# The full-size tests' extra reference runs: enough that an element on a float32 knife edge
# flips in one of them (torch flipped the Swin-B one in 5 of 16 draws).
FULL_SIZE_REF_RUNS = 8


def tiny_config(variant: str):
  """small_config (narrow neck/head, tiny Swin) with a one-block-per-stage ResNet."""
  c = small_config(variant)
  c.model.resnet.depths = (1, 1, 1, 1)
  return c


def _step_config(config, batch):
  c = copy.deepcopy(config)
  c.model.dropout = 0.0
  c.model.swin.drop_path_rate = 0.0
  c.train.batch_size = batch
  c.train.grad_clip_norm = 0.0
  c.mesh.data, c.mesh.fsdp = -1, 1
  return c


def _torch_step(tmodel, config, frozen_keys, a, b, text, label, dtype):
  """Forward (train mode), the four losses, backward; (loss, grads sd, stats sd) in numpy."""
  model = copy.deepcopy(tmodel).to(dtype).train()
  for k, p in model.state_dict(keep_vars=True).items():
    if k in frozen_keys:
      p.requires_grad_(False)
  x = lambda v: util.nchw(v).to(dtype)
  logits = model(x(a), x(b), torch.from_numpy(text).to(dtype))
  parts = ref_losses.torch_binary(logits[:, 0], torch.from_numpy(label), config.loss.alpha,
                                  config.loss.gamma, config.loss.bcl_margin)
  loss = ref_losses.torch_total(parts, config.loss)
  loss.backward()
  sd = model.state_dict(keep_vars=True)
  grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach().double().numpy()
           for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  return float(loss.detach()), grads, model


def _adamw_step(model, config):
  """torch.optim.AdamW with upstream's two groups ('backbone' in the name: lr_backbone)."""
  t = config.train
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  opt = torch.optim.AdamW(
      [{'params': [p for n, p in named if 'backbone' not in n], 'lr': t.lr},
       {'params': [p for n, p in named if 'backbone' in n], 'lr': t.lr_backbone}],
      betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
  opt.step()
  return model


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _ulp_moved(x: np.ndarray, ulps: int, rs: np.random.RandomState) -> np.ndarray:
  """x with every element moved by +-`ulps` float32 ulps (random signs)."""
  step = np.spacing(np.abs(x).astype(np.float32)) * rs.choice([-ulps, ulps], size=x.shape)
  return (x.astype(np.float64) + step).astype(np.float32)


def step_parity(config, size: int, batch: int = 2, seed: int = 0, ref_runs: int = 0) -> dict:
  """Runs both steps; per-tensor errors and summary figures.

  `ref_runs`: extra torch float32 steps on the batch moved by +-REF_ULPS ulps; torch's float32
  error per tensor is then the largest over all its runs (module docstring).
  """
  config = _step_config(config, batch)
  torch.manual_seed(seed)
  tmodel = ref.randomize_(ref.build_change_model(config), seed)
  rules, aliases, ignore = segchange.torch_mapping(config)
  model = segchange.build_model(config)
  expected = segchange.variable_shapes(model, size)
  conv = lambda sd: tc.convert(sd, rules, expected=expected, aliases=aliases,
                               ignore=(r'.*num_batches_tracked$', *ignore), source='torch_ref')
  variables = conv(util.state_dict_numpy(tmodel))
  frozen_mask = param_groups.frozen_mask_fn(config)
  frozen_paths = set()
  if frozen_mask is not None:
    flat_mask = tc.flatten({'params': frozen_mask(variables['params'])})
    frozen_paths = {p for p, v in flat_mask.items() if bool(v)}
  frozen_keys = {r.torch_key for r in rules if r.path in frozen_paths}

  rs = np.random.RandomState(seed + 1)
  a, b = (rs.randn(batch, size, size, 3).astype(np.float32) for _ in range(2))
  text = rs.randn(batch, 8, config.text.dim).astype(np.float32)
  label = (rs.rand(batch, size, size) < 0.3).astype(np.int32)

  loss32, g32, t32 = _torch_step(tmodel, config, frozen_keys, a, b, text, label, torch.float32)
  loss64, g64, t64 = _torch_step(tmodel, config, frozen_keys, a, b, text, label, torch.float64)
  stats_t = conv(util.state_dict_numpy(t32))['batch_stats']
  stats64 = tc.flatten(conv(util.state_dict_numpy(t64))['batch_stats'])
  after_t = conv(util.state_dict_numpy(_adamw_step(t32, config)))
  g32, g64 = conv(g32), conv(g64)
  # Per tensor: the largest relative / absolute error of torch float32 over the moved batches.
  envelope, flat64 = {}, tc.flatten(g64)
  stat_envelope = {p: _rel(v, stats64[p]) for p, v in tc.flatten(stats_t).items()}
  moved = np.random.RandomState(seed + 2)
  for _ in range(ref_runs):
    am, bm = _ulp_moved(a, REF_ULPS, moved), _ulp_moved(b, REF_ULPS, moved)
    _, gk, tk = _torch_step(tmodel, config, frozen_keys, am, bm, text, label, torch.float32)
    for p, v in tc.flatten(conv(util.state_dict_numpy(tk))['batch_stats']).items():
      stat_envelope[p] = max(stat_envelope[p], _rel(v, stats64[p]))
    for p, v in tc.flatten(conv(gk)).items():
      if p[0] == 'params':
        w = np.asarray(flat64[p], np.float64)
        r, e = _rel(v, w), float(np.max(np.abs(np.asarray(v, np.float64) - w)))
        old = envelope.get(p, (0.0, 0.0))
        envelope[p] = (max(old[0], r), max(old[1], e))

  # Ours: the train step's own gradient function and optimizer.
  # The train state create_train_state builds, holding the converted weights (no init compile).
  params = jax.tree.map(jnp.asarray, variables['params'])
  tx = optim.make_optimizer(config, params, 1, frozen_mask(params) if frozen_mask else None,
                            param_groups.lr_label_fn(config))
  state = train_step.TrainState(
      step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
      model_state={k: jax.tree.map(jnp.asarray, v) for k, v in variables.items() if k != 'params'},
      rng=jax.random.PRNGKey(seed), plateau=optim.init_plateau(), tx=tx)
  batch_d = {'image_a': a, 'image_b': b, 'label': label,
             'prompt_index': np.arange(batch, dtype=np.int32), 'mask': np.ones(batch, np.float32)}

  @jax.jit
  def ours(state, batch_d, table):
    grads, total, _, model_state, _ = train_step._grads(model, config, state, batch_d, table)  # pylint: disable=protected-access
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    return grads, total, model_state, optax.apply_updates(state.params, updates)

  grads, loss_o, model_state, after_o = jax.device_get(ours(state, batch_d, jnp.asarray(text)))

  flat = lambda t: tc.flatten(jax.tree.map(np.asarray, t))
  stats_o, stats_t = flat(model_state['batch_stats']), flat(stats_t)
  # Per statistic: ours vs torch float32, ours vs float64, torch float32's own (envelope) vs
  # float64.
  stat_err = {p: (_rel(stats_o[p], stats_t[p]), _rel(stats_o[p], stats64[p]), stat_envelope[p])
              for p in stats_t}
  params_only = lambda d: {p: v for p, v in d.items() if p[0] == 'params'}
  go, g32, g64 = flat({'params': grads}), params_only(flat(g32)), params_only(flat(g64))
  assert set(go) == set(g64), set(go) ^ set(g64)
  grad = {p: (_rel(go[p], g64[p]),
              max(_rel(g32[p], g64[p]), envelope.get(p, (0.0, 0.0))[0]),
              _rel(go[p], g32[p]),
              float(np.max(np.abs(go[p] - g64[p]))),
              max(float(np.max(np.abs(g32[p] - g64[p]))), envelope.get(p, (0.0, 0.0))[1]))
          for p in g64 if p not in frozen_paths}
  gmax = max(float(np.max(np.abs(g64[p]))) for p in grad)
  ao, at = flat({'params': after_o}), params_only(flat(after_t))
  after_err, compared = {}, [0, 0]
  for p in at:
    # Elements whose gradient sign both float32 computations know: |g| well above Adam's eps
    # and 10x above this tensor's float32 gradient noise (torch's or ours).
    noise = np.maximum(np.abs(g32[p] - g64[p]), np.abs(go[p] - g64[p]))
    m = np.abs(g64[p]) > np.maximum(ADAM_EPS_SCALE * config.train.eps, 10 * noise)
    compared[0] += int(m.sum())
    compared[1] += m.size
    if m.any():
      # Allowed: 1e-3 of the step plus 2 float32 ulps of the parameter.
      d = np.abs(ao[p] - at[p])[m]
      after_err[p] = (float(np.max(d)), float(np.max(
          d / (1e-3 * config.train.lr + 2 * np.finfo(np.float32).eps * np.abs(at[p][m])))))
  worst_grad = max((p for p in grad if grad[p][1] < 1),
                   key=lambda p: grad[p][0] / max(1e-4, 4 * grad[p][1]))
  return {'loss': (float(loss_o), loss32, loss64),
          'loss_rel': abs(float(loss_o) - loss32) / abs(loss32),
          'stat_err': stat_err, 'grad': grad, 'worst_grad': worst_grad, 'after_err': after_err,
          'gmax': gmax, 'lr': config.train.lr, 'compared': compared[0] / max(compared[1], 1),
          'ref_runs': ref_runs}


def report(name: str, r: dict) -> str:
  g = r['grad']
  w = r['worst_grad']
  defined = [v[0] for v in g.values() if v[1] < 1]  # tensors whose float32 gradient is not noise
  st = r['stat_err']
  worst_stat = max(st, key=lambda p: st[p][0]) if st else ()
  stat = st[worst_stat] if st else (0.0, 0.0, 0.0)
  runs = f' (torch f32: envelope of {1 + r["ref_runs"]} runs)' if r['ref_runs'] else ''
  return (f'{name}{runs}: loss rel err {r["loss_rel"]:.1e}; BN stats max rel err {stat[0]:.1e} '
          f'({"/".join(worst_stat)}; vs float64: ours {stat[1]:.1e}, torch f32 {stat[2]:.1e}); '
          f'grads vs float64: ours max {max(defined):.1e}, torch f32 max '
          f'{max(v[1] for v in g.values() if v[1] < 1):.1e} ({len(g) - len(defined)} tensors with '
          'an exactly-zero gradient: ours max '
          f'{max(v[3] for v in g.values() if v[1] >= 1) / r["gmax"]:.0e} of '
          f'max|grad|); worst tensor relative to its bound (ours / torch '
          f'f32, vs f64) {"/".join(w[1:])} {g[w][0]:.1e} / {g[w][1]:.1e}; params after AdamW max '
          f'abs diff {max(v[0] for v in r["after_err"].values()):.1e} (lr {r["lr"]:g}) on the '
          f'{100 * r["compared"]:.0f}% of elements with a float32-determined gradient')


def check(r: dict) -> None:
  assert r['loss_rel'] <= 1e-6, r['loss']
  # (vs torch f32, vs float64, torch f32 vs float64): where torch's own float32 statistic is
  # more than 1e-5 off the truth, the yardstick is that error (module docstring).
  bad_stats = {'/'.join(p): e for p, e in r['stat_err'].items()
               if e[0] > 1e-5 and e[1] > max(1e-5, e[2])}
  assert not bad_stats, bad_stats
  for p, (ours, ref32, _, ours_abs, ref_abs) in r['grad'].items():
    if ref32 >= 1:
      # The exact gradient is 0 or below float32 resolution (a bias feeding a BatchNorm or
      # GroupNorm, a key bias under softmax): both float32 gradients are rounding noise, for
      # which a relative error means nothing; the same 4x rule on absolute values, or noise far
      # below the model's largest gradient.
      assert ours_abs <= max(4 * ref_abs, ZERO_GRAD_NOISE * r['gmax']), (
          '/'.join(p), ours_abs, ref_abs, r['gmax'])
    else:
      assert ours <= max(1e-4, 4 * ref32), ('/'.join(p), ours, ref32)
  bad_after = {'/'.join(p): e for p, e in r['after_err'].items() if e[1] > 1}
  assert not bad_after, bad_after


# Default: the Swin variant (every batch-statistics BN kind: diff, CBAM, EGA). Each of these
# compiles a whole-model train step (~1.5-2.5 min on 2 CPU cores), hence the other two are slow.
@pytest.mark.parametrize('variant,size', [
    ('swin_base_patch4_window7_224', 64),
    pytest.param('resnet50', 128, marks=pytest.mark.slow),
    pytest.param('hgnetv2', 64, marks=pytest.mark.slow)])
def test_one_train_step_equals_torch(variant, size):
  r = step_parity(tiny_config(variant), size)
  print(report(f'{SHORT[variant]} tiny {size}px', r))
  check(r)


@pytest.mark.slow
@pytest.mark.parametrize('variant,size', [('swin_base_patch4_window7_224', 256),
                                          ('resnet50', 128), ('hgnetv2', 128)])
def test_one_train_step_equals_torch_full_size(variant, size):
  r = step_parity(upstream_config(variant), size, ref_runs=FULL_SIZE_REF_RUNS)
  print(report(f'{SHORT[variant]} full {size}px', r))
  check(r)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
  p.add_argument('--full', action='store_true', help='full-size variants (Swin-B: ~10 GB)')
  p.add_argument('--size', type=int, default=0,
                 help='image size (default as the tests: tiny 64, ResNet 128; full 256 Swin, 128)')
  p.add_argument('--top', type=int, default=0, help='also print the N worst gradient tensors')
  p.add_argument('--ref_runs', type=int, default=0,
                 help=f'extra torch float32 runs on the batch moved by +-{REF_ULPS} ulps')
  args = p.parse_args()
  for v in args.variants:
    size = args.size or ((256 if v.startswith('swin') else 128) if args.full else
                         {'resnet50': 128}.get(v, 64))
    r = step_parity((upstream_config if args.full else tiny_config)(v), size,
                    ref_runs=args.ref_runs)
    print(report(f'{SHORT[v]} {"full" if args.full else "tiny"} {size}px', r), flush=True)
    for path in sorted(r['grad'], key=lambda p: -r['grad'][p][0] / max(r['grad'][p][1], 1e-4))[
        :args.top]:
      o, t, _, oa, ta = r['grad'][path]
      print(f'  {"/".join(path[1:])}: ours {o:.2e} torch f32 {t:.2e} (ratio {o / t:.1f}); abs / '
            f'max|grad| of the model: {oa / r["gmax"]:.1e} / {ta / r["gmax"]:.1e}')
    for path in sorted(r['stat_err'], key=lambda p: -r['stat_err'][p][0])[:args.top]:
      e32, e64, t64 = r['stat_err'][path]
      print(f'  BN stat {"/".join(path[1:])}: vs torch f32 {e32:.2e}; vs float64: ours {e64:.2e} '
            f'torch f32 {t64:.2e}')
    for path in sorted(r['after_err'], key=lambda p: -r['after_err'][p][0])[:args.top]:
      print(f'  after step {"/".join(path[1:])}: {r["after_err"][path][0]:.2e}')


if __name__ == '__main__':
  main()
