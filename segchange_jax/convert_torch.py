r"""Converts upstream SegChange-R1 PyTorch checkpoints to ours, and back.

  python -m segchange_jax.convert_torch --checkpoint best_iou.pth --config configs/dvcd.py \
      --out converted/dvcd
  python -m segchange_jax.convert_torch --reverse --checkpoint converted/dvcd --out dvcd.safetensors

Forward: accepts `{'model': state_dict, ...}` or a bare state_dict (with or without 'module.'),
checks every key and shape against the config's variant and lists all problems in one error.
Reverse: writes the upstream `ChangeModel.state_dict()` (num_batches_tracked = 0) as safetensors.
"""

from __future__ import annotations

import os

from absl import flags

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import config_lib


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  config_lib.define_config_flag(
      help_string='configs/*.py describing the checkpoint variant (forward conversion; reverse '
      'reads config.json from the checkpoint when omitted).')
  flags.DEFINE_string('checkpoint', None, 'Input: .pth (forward) or our dir (reverse).')
  flags.DEFINE_string('out', None, 'Output: a directory (forward) or a .safetensors file.')
  flags.DEFINE_bool('reverse', False, 'Export our checkpoint to a torch state_dict.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if not f.checkpoint or not f.out:
    raise cli.UsageError('--checkpoint and --out are required')
  atomic.check_output(f.out, [f.checkpoint], f.overwrite)
  ext = os.path.splitext(f.out)[1].lower()
  if f.reverse and ext != '.safetensors':
    raise cli.UsageError(f'--out {f.out}: --reverse writes safetensors; name the file '
                         '*.safetensors')
  if not f.reverse and ext in ('.safetensors', '.pth', '.pt', '.bin'):
    raise cli.UsageError(f'--out {f.out}: a forward conversion writes a directory '
                         '(variables/ + config.json); give a folder name')
  if not os.path.exists(f.checkpoint):
    raise FileNotFoundError(f'--checkpoint {f.checkpoint} does not exist')
  config = f.config
  if config is not None:
    config_lib.validate_config(config)
  cli.quiet_libraries()
  from segchange_jax.interop import upstream  # pylint: disable=g-import-not-at-top
  if f.reverse:
    n = upstream.to_torch(f.checkpoint, config, f.out)
    print(f'wrote {f.out} ({n} tensors)')
  else:
    if config is None:
      raise cli.UsageError('--config is required to convert a PyTorch checkpoint (it names the '
                           'backbone/bev/neck variant), e.g. --config configs/dvcd.py')
    n = upstream.to_flax(f.checkpoint, config, f.out)
    print(f'wrote {f.out} ({n:,} parameters)')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
