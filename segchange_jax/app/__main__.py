"""Serves the change-detection app in the browser (gradio; `pip install -e '.[app]'`).

  python -m segchange_jax.app --checkpoint runs/demo/checkpoints [--port 7860] [--host 127.0.0.1]

--checkpoint: anything `infer` reads except an upstream .pth without its config (training
checkpoints dir, convert_torch output, export bundle; --config for a .pth). The page offers
the bundled sample pairs or two uploads (PNG/JPEG/GeoTIFF), one or more prompts (one per line:
one multi-prompt run, each prompt drawn in its own colour with a legend), a threshold slider
and the mask and polygons as downloads. --host 0.0.0.0 serves other machines too (no
authentication: only on a network you trust). Stop with Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from absl import flags

from segchange_jax import cli
from segchange_jax import config_lib


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  config_lib.define_checkpoint_flags()
  flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (embed_prompts format); '
                      'prompts outside it are encoded with the config\'s text model.')
  flags.DEFINE_integer('port', 7860, 'TCP port to serve on.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (0.0.0.0: every interface).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = config_lib.validate_config(f.config) if f.config is not None else None
  if not f.checkpoint:
    raise cli.UsageError('--checkpoint is required (e.g. runs/demo/checkpoints after README '
                         'Quickstart command (1))')
  cli.positive('port', f.port)
  if f.port > 65535:
    raise cli.UsageError(f'--port={f.port} must be <= 65535')
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # offline: no calls home
  try:
    import gradio  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise cli.UsageError(f'gradio is not installed ({e}); install the app extra: '
                         "pip install -e '.[app]'") from e
  cli.quiet_libraries()
  logging.getLogger('httpx').setLevel(logging.WARNING)  # gradio's startup self-checks
  from segchange_jax.app import ui  # pylint: disable=g-import-not-at-top
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  detector = predictor.ChangeDetector.from_checkpoint(f.checkpoint, config=config,
                                                      embeddings=f.embeddings)
  workroot = tempfile.mkdtemp(prefix='segchange_app_')
  atexit.register(shutil.rmtree, workroot, ignore_errors=True)
  print(f'serving {f.checkpoint} on http://{f.host}:{f.port} (Ctrl-C stops)', flush=True)
  ui.launch(ui.build(detector, workroot), f.host, f.port)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
