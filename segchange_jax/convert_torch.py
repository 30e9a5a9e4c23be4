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

_CONFIG = config_lib.define_config_flag(
    help_string='configs/*.py describing the checkpoint variant (forward conversion; reverse '
    'reads config.json from the checkpoint when omitted).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Input: .pth (forward) or our dir (reverse).')
_OUT = flags.DEFINE_string('out', None, 'Output: a directory (forward) or a .safetensors file.')
_REVERSE = flags.DEFINE_bool('reverse', False, 'Export our checkpoint to a torch state_dict.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')


def forward(checkpoint: str, config, out: str) -> None:
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  config, variables = api.load_variables(checkpoint, config)
  with atomic.atomic_dir(out) as tmp:
    api.save_variables(tmp, config, variables)
  n = sum(int(v.size) for v in __import__('jax').tree.leaves(variables['params']))
  print(f'wrote {out} ({n:,} parameters)')


def reverse(checkpoint: str, config, out: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  config, variables = api.load_variables(checkpoint, config)
  sd = segchange.export_torch_state_dict(config, variables)
  with atomic.atomic_path(out) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp)
  print(f'wrote {out} ({len(sd)} tensors)')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _CHECKPOINT.value or not _OUT.value:
    raise cli.UsageError('--checkpoint and --out are required')
  atomic.check_output(_OUT.value, [_CHECKPOINT.value], _OVERWRITE.value)
  ext = os.path.splitext(_OUT.value)[1].lower()
  if _REVERSE.value and ext != '.safetensors':
    raise cli.UsageError(f'--out {_OUT.value}: --reverse writes safetensors; name the file '
                         '*.safetensors')
  if not _REVERSE.value and ext in ('.safetensors', '.pth', '.pt', '.bin'):
    raise cli.UsageError(f'--out {_OUT.value}: a forward conversion writes a directory '
                         '(variables/ + config.json); give a folder name')
  if not os.path.exists(_CHECKPOINT.value):
    raise FileNotFoundError(f'--checkpoint {_CHECKPOINT.value} does not exist')
  config = _CONFIG.value
  if config is not None:
    config_lib.validate_config(config)
  cli.quiet_libraries()
  if _REVERSE.value:
    reverse(_CHECKPOINT.value, config, _OUT.value)
  else:
    if config is None:
      raise cli.UsageError('--config is required to convert a PyTorch checkpoint (it names the '
                           'backbone/bev/neck variant), e.g. --config configs/dvcd.py')
    forward(_CHECKPOINT.value, config, _OUT.value)


if __name__ == '__main__':
  cli.run(main)
