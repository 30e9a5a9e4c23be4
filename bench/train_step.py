r"""Train-step time: our jitted step vs the PyTorch reference (same model, losses and AdamW).

  python bench/train_step.py                          # Swin-B, batch 2 at 256 and 512 px, CPU
  python bench/train_step.py --sizes 256 --iters 3 --devices 1 8 --device_batch 8 --device_size 128
  python bench/train_step.py --dtype bfloat16         # on a GPU: bf16 compute on both sides
  python bench/train_step.py --all --iters 2          # every README row (one compile per row: long)
  python bench/train_step.py --sizes 512 --impls ours --remat none dots block --compile_only
  python bench/train_step.py --sizes 256 --allocator tcmalloc   # both sides with tcmalloc
  python bench/train_step.py --sizes 512 --batch 1 --rounds 3    # ours, torch, ours, torch, ...

One optimizer step = forward of A and B through the siamese model, the four losses (train/losses.py)
(BCE + Dice + focal + BCL, config.loss weights), backward, gradient-norm clipping when
config.train.grad_clip_norm > 0, and AdamW with the backbone / head learning rates. Ours is
segchange_jax.train.train_step.make_train_step (jit, donated state, mesh shardings); the
reference is tests/torch_ref (timm / torchvision backbones) with torch.optim.AdamW and
tests/torch_ref/losses.py. Random weights and inputs: timing does not depend on them.

Every measurement runs in its own process (the simulated CPU device count must be set before
JAX starts, and peak memory is per process). Ours is timed after a compile + warm-up step;
torch after one warm-up step. Reported: min and median seconds per step, examples/s, and the
ratio torch / ours (> 1 means ours is faster). `--rounds N` alternates the two N times per row
(ours, torch, ours, torch...) and adds the median of the per-round ratios and the ratio of the
best times, which a slow spell of the machine during one side's run cannot skew.
`--devices 1 8` additionally times our step on 1 and on 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count), data- and fsdp-sharded, at --device_batch
(a multiple of 8): on a 2-core machine this measures sharding overhead, not a speed-up.

--allocator preloads the same host allocator into every child, ours and torch alike:
'system' (glibc malloc), 'tcmalloc' or 'jemalloc' with freed pages kept
(segchange_jax/allocator.py). On CPU both step working sets are several GB, allocated per
step: under glibc most of the step can be page faults, so compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import VARIANTS
from _common import image_size
from _common import positive_int
from _common import rss_mb
from _common import run_child
from _common import timed
from _common import variant_config
from _common import xla_cost

TEXT_TOKENS = 8


def _config(variant: str, dtype: str, mesh_data: int = -1, mesh_fsdp: int = 1):
  c = variant_config(variant)
  c.model.dtype = dtype
  c.mesh.data, c.mesh.fsdp = mesh_data, mesh_fsdp
  return c


def _summary(impl: str, device: str, batch: int, size: int, times: list[float], **extra) -> dict:
  s = sorted(times)
  return {'impl': impl, 'device': device, 'batch': batch, 'size': size, 's': s[0],
          's_median': s[len(s) // 2], 'examples_per_s': batch / s[0], **extra}


def add_step_args(p, size: int, remat: str | None) -> None:
  """--variant --size --batch --dtype --remat of one of our steps (profile_step, memory_peak)."""
  p.add_argument('--variant', default=VARIANTS[0], choices=VARIANTS)
  p.add_argument('--size', type=image_size, default=size)
  p.add_argument('--batch', type=positive_int, default=2)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--remat', default=remat, choices=['none', 'dots', 'block', None])


def build_ours(variant: str, batch: int, size: int, dtype: str, layout: str = 'data',
               remat: str | None = None, compile_step: bool = True):
  """Our train step for random weights/inputs: (compiled or jitted step, state, batch, table,
  compile seconds). Shared with bench/profile_step.py."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import param_groups  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import train_step  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  config = _config(variant, dtype, *((1, n) if layout == 'fsdp' else (n, 1)))
  if remat is not None:
    config.model.remat = remat
  model = segchange.build_model(config)
  mesh = sharding.create_mesh(config)
  shapes = {k: jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
            for k in ('image_a', 'image_b')}
  state, shardings = train_step.create_train_state(
      model, config, jax.random.PRNGKey(0), shapes, mesh, steps_per_epoch=100,
      label_fn=param_groups.lr_label_fn(config), frozen_mask_fn=param_groups.frozen_mask_fn(config))
  step_fn = train_step.make_train_step(model, config, mesh, shardings)
  rng = np.random.default_rng(0)
  batch_np = {'image_a': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              'image_b': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              'label': rng.integers(0, 2, (batch, size, size)).astype(np.int32),
              'prompt_index': np.zeros(batch, np.int32), 'mask': np.ones(batch, np.float32)}
  arrays = train_step.shard_batch(batch_np, mesh)
  table = jax.device_put(jnp.asarray(rng.normal(size=(1, TEXT_TOKENS, config.text.dim)),
                                     jnp.float32), sharding.replicated(mesh))
  start = time.perf_counter()
  compiled = step_fn.lower(state, arrays, table).compile() if compile_step else step_fn
  return compiled, state, arrays, table, time.perf_counter() - start


def run_ours(variant: str, batch: int, size: int, iters: int, dtype: str, layout: str,
             remat: str = 'none', compile_only: bool = False) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  base_rss = rss_mb()
  compiled, state, arrays, table, compile_s = build_ours(variant, batch, size, dtype, layout,
                                                         remat)
  holder = {'state': state}
  dev = jax.devices()[0]
  mem = compiled.memory_analysis()
  cost = xla_cost(compiled)
  xla = {'compile_s': compile_s, 'remat': remat,
         'xla_temp_mb': getattr(mem, 'temp_size_in_bytes', 0) / 2**20,
         'xla_arg_mb': getattr(mem, 'argument_size_in_bytes', 0) / 2**20,
         'gflop': cost.get('flops', 0) / 1e9}
  if compile_only:  # XLA's figures only: nothing runs, the working set is never allocated
    return _summary('ours', f'{dev.device_kind} x{n} ({layout})', batch, size, [float('nan')],
                    peak_mb=float('nan'), **xla)

  def one():
    holder['state'], out = compiled(holder['state'], arrays, table)
    jax.block_until_ready(out['loss'])
  one()  # warm-up
  times = timed(one, iters)
  stats = dev.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  # On CPU peak RSS also counts the XLA compiler's own memory; XLA's temp size is the step's
  # working set besides parameters, optimizer state and inputs.
  return _summary('ours', f'{dev.device_kind} x{n} ({layout})', batch, size, times,
                  peak_mb=peak / 2**20 if peak else rss_mb() - base_rss, **xla)


def run_torch(variant: str, batch: int, size: int, iters: int, dtype: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  from tests.torch_ref import losses as ref_losses  # pylint: disable=g-import-not-at-top
  from tests.torch_ref import segchange as ref  # pylint: disable=g-import-not-at-top
  config = _config(variant, dtype)
  t = config.train
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  base_rss = rss_mb()
  model = ref.build_change_model(config).train().to(device)
  backbone = [p for n, p in model.named_parameters() if 'backbone' in n]
  head = [p for n, p in model.named_parameters() if 'backbone' not in n]
  opt = torch.optim.AdamW([{'params': head, 'lr': t.lr},
                           {'params': backbone, 'lr': t.lr_backbone}],
                          betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
  a = torch.randn(batch, 3, size, size, device=device)
  b = torch.randn(batch, 3, size, size, device=device)
  label = torch.randint(0, 2, (batch, size, size), device=device)
  emb = torch.randn(batch, TEXT_TOKENS, config.text.dim, device=device)
  cast = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=cast, enabled=dtype == 'bfloat16'):
      logits = model(a, b, emb)
    parts = ref_losses.torch_binary(logits.float()[:, 0], label, config.loss.alpha,
                                    config.loss.gamma, config.loss.bcl_margin)
    loss = ref_losses.torch_total(parts, config.loss)
    loss.backward()
    if t.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
    opt.step()
    sync()
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  counter = flop_counter.FlopCounterMode(display=False)
  with counter:  # the warm-up step, counted: matmul / conv / attention FLOPs of fwd + bwd
    one()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = timed(one, iters)
  peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb() - base_rss
  return _summary('torch', torch.cuda.get_device_name() if cuda else 'cpu', batch, size, times,
                  peak_mb=peak, gflop=counter.get_total_flops() / 1e9)


def _print(r: dict) -> None:
  extra = (f", remat {r['remat']}, compile {r['compile_s']:.0f} s, XLA temp "
           f"{r['xla_temp_mb']:.0f} MB + arguments {r['xla_arg_mb']:.0f} MB, XLA cost analysis "
           f"{r['gflop']:.0f} GFLOP/step" if 'compile_s' in r
           else f", flop_counter {r['gflop']:.0f} GFLOP/step (matmul/conv/attention only)")
  print(f"{r['impl']:5s} {r['device']}: batch {r['batch']} at {r['size']} px: {r['s']:.2f} s/step "
        f"(median {r['s_median']:.2f}), {r['examples_per_s']:.2f} ex/s, peak {r['peak_mb']:.0f} "
        f"MB{extra}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variant', default='swin_base_patch4_window7_224',
                 choices=VARIANTS)
  p.add_argument('--sizes', type=image_size, nargs='+', default=[256, 512])
  p.add_argument('--batch', type=positive_int, default=2)
  p.add_argument('--iters', type=positive_int, default=3)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--impls', nargs='+', default=['ours', 'torch'], choices=['ours', 'torch'])
  p.add_argument('--devices', type=positive_int, nargs='*', default=[],
                 help='also time our step on these simulated CPU device counts (e.g. 1 8)')
  p.add_argument('--device_batch', type=positive_int, default=8)
  p.add_argument('--device_size', type=image_size, default=128)
  p.add_argument('--remat', nargs='+', default=['none'], choices=['none', 'dots', 'block'],
                 help='config.model.remat policies for our step (one row each)')
  p.add_argument('--compile_only', action='store_true',
                 help="ours: compile and print XLA's memory / FLOP analysis, run nothing")
  p.add_argument('--allocator', default='system', choices=['system', 'tcmalloc', 'jemalloc'],
                 help='host allocator preloaded into every child (ours and torch alike)')
  p.add_argument('--rounds', type=positive_int, default=1,
                 help='per row, run ours and torch alternately this many times (fresh processes) '
                 'and print every round\'s ratio, their median and the ratio of the best times: '
                 'the VM\'s speed drifts over minutes, so one pair of runs can mislead')
  p.add_argument('--all', action='store_true',
                 help='every row of the README table: Swin-B 256/b2, 512/b1, 512/b2 (ours, '
                 'remat block), ResNet-50 + Transformer BEV and HGNetv2 at 256/b2')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--layout', default='data', choices=['data', 'fsdp'], help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    if args.child == 'ours':
      r = run_ours(args.variant, args.batch, args.sizes[0], args.iters, args.dtype, args.layout,
                   args.remat[0], args.compile_only)
    else:
      r = run_torch(args.variant, args.batch, args.sizes[0], args.iters, args.dtype)
    print('RESULT ' + json.dumps(r))
    return

  from segchange_jax import allocator  # pylint: disable=g-import-not-at-top
  try:
    alloc_env = allocator.preload_env(args.allocator)
  except FileNotFoundError as e:
    p.error(f'--allocator={args.allocator}: {e}')
  print(f'host allocator: {args.allocator} {alloc_env or ""}', flush=True)

  def child(impl, batch, size, layout='data', env=None, remat='none', variant=None):
    variant = variant or args.variant
    env = {**alloc_env, **(env or {})}
    r, err = run_child(__file__, ['--child', impl, '--variant', variant, '--sizes',
                                  str(size), '--batch', str(batch), '--iters', str(args.iters),
                                  '--dtype', args.dtype, '--layout', layout, '--remat', remat]
                       + (['--compile_only'] if args.compile_only else []), env)
    if r is None:
      print(f'{impl} {variant} batch {batch} at {size} px ({layout}, remat {remat}) failed:\n'
            f'{err}', flush=True)
    else:
      _print(r)
    return r

  if args.all:  # (variant, size, batch, implementations, our remat policies)
    rows = [('swin_base_patch4_window7_224', 256, 2, args.impls, args.remat),
            ('swin_base_patch4_window7_224', 512, 1, args.impls, args.remat),
            # torch cannot fit this one in 24 GB; ours with the memory-saving policy
            ('swin_base_patch4_window7_224', 512, 2, ['ours'], ['block']),
            ('resnet50', 256, 2, args.impls, args.remat),
            ('hgnetv2', 256, 2, args.impls, args.remat)]
  else:
    rows = [(args.variant, size, args.batch, args.impls, args.remat) for size in args.sizes]
  for variant, size, batch, impls, remats in rows:
    print(f'== {variant}, batch {batch}, {size} px', flush=True)
    pairs = []
    for k in range(args.rounds):
      if args.rounds > 1:
        print(f'-- round {k + 1} of {args.rounds}', flush=True)
      res = {}
      for impl in impls:
        if impl == 'torch' and args.compile_only:
          continue
        for remat in (remats if impl == 'ours' else ['none']):
          r = child(impl, batch, size, remat=remat, variant=variant)
          res.setdefault(impl, r)  # the ratio line uses the first policy
      if res.get('ours') and res.get('torch'):
        o, t = res['ours'], res['torch']
        pairs.append((o, t))
        print(f'{variant} batch {batch} at {size} px: torch/ours step time {t["s"] / o["s"]:.2f}x '
              f'({o["examples_per_s"]:.2f} vs {t["examples_per_s"]:.2f} ex/s), memory ours/torch '
              f'{o["peak_mb"] / max(t["peak_mb"], 1e-9):.2f}, GFLOP/step ours {o["gflop"]:.0f} '
              f'(XLA, every op) vs torch {t["gflop"]:.0f} (flop_counter)', flush=True)
    if len(pairs) > 1:
      ratios = sorted(t['s'] / o['s'] for o, t in pairs)
      best_o, best_t = min(o['s'] for o, _ in pairs), min(t['s'] for _, t in pairs)
      print(f'{variant} batch {batch} at {size} px over {len(pairs)} alternating rounds: '
            f'torch/ours {", ".join(f"{r:.2f}x" for r in ratios)}; median '
            f'{statistics.median(ratios):.2f}x; best times {best_o:.2f} vs {best_t:.2f} s '
            f'({best_t / best_o:.2f}x)', flush=True)

  runs = {}
  for n in args.devices:
    env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}', 'JAX_PLATFORMS': 'cpu'}
    for layout in (('data', 'fsdp') if n > 1 else ('data',)):
      runs[(n, layout)] = child('ours', args.device_batch, args.device_size, layout, env)
  one = runs.get((1, 'data'))
  for (n, layout), r in runs.items():
    if one and r and n > 1:
      print(f'{n} simulated devices ({layout}) vs 1: step time ratio {r["s"] / one["s"]:.2f}',
            flush=True)


if __name__ == '__main__':
  main()
