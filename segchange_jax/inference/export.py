"""StableHLO export: the model as a serialized `jax.export` module inside a bundle.

`model.stablehlo` holds `logits = f(image_a, image_b, text_emb)` with a symbolic batch `b`;
the weights are closed-over constants, so jax alone runs the file (no params, no model code).
It is as large as the weights, and a serialized module must stay under 2 GB. The rest of the
bundle (variables, prompts, signature, README) is inference/bundle.py's.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from segchange_jax import config_lib
from segchange_jax.inference import bundle

FORMAT = bundle.BundleFormat(
    name='stablehlo', title='StableHLO (jax.export)', model_file='model.stablehlo',
    runtime='jax',
    load=("import jax\n\n"
          "with open('model.stablehlo', 'rb') as f:\n"
          "  model = jax.export.deserialize(bytearray(f.read()))"),
    call='np.asarray(model.call(image_a, image_b, text_emb))',
    notes=('The module is lowered for the platforms {platforms} (jax {jax_version}); '
           '`jax.export.deserialize` needs a jax at least as new as the one that wrote it.'))
MODEL_FILE = FORMAT.model_file


class ExportError(bundle.BundleError):
  """The bundle cannot be written as asked; the message names the flag and the fix."""


def export_forward(config, variables: dict, size: int,
                   platforms: Sequence[str] | None = None):
  """`jax.export.Exported` of (image_a, image_b, text_emb) -> logits, batch symbolic `b`.

  The variables are closed over (constants in the module), so the artefact needs no params.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  config_lib.check_stride(size, '--size', ExportError)
  model = segchange.build_model(config)
  consts = jax.tree.map(jnp.asarray, variables)

  def forward(image_a, image_b, text_emb):
    return model.apply(consts, image_a, image_b, text_emb, train=False).astype(jnp.float32)

  (b,) = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((b, int(config.text.max_tokens), int(config.text.dim)),
                              jnp.float32)
  return jax.export.export(jax.jit(forward), platforms=platforms)(image, image, text)


def load_exported(directory: str):
  """The bundle's deserialized `jax.export.Exported`; call it with `.call(a, b, text_emb)`."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; create the bundle with '
                            'python -m segchange_jax.export --checkpoint CKPT --out DIR')
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def write_bundle(out: str, config, variables: dict, prompts: Sequence[str] | None = None,
                 embeddings: str | None = None, size: int | None = None,
                 platforms: Sequence[str] | None = ('cpu', 'cuda'),
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes a bundle (inference/bundle.py) with model.stablehlo; returns the signature dict."""

  def write_model(path: str, size: int) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top
    exported = export_forward(config, variables, size, platforms)
    with open(path, 'wb') as f:
      f.write(exported.serialize())
    return {'platforms': list(exported.platforms), 'jax_version': jax.__version__}

  return bundle.write(out, config, variables, FORMAT, write_model, prompts, embeddings, size,
                      overwrite, error=ExportError)
