"""Deterministic synthetic bi-temporal scenes in the SegChange "default" layout.

    python -m data_prep.synthetic --out /tmp/synth --n 200 --size 256 --seed 0

Each scene has a textured background and objects (buildings with a two-tone roof and a cast
shadow, roads, mounds). Some objects exist in only one of the two dates: their footprints are
the change label (255). The B image also gets changes that must NOT be labelled: a global
brightness/colour gain and offset, haze, sensor noise and a sub-pixel misregistration
(<= 1 px). Scene i depends only on (seed, i), so any subset regenerates bit-identically.
Output: `{train,val,test}/{A,B,label}/<split>_<i>.png` and `{split}/prompts.txt`, plus the
per-prompt targets ("new buildings", "demolished buildings", "new roads", "removed roads", "new
mounds", "removed mounds", "any change"): `{split}/targets/<stem>/<slug>.png` listed in
`{split}/targets.json` (`segchange_jax.data.synthetic` describes them).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from segchange_jax import cli
from segchange_jax.data.synthetic import generate


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string('out', None, 'Output directory (SegChange default layout).', required=True)
  flags.DEFINE_integer('n', 200, 'Number of scenes (70/15/15 train/val/test).', lower_bound=3)
  flags.DEFINE_integer('size', 256, 'Scene size in pixels (square).', lower_bound=32)
  flags.DEFINE_integer('seed', 0, 'Random seed; scene i depends only on (seed, i).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]}; flags take the form --name=value')
  f = flags.FLAGS
  counts = generate(f.out, f.n, f.size, f.seed)
  print(f'wrote {counts} scenes of {f.size}x{f.size} to {f.out}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
