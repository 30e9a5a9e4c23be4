r"""Forward + backward time of each part of the model compiled alone, next to its XLA FLOPs.

  python bench/parts.py                                  # Swin-B, batch 1, 512 px
  python bench/parts.py --size 256 --batch 2 --parts backbone head
  python bench/parts.py --variant demo --size 64         # tiny model, seconds

The train step's profile (`profile_step.py`) sums per-op times, which on XLA:CPU misattributes
work: Eigen `dot` thunks (most weight gradients) run asynchronously and their time lands on
whatever ops run next. Wall time of one part compiled alone does not have that problem. Each
part is `jax.grad` of sum(output * fixed random cotangent) with respect to its parameters and
its input, in training mode (dropout / drop-path on, BatchNorm batch statistics):

- backbone: the siamese backbone on the stacked A/B images ([2B, S, S, 3]);
- neck: the fusion neck on random difference maps at strides 4..32 (EGA included, as configured);
- ega: the neck's EGA alone on a full-resolution map;
- head: the mask head on a random full-resolution map and random text embeddings;
- matmul: a [2B*S*S/16, C] @ [C, 4C] product (C = the first feature width), the machine's matmul
  rate at the backbone's first-stage shape, for scale.

Printed per part: min and all wall times over --iters runs (after one warm-up), XLA's FLOPs and
the achieved GFLOP/s. The parts do not add up to the step exactly: the step also runs the
per-scale 1x1 convs, BEV, the feature difference, the losses and the optimizer.
"""

from __future__ import annotations

import argparse

from _common import VARIANTS
from _common import image_size
from _common import positive_int
from _common import timed
from _common import variant_config
from _common import xla_cost

PARTS = ('backbone', 'neck', 'ega', 'head', 'matmul')


def _time(fn, args, iters: int) -> tuple[list[float], float]:
  import jax  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(fn).lower(*args).compile()
  run = lambda: jax.block_until_ready(compiled(*args))
  run()  # warm-up
  return timed(run, iters), float(xla_cost(compiled).get('flops', 0.0))


def part_functions(variant: str, batch: int, size: int, parts) -> dict:
  """{part: (fn, args)}: each fn returns the gradients w.r.t. (params, input)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import head as head_lib  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import layers  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import neck as neck_lib  # pylint: disable=g-import-not-at-top

  config = variant_config(variant)
  m = ml_collections.FrozenConfigDict(config.model)
  keys = iter(jax.random.split(jax.random.key(0), 32))
  normal = lambda shape: jax.random.normal(next(keys), shape)
  rngs = {'dropout': jax.random.key(1)}
  out = {}

  def grad_of(module, inputs, cotangent, **kw):
    init = jax.jit(lambda r, inputs: module.init(r, *inputs, False, **kw))  # eager init: slow
    variables = init({'params': next(keys), 'dropout': next(keys)}, inputs)

    def loss(v, x):
      y, _ = module.apply(v, x, *inputs[1:], True, rngs=rngs, mutable=['batch_stats'], **kw)
      y = y.x if isinstance(y, layers.DeferredDense) else y
      return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(cotangent)))
    return jax.grad(loss, argnums=(0, 1)), (variables, inputs[0])

  if 'backbone' in parts:
    module = backbones.build_backbone(m, dtype=jnp.float32, name='backbone')
    images = normal((2 * batch, size, size, 3))
    shapes = jax.eval_shape(lambda v: module.apply(v, images), jax.eval_shape(
        lambda: module.init({'params': jax.random.key(0)}, images, False)))
    out['backbone'] = grad_of(module, (images,), [normal(s.shape) for s in shapes])
  neck = neck_lib.build_neck(m, jnp.float32, 'fpn')
  diffs = [normal((batch, size // s, size // s, d)) for s, d in zip(neck_lib.STRIDES, m.out_dims)]
  # The neck's output width: fpn_dim, or token_dim behind the token connector.
  x_shape = jax.eval_shape(lambda: neck.init_with_output(
      {'params': jax.random.key(0)}, diffs, False)[0]).x.shape
  if 'neck' in parts:
    out['neck'] = grad_of(neck, (diffs,), normal(x_shape))
  if 'ega' in parts:
    out['ega'] = grad_of(neck_lib.EGA(jnp.float32), (normal(x_shape),), normal(x_shape))
  if 'head' in parts:
    c = x_shape[-1]
    x = layers.DeferredDense(normal(x_shape), normal((c, c)) * 0.05, jnp.zeros((c,)))
    text = normal((batch, 8, config.text.dim))
    out['head'] = grad_of(head_lib.build_head(m, jnp.float32, 'mask_head'), (x, text),
                          normal((batch, size, size, m.num_classes)))
  if 'matmul' in parts:
    c = backbones.backbone_channels(m)[0]
    a, b = normal((2 * batch * (size // 4)**2, c)), normal((c, 4 * c))
    out['matmul'] = (lambda a, b: a @ b), (a, b)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variant', default='swin_base_patch4_window7_224', choices=VARIANTS)
  p.add_argument('--size', type=image_size, default=512)
  p.add_argument('--batch', type=positive_int, default=1)
  p.add_argument('--iters', type=positive_int, default=3)
  p.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
  args = p.parse_args()
  fns = part_functions(args.variant, args.batch, args.size, args.parts)
  print(f'== {args.variant}, batch {args.batch}, {args.size} px: forward + backward per part')
  for name in args.parts:
    fn, fn_args = fns[name]
    times, flops = _time(fn, fn_args, args.iters)
    best = min(times)
    print(f'{name:9s} {best:8.4f} s  (all {", ".join(f"{t:.4f}" for t in times)})  '
          f'{flops / 1e9:9.3f} GFLOP  {flops / best / 1e9:6.1f} GFLOP/s', flush=True)


if __name__ == '__main__':
  main()
