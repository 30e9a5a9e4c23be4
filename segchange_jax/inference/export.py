"""StableHLO export: the model as serialized `jax.export` modules inside a bundle.

`model.stablehlo` holds `probabilities, mask = f(image_a, image_b, prompt)` (uint8 images, the
normalisation, the prompt table and the threshold inside) and `model_embeddings.stablehlo` the
same with `text_emb` in place of `prompt` (inference/bundle.py says why two files); with
`raw_inputs` one file, `logits = f(image_a, image_b, text_emb)` on normalised float images.
The batch `b` is symbolic and the weights are closed-over constants, so jax alone runs a file
(no params, no model code). With `prompt_batch` P (`--prompt_batch P`) each file answers P
prompts per image pair in one pass (prompt int32 [b, P] / text_emb [b, P, T, L] ->
probabilities [b, S, S, P]; inference/bundle.py). Each file is as large as the weights,
and a serialized module must stay under 2 GB. The rest of the bundle (variables, prompts,
signature, README) is inference/bundle.py's.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from segchange_jax.inference import bundle

FORMAT = bundle.BundleFormat(
    name='stablehlo', title='StableHLO (jax.export)', model_file='model.stablehlo',
    runtime='jax', imports=('import jax',),
    load=("with open('model.stablehlo', 'rb') as f:\n"
          "  model = jax.export.deserialize(bytearray(f.read()))"),
    call='map(np.asarray, model.call(a, b, prompt))',
    raw_call='np.asarray(model.call(image_a, image_b, text_emb))',
    notes=('The module is lowered for the platforms {platforms} (jax {jax_version}); '
           '`jax.export.deserialize` needs a jax at least as new as the one that wrote it.'))
MODEL_FILE = FORMAT.model_file


class ExportError(bundle.BundleError):
  """The bundle cannot be written as asked; the message names the flag and the fix."""


def export_function(fn, consts: Sequence[Any], inputs: dict[str, Any],
                    platforms: Sequence[str] | None = None):
  """`jax.export.Exported` of `fn(consts, *inputs)` with `consts` closed over (constants in the
  module, so the artefact needs no params); `inputs`: name -> jax.ShapeDtypeStruct."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  closed = [jnp.asarray(c) for c in consts]
  return jax.export.export(jax.jit(lambda *xs: fn(closed, *xs)), platforms=platforms)(
      *inputs.values())


def export_forward(config, variables: dict, size: int,
                   platforms: Sequence[str] | None = None, kind: str = bundle.RAW,
                   table=None, prompt_batch: int | None = None):
  """`jax.export.Exported` of a bundle graph (`bundle.make_graph`), batch symbolic `b`:
  by default the RAW one, (image_a, image_b, text_emb) -> logits; `prompt_batch` P: text_emb
  [b, P, T, L] -> logits [b, S, S, P] (K = 1)."""
  graph = bundle.make_graph(config, variables, kind, size, table, error=ExportError,
                            prompt_batch=prompt_batch)
  return export_function(graph.fn, graph.consts, graph.inputs, platforms)


def load_exported(directory: str, file: str = MODEL_FILE):
  """The bundle's deserialized `jax.export.Exported` (`file`: model.stablehlo, or
  model_embeddings.stablehlo); call it with `.call(a, b, prompt)` (`.call(a, b, text_emb)`)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; create the bundle with '
                            'python -m segchange_jax.export --checkpoint CKPT --out DIR')
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def write_bundle(out: str, config, variables: dict, prompts: Sequence[str] | None = None,
                 embeddings: str | None = None, size: int | None = None,
                 platforms: Sequence[str] | None = ('cpu', 'cuda'),
                 overwrite: bool = False, raw_inputs: bool = False,
                 card: dict[str, Any] | None = None,
                 prompt_batch: int | None = None) -> dict[str, Any]:
  """Writes a bundle (inference/bundle.py) with model.stablehlo (and, unless `raw_inputs`,
  model_embeddings.stablehlo); returns the signature dict. `card`: the checkpoint's model card;
  `prompt_batch` P: graphs taking P prompts per image pair."""

  def write_model(path: str, graph: bundle.Graph) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top
    # Outputs in graph.output_names order: a tuple (probabilities, mask), or the logits alone.
    exported = export_function(graph.fn, graph.consts, graph.inputs, platforms)
    with open(path, 'wb') as f:
      f.write(exported.serialize())
    return {'platforms': list(exported.platforms), 'jax_version': jax.__version__,
            'bytes': os.path.getsize(path)}

  return bundle.write(out, config, variables, FORMAT, write_model, prompts, embeddings, size,
                      overwrite, error=ExportError, raw_inputs=raw_inputs, card=card,
                      prompt_batch=prompt_batch)
