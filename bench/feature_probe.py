r"""Does the trunk's full-resolution map know WHICH change? A linear probe on a trained model.

  python bench/feature_probe.py --run runs/demo_prompts
  python bench/feature_probe.py --run runs/demo_prompts --tap dates   # where is direction lost?

The mask head reads one prompt-independent map (the neck's output, before any prompt enters;
models/segchange.py). A prompt can only select a kind of change if that map separates the
kinds per pixel. This fits a softmax regression (a linear read-out, what a prompt-chosen
combination of channels can do) from the map's channels to the pixel's target (the six
(kind, direction) targets of the synthetic scenes, changed pixels only) on the training split,
and reports its accuracy on the test split next to the majority-class rate, and the same for
change vs no change. Models trained with config.model.prompt_conditioning='film_neck' have no
single map (the neck runs per prompt) and are refused.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from _common import REPO  # noqa: F401  (puts the repository on sys.path)
import prompt_selectivity

TAPS = {
    'neck': "the neck's output, the map the head reads (full resolution)",
    'diff': "the feature-difference block's finest scale (stride 4), the neck's input",
    'dates': "the two dates' features going into that block, side by side (stride 4)",
}


def tap_maps(run: str, pairs: list[dict], tap: str = 'neck') -> np.ndarray:
  """[N, h, w, C] features at `tap` (TAPS) of every pair."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import prompt_film  # pylint: disable=g-import-not-at-top
  det = prompt_selectivity.detector(run)
  if prompt_film.conditions_neck(prompt_film.conditioning_of(det.config.model)):
    raise SystemExit(f'{run}: prompt_conditioning=film_neck has one neck map per prompt')
  emb = det.embed()

  module = {'neck': 'fpn', 'diff': 'feature_diff', 'dates': 'bev_0'}[tap]

  @jax.jit
  def maps(a, b):
    _, inter = det.model.apply(det.variables, a, b, jnp.broadcast_to(emb, (a.shape[0],
                                                                           *emb.shape[1:])),
                               capture_intermediates=lambda m, _: m.name == module,
                               mutable=['intermediates'])
    v = inter['intermediates'][module]['__call__'][0]
    if tap == 'diff':
      return v[0]
    if tap == 'dates':   # rows [A; B] -> channels [A, B]
      return jnp.concatenate([v[:a.shape[0]], v[a.shape[0]:]], -1)
    return v.x if v.kernel is None else v.x @ v.kernel + v.bias

  out = []
  for pair in pairs:
    a, b = (imagery.normalize(pair[k])[None] for k in ('a', 'b'))
    out.append(np.asarray(maps(a, b))[0])
  return np.stack(out)


def at_resolution(targets: np.ndarray, size: int) -> np.ndarray:
  """[N, H, W] targets sampled at the centres of a `size` x `size` grid of cells."""
  stride = targets.shape[1] // size
  return targets[:, stride // 2::stride, stride // 2::stride]


def pixel_targets(pairs: list[dict], kinds: list[str]) -> np.ndarray:
  """[N, H, W] int: 1 + index of the pixel's (kind, direction) target, 0 for no change, -1 for
  pixels in two targets (left out)."""
  out = []
  for pair in pairs:
    t = np.stack([pair['targets'].get(k, np.zeros_like(pair['targets']['any change']))
                  for k in kinds])
    y = np.where(t.any(0), 1 + t.argmax(0), 0)
    out.append(np.where(t.sum(0) > 1, -1, y))
  return np.stack(out)


def fit_softmax(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 500) -> callable:
  """A linear softmax classifier (standardised inputs, Adam, full batch) -> predict(x)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  mu, sd = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mu) / sd)
  # Classes weighted equally, so a majority-class read-out scores no better than chance.
  counts = np.bincount(y, minlength=classes).astype(np.float32)
  w_class = jnp.asarray(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / classes, 0))
  params = {'w': jnp.zeros((x.shape[1], classes)), 'b': jnp.zeros((classes,))}
  tx = optax.adam(0.05)
  state = tx.init(params)
  yj = jnp.asarray(y)

  @jax.jit
  def step(params, state):
    def loss(p):
      logp = jax.nn.log_softmax(xs @ p['w'] + p['b'])
      return -jnp.sum(w_class[yj] * jnp.take_along_axis(logp, yj[:, None], 1)[:, 0]) / len(y)
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return lambda z: np.asarray(((z - mu) / sd) @ params['w'] + params['b']).argmax(-1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
  """Mean per-class recall over the classes present in `y` (chance = 1 / classes)."""
  return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def main():
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--run', nargs='+', required=True)
  p.add_argument('--data', default='data/demo_prompts')
  p.add_argument('--background', type=int, default=20000,
                 help='no-change pixels sampled per split for the change probe')
  p.add_argument('--tap', default='neck', choices=list(TAPS),
                 help='which features: ' + '; '.join(f'{k}: {v}' for k, v in TAPS.items()))
  args = p.parse_args()
  kinds = list(synthetic.TARGET_NAMES.values())
  splits = {s: prompt_selectivity.load_split(os.path.join(args.data, s)) for s in ('train', 'test')}
  targets = {s: pixel_targets(v, kinds) for s, v in splits.items()}
  rng = np.random.default_rng(0)
  for run in args.run:
    feats = {s: tap_maps(run, v, args.tap) for s, v in splits.items()}
    res = {}
    for s in splits:
      y = at_resolution(targets[s], feats[s].shape[1]).reshape(-1)
      f = feats[s].reshape(-1, feats[s].shape[-1])
      changed = y > 0
      bg = rng.choice(np.flatnonzero(y == 0), args.background, replace=False)
      res[s] = dict(kind=(f[changed], y[changed] - 1),
                    change=(np.concatenate([f[changed], f[bg]]),
                            np.concatenate([np.ones(changed.sum(), int), np.zeros(len(bg), int)])))
    print(f'\n== {run}: linear probe on {TAPS[args.tap]} ({feats["train"].shape[-1]} '
          'channels), balanced accuracy on the test split (chance in brackets)')
    for name, classes in (('kind', len(kinds)), ('change', 2)):
      x_tr, y_tr = res['train'][name]
      x_te, y_te = res['test'][name]
      predict = fit_softmax(x_tr, y_tr, classes)
      present = len(np.unique(y_te))
      print(f'  {name:<7} train {balanced_accuracy(y_tr, predict(x_tr)):.3f}  test '
            f'{balanced_accuracy(y_te, predict(x_te)):.3f}  (chance {1 / present:.3f}; '
            f'{len(y_tr)} / {len(y_te)} pixels)')
      if name == 'kind':
        pred = predict(x_te)
        cm = np.zeros((classes, classes), int)
        np.add.at(cm, (y_te, pred), 1)
        print('  test confusion (rows: true target, columns: probe):')
        for k, row in zip(kinds, cm):
          print(f'    {k:<22}' + ' '.join(f'{v / max(row.sum(), 1):5.2f}' for v in row))


if __name__ == '__main__':
  main()
