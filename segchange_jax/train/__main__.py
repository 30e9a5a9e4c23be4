r"""Training driver: `python -m segchange_jax.train --config configs/dvcd.py --workdir DIR`.

Reads shards written by `data_prep.convert` (or generates and converts the demo's synthetic
scenes), computes the prompt-embedding table once, trains with one jitted step over a device
mesh, evaluates on the val split every `train.eval_every_epochs`, keeps Orbax checkpoints
(latest N + best F1 + best IoU, resumed automatically from --workdir), and writes metrics.csv,
TensorBoard events and the resolved config into the workdir. After training it evaluates the
best-IoU checkpoint on `eval.split` and writes `<workdir>/eval_<split>.json`.
"""

from __future__ import annotations

import logging as pylogging
import signal
import sys
from typing import Sequence

from absl import flags
from absl import logging

from segchange_jax import cli
from segchange_jax import config_lib


class _Preemption:
  """Remembers a SIGTERM so the loop can save a checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then exiting')
    self.requested = True


class _DropLibraryChatter(pylogging.Filter):
  """Keeps Orbax's per-save INFO lines out of the training log (warnings still pass)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  config_lib.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
  flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0 for multi-process runs '
      '(overrides config.distributed.coordinator_address).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'Index of this process.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  config = config_lib.validate_config(f.config)
  d = config.distributed
  from segchange_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(
      f.coordinator_address if f.coordinator_address is not None else d.coordinator_address,
      f.num_processes if f.num_processes is not None else d.num_processes,
      f.process_id if f.process_id is not None else d.process_id,
      initialization_timeout=d.initialization_timeout, heartbeat_timeout=d.heartbeat_timeout)
  from segchange_jax.train import loop  # pylint: disable=g-import-not-at-top
  preemption = _Preemption()
  try:
    result = loop.train_and_evaluate(config, f.workdir,
                                        should_stop=lambda: preemption.requested)
  except loop.TrainingError as e:  # data or config unusable: the message says what to change
    raise cli.UsageError(str(e)) from e
  if preemption.requested:
    sys.exit(0)
  logging.info('done: %s', result)


if __name__ == '__main__':
  define_flags()
  # Only config and usage errors are reported in one line: an error deep in training keeps its
  # traceback.
  cli.run(main, errors=(config_lib.ConfigError, cli.UsageError, flags.Error))
