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
import logging
import os
import shutil
import tempfile

from absl import flags

from segchange_jax import cli
from segchange_jax import config_lib
# The app runs the model through segchange_jax.infer, which defines --checkpoint, --embeddings
# and --config on import; the app shares those three flags (absl allows each name once).
from segchange_jax import infer

for _name in ('checkpoint', 'embeddings'):
  flags.declare_key_flag(_name)
_SHARED = ('checkpoint', 'embeddings')
_PORT = flags.DEFINE_integer('port', 7860, 'TCP port to serve on.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (0.0.0.0: every interface).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  fv = flags.FLAGS
  for flag in fv.get_flags_for_module(infer.__name__):
    if flag.name not in _SHARED and fv[flag.name].present:
      raise cli.UsageError(f'--{flag.name} is a flag of segchange_jax.infer, not of the app '
                           '(which takes --checkpoint, --embeddings, --config, --port, --host)')
  checkpoint, embeddings = fv.checkpoint, fv.embeddings
  config = config_lib.validate_config(fv.config) if fv.config is not None else None
  if not checkpoint:
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
  logging.getLogger('httpx').setLevel(logging.WARNING)  # gradio's startup self-checks
  from segchange_jax import api  # pylint: disable=g-import-not-at-top
  from segchange_jax.app import ui  # pylint: disable=g-import-not-at-top
  detector = api.ChangeDetector.from_checkpoint(checkpoint, config=config,
                                                embeddings=embeddings)
  workroot = tempfile.mkdtemp(prefix='segchange_app_')
  atexit.register(shutil.rmtree, workroot, ignore_errors=True)
  print(f'serving {checkpoint} on http://{_HOST.value}:{_PORT.value} (Ctrl-C stops)',
        flush=True)
  ui.launch(ui.build(detector, workroot), _HOST.value, _PORT.value)


if __name__ == '__main__':
  cli.run(main)
