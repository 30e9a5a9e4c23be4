"""Serves the change-detection app in the browser (gradio; `pip install -e '.[app]'`).

  python -m segchange_jax.app --checkpoint runs/demo/checkpoints [--port 7860] [--host 127.0.0.1]

--checkpoint: anything `infer` reads except an upstream .pth without its config (training
checkpoints dir, convert_torch output, export bundle; --config for a .pth). The page offers
the bundled sample pairs or two uploads (PNG/JPEG/GeoTIFF), a prompt, a threshold slider and
the mask and polygons as downloads. --host 0.0.0.0 serves other machines too (no
authentication: only on a network you trust). Stop with Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from absl import flags

from segchange_jax import cli
from segchange_jax import config_lib

_CONFIG = config_lib.define_config_flag(
    help_string='configs/*.py describing the model; needed only for an upstream .pth.')
_CKPT = flags.DEFINE_string('checkpoint', None, 'Training checkpoints dir (e.g. '
                            'runs/demo/checkpoints), convert_torch dir, export bundle or .pth.')
_PORT = flags.DEFINE_integer('port', 7860, 'TCP port to serve on.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (0.0.0.0: every interface).')
_EMBEDDINGS = flags.DEFINE_string('embeddings', None, 'Prompt embeddings .npz (from '
                                  'segchange_jax.embed_prompts); skips the text encoder.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _CKPT.value:
    raise cli.UsageError('--checkpoint is required (e.g. runs/demo/checkpoints after README '
                         'Quickstart command (1))')
  cli.positive('port', _PORT.value)
  if _PORT.value > 65535:
    raise cli.UsageError(f'--port={_PORT.value} must be <= 65535')
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # offline: no calls home
  try:
    import gradio  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise cli.UsageError(f'gradio is not installed ({e}); install the app extra: '
                         "pip install -e '.[app]'") from e
  cli.quiet_libraries()
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  from segchange_jax.app import ui  # pylint: disable=g-import-not-at-top
  config = config_lib.validate_config(_CONFIG.value) if _CONFIG.value is not None else None
  detector = api.ChangeDetector.from_checkpoint(_CKPT.value, config=config,
                                                embeddings=_EMBEDDINGS.value)
  workroot = tempfile.mkdtemp(prefix='segchange_app_')
  atexit.register(shutil.rmtree, workroot, ignore_errors=True)
  print(f'serving {_CKPT.value} on http://{_HOST.value}:{_PORT.value} (Ctrl-C stops)',
        flush=True)
  ui.launch(ui.build(detector, workroot), _HOST.value, _PORT.value)


if __name__ == '__main__':
  cli.run(main)
