r"""ONNX export of the model (opset 17, dynamic batch) inside a bundle.

  python -m segchange_jax.export --format onnx --checkpoint CKPT --out DIR [--size 512] \
      [--prompts "..." | --embeddings prompts.npz]

writes DIR/model.onnx: `logits = f(image_a, image_b, text_emb)` with the signature and
normalisation of every bundle (inference/bundle.py): image_a, image_b float32 [b, S, S, 3]
(RGB / 255, then ImageNet mean/std), text_emb float32 [b, T, L], logits float32 [b, S, S, K];
`b` is a dynamic dimension. The forward is traced with a symbolic batch and converted by
inference/jaxpr_onnx.py, the model's weights becoming initializers; the rest of the folder
(variables, prompts, signature, README) is the bundle's.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segchange_jax import config_lib
from segchange_jax import jax_compat
from segchange_jax.inference import bundle
from segchange_jax.inference import jaxpr_onnx

OPSET = jaxpr_onnx.OPSET
FORMAT = bundle.BundleFormat(
    name='onnx', title='ONNX', model_file='model.onnx', runtime='onnxruntime',
    load=("import onnxruntime as ort\n\n"
          "model = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])"),
    call="model.run(None, {'image_a': image_a, 'image_b': image_b, 'text_emb': text_emb})[0]",
    notes=('`model.onnx` is opset {opset}, checked with onnxruntime {onnxruntime_tested}. '
           'Whole scenes through the same windowed engine as the JAX model: '
           '`python -m segchange_jax.infer --backend onnxruntime --checkpoint DIR --a A.tif '
           '--b B.tif --out change.tif`.'))
MODEL_FILE = FORMAT.model_file
INPUT_NAMES = bundle.INPUT_NAMES
OUTPUT_NAME = bundle.OUTPUT_NAME
save = jaxpr_onnx.save


class OnnxExportError(jaxpr_onnx.ConversionError):
  """The model cannot be exported as asked; the message names the flag (or, from the
  converter, the primitive)."""


def convert(config, variables: dict, size: int, opset: int = OPSET):
  """ONNX ModelProto of (image_a, image_b, text_emb) -> logits, batch dynamic ('b').

  Returns (model, report) where report counts the ONNX ops emitted.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  config_lib.check_stride(size, '--size', OnnxExportError)
  model = segchange.build_model(config)
  t, dim = int(config.text.max_tokens), int(config.text.dim)
  leaves, tree = jax.tree.flatten(variables)

  def forward(lv, image_a, image_b, text_emb):
    v = jax.tree.unflatten(tree, lv)
    return model.apply(v, image_a, image_b, text_emb, train=False).astype(jnp.float32)

  (b,) = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((b, t, dim), jnp.float32)
  inputs = dict(zip(INPUT_NAMES, (image, image, text)))
  return jaxpr_onnx.to_onnx(forward, inputs, [np.asarray(x, np.float32) for x in leaves],
                            [OUTPUT_NAME], opset=opset, graph_name='segchange',
                            producer_name='segchange_jax',
                            linear_dim=jax_compat.linear_symbolic_dim)


def write_bundle(out: str, config, variables: dict, prompts: Sequence[str] | None = None,
                 embeddings: str | None = None, size: int | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes a bundle (inference/bundle.py) with model.onnx; returns the signature dict."""

  def write_model(path: str, size: int) -> dict[str, Any]:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    proto, ops = convert(config, variables, size)
    nbytes = save(proto, path)
    return {'opset': OPSET, 'bytes': nbytes, 'onnx_ops': ops,
            'onnxruntime_tested': onnxruntime.__version__}

  return bundle.write(out, config, variables, FORMAT, write_model, prompts, embeddings, size,
                      overwrite, error=OnnxExportError)
