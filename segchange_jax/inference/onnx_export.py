r"""ONNX export of the model (opset 17, dynamic batch) inside a bundle.

  python -m segchange_jax.export --format onnx --checkpoint CKPT --out DIR [--size 512] \
      [--prompts "..." | --embeddings prompts.npz] [--raw_inputs]

writes DIR/model.onnx: `probabilities, mask = f(image_a, image_b, prompt)` with image_a,
image_b uint8 RGB [b, S, S, 3] (the ImageNet normalisation is in the graph), prompt int32 [b]
(a row of the bundle's prompt table, a constant of the graph), probabilities float32
[b, S, S, K] and mask uint8 [b, S, S] (config.infer.threshold); and DIR/model_embeddings.onnx,
the same with text_emb float32 [b, T, L] in place of prompt (ONNX has no optional inputs:
inference/bundle.py). With --raw_inputs, model.onnx alone, `logits = f(image_a, image_b,
text_emb)` on normalised float32 images. `b` is a dynamic dimension. Each graph is traced with a
symbolic batch and converted by inference/jaxpr_onnx.py, the model's weights becoming
initializers; the graph's metadata (`metadata_props`) holds its kind, prompts and threshold
(and `segchange.prompt_batch` P of a `--prompt_batch P` export, whose graphs take prompt int32
[b, P] / text_emb [b, P, T, L] and return probabilities [b, S, S, P]: inference/bundle.py).
The rest of the folder (variables, prompts, signature, README) is the bundle's.
`README_EXAMPLE` is the README's code block, the same for every ONNX bundle.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from segchange_jax import jax_compat
from segchange_jax.inference import bundle
from segchange_jax.inference import jaxpr_onnx

OPSET = jaxpr_onnx.OPSET
FORMAT = bundle.BundleFormat(
    name='onnx', title='ONNX', model_file='model.onnx', runtime='onnxruntime',
    imports=('import onnxruntime as ort',),
    load="model = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])",
    call="model.run(None, {'image_a': a, 'image_b': b, 'prompt': prompt})",
    raw_call=("model.run(None, {'image_a': image_a, 'image_b': image_b, "
              "'text_emb': text_emb})[0]"),
    notes=('`model.onnx` is opset {opset}, checked with onnxruntime {onnxruntime_tested}. '
           'Whole scenes through the same windowed engine as the JAX model: '
           '`python -m segchange_jax.infer --backend onnxruntime --checkpoint DIR --a A.tif '
           '--b B.tif --out change.tif`.'))
MODEL_FILE = FORMAT.model_file
EMBEDDINGS_FILE = bundle.embeddings_file(MODEL_FILE)
INPUT_NAMES = bundle.INPUT_NAMES
OUTPUT_NAME = bundle.OUTPUT_NAME
# The README's python block of every (uint8) ONNX bundle: numpy, PIL and onnxruntime only.
README_EXAMPLE = bundle.example_code(FORMAT)
save = jaxpr_onnx.save


class OnnxExportError(jaxpr_onnx.ConversionError):
  """The model cannot be exported as asked; the message names the flag (or, from the
  converter, the primitive)."""


def to_onnx(fn, consts: Sequence[Any], inputs: dict[str, Any], output_names: Sequence[str],
            opset: int = OPSET):
  """(ModelProto, {op: count}) of `fn(consts, *inputs)` (a `bundle.graph_function`)."""
  return jaxpr_onnx.to_onnx(fn, inputs, [np.asarray(x, np.float32) for x in consts],
                            list(output_names), opset=opset, graph_name='segchange',
                            producer_name='segchange_jax',
                            linear_dim=jax_compat.linear_symbolic_dim)


def convert(config, variables: dict, size: int, opset: int = OPSET, kind: str = bundle.RAW,
            table=None, prompt_batch: int | None = None):
  """ONNX ModelProto of a bundle graph (`bundle.make_graph`), batch dynamic ('b'): by
  default the RAW one, (image_a, image_b, text_emb) -> logits; `table` [N, T, L]: the prompt
  table of a PROMPT graph; `prompt_batch` P: P prompts per image pair.

  Returns (model, report) where report counts the ONNX ops emitted.
  """
  graph = bundle.make_graph(config, variables, kind, size, table, error=OnnxExportError,
                            prompt_batch=prompt_batch)
  return to_onnx(graph.fn, graph.consts, graph.inputs, graph.output_names, opset)


def set_metadata(proto, kind: str, prompts: Sequence[str], threshold: float,
                 prompt_batch: int | None = None) -> None:
  """Graph metadata that makes a model file self-describing for `onnx_runtime.OnnxDetector`."""
  import onnx  # pylint: disable=g-import-not-at-top
  props = {'segchange.kind': kind, 'segchange.prompts': json.dumps(list(prompts)),
           'segchange.threshold': repr(float(threshold))}
  if prompt_batch is not None:
    props['segchange.prompt_batch'] = str(int(prompt_batch))
  onnx.helper.set_model_props(proto, props)


def write_bundle(out: str, config, variables: dict, prompts: Sequence[str] | None = None,
                 embeddings: str | None = None, size: int | None = None,
                 overwrite: bool = False, raw_inputs: bool = False,
                 card: dict[str, Any] | None = None,
                 prompt_batch: int | None = None) -> dict[str, Any]:
  """Writes a bundle (inference/bundle.py) with model.onnx (and, unless `raw_inputs`,
  model_embeddings.onnx); returns the signature dict. `card`: the checkpoint's model card;
  `prompt_batch` P: graphs taking P prompts per image pair."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  def write_model(path: str, graph: bundle.Graph) -> dict[str, Any]:
    proto, ops = to_onnx(graph.fn, graph.consts, graph.inputs, graph.output_names)
    set_metadata(proto, graph.kind, graph.prompts, graph.threshold, graph.prompt_batch)
    nbytes = save(proto, path)
    return {'opset': OPSET, 'bytes': nbytes, 'onnx_ops': ops,
            'onnxruntime_tested': onnxruntime.__version__}

  return bundle.write(out, config, variables, FORMAT, write_model, prompts, embeddings, size,
                      overwrite, error=OnnxExportError, raw_inputs=raw_inputs, card=card,
                      prompt_batch=prompt_batch)
