r"""Export bundles: the one folder layout of every export format, checked and written here.

  python -m segchange_jax.export [--format stablehlo|onnx] --checkpoint CKPT --out DIR

A bundle DIR holds:
- `variables/` + `config.json`: the model for segchange_jax
  (`inference.predictor.ChangeDetector.from_checkpoint(DIR)`).
- `prompts.npz`: `prompts` [P] str and `embeddings` [P, T, L] float32 (the embed_prompts
  format), from --prompts (encoded with the config's text encoder), --embeddings, or
  config.data.prompt.
- the format's model files, weights inside, so the format's runtime alone runs them. By
  default two graphs (ONNX has no optional inputs, so the two prompt forms are two files rather
  than one graph with an optional input):
  - `BundleFormat.model_file` (`PROMPT`): `probabilities, mask = f(image_a, image_b, prompt)`:
    uint8 RGB images [b, S, S, 3] (the normalisation of `segchange_jax.data.imagery.normalize`
    is inside the graph), `prompt` int32 [b], a row of the bundle's prompt table (a constant of
    the graph: the rows of `prompts.npz`);
  - `embeddings_file(model_file)` (`EMBEDDINGS`): the same with `text_emb` float32 [b, T, L]
    in place of `prompt`, for prompts outside the table.
  Both return `probabilities` float32 [b, S, S, K] (sigmoid for K = 1, softmax otherwise) and
  `mask` uint8 [b, S, S] (`probabilities[..., 0] > threshold`, the config's infer.threshold, for
  K = 1; argmax otherwise). With `raw_inputs` (`--raw_inputs`) one graph (`RAW`) instead:
  `logits = f(image_a, image_b, text_emb)` on ImageNet-normalised float32 images, for users
  who normalise themselves.
  With `prompt_batch` P (`--prompt_batch P`) every graph answers P prompts per image pair in
  one pass (models/segchange.py): `prompt` int32 [b, P] (P rows of the table), `text_emb`
  float32 [b, P, T, L]; `probabilities` float32 [b, S, S, P] (K = 1; [b, S, S, P, K]
  otherwise), `mask` uint8 [b, S, S, P], the RAW graph's `logits` [b, S, S, P] ([b, S, S, P,
  K]). Prompt p's outputs are those of the one-prompt graph for that prompt. Fewer prompts run
  padded to P (inference/onnx_runtime.py repeats the first and drops the padding's outputs).
- `signature.json` (`signature`): each graph's inputs and outputs, normalisation, decision
  rule, threshold, prompts (and `prompt_batch` P for a `--prompt_batch` export).
- `model_card.json` + `MODEL_CARD.md`: the exported checkpoint's model card (train/model_card.py:
  code, config, data fingerprint, metrics, ...) with the export settings added (`export_card`).
- `README.md` (`readme`): how to load and call the model file with its runtime alone (a python
  block that runs as written from DIR: `example_code`), the inputs and outputs, the prompt table
  and the decision rule.

An export format is a `BundleFormat` plus a function that writes its model file; `write` does
the rest. The two there are: inference/export.py (StableHLO) and inference/onnx_export.py (ONNX);
the command picks one from `segchange_jax.export.FORMATS`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from segchange_jax import atomic
from segchange_jax import config_lib

PROMPTS_FILE = 'prompts.npz'
SIGNATURE_FILE = 'signature.json'
README_FILE = 'README.md'
FUNCTION = 'logits = f(image_a, image_b, text_emb)'
INPUT_NAMES = ('image_a', 'image_b', 'text_emb')
OUTPUT_NAME = 'logits'
# Graph kinds (module docstring): the inputs each takes and the outputs of the uint8 graphs.
PROMPT, EMBEDDINGS, RAW = 'prompt', 'embeddings', 'raw'
GRAPH_INPUTS = {PROMPT: ('image_a', 'image_b', 'prompt'),
                EMBEDDINGS: ('image_a', 'image_b', 'text_emb'), RAW: INPUT_NAMES}
OUTPUT_NAMES = ('probabilities', 'mask')
FUNCTIONS = {PROMPT: 'probabilities, mask = f(image_a, image_b, prompt)',
             EMBEDDINGS: 'probabilities, mask = f(image_a, image_b, text_emb)', RAW: FUNCTION}


class BundleError(ValueError):
  """The bundle cannot be written as asked; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class BundleFormat:
  """What a bundle's signature and README say about its model file.

  `imports`: the import lines the README code needs besides numpy and PIL; `load`: python
  lines (run from the bundle folder) that load `model_file` as `model`; `call`: a python
  expression of `model`, `a`, `b` (uint8 [1, S, S, 3]) and `prompt` (int32 [1]) that gives
  `probabilities, mask` as numpy arrays; `raw_call`: one of `model`, `image_a`, `image_b`,
  `text_emb` (the `--raw_inputs` graph) that gives the logits; `notes`: a README paragraph,
  formatted with the signature.
  """
  name: str
  title: str
  model_file: str
  runtime: str
  imports: tuple[str, ...]
  load: str
  call: str
  raw_call: str
  notes: str = ''


@dataclasses.dataclass(frozen=True)
class Graph:
  """One model file's function, as `write` hands it to a format's `write_model`.

  `fn(consts, *inputs)` (`graph_function`) with `inputs`: name -> jax.ShapeDtypeStruct (batch
  symbolic 'b', `graph_specs`), returning `output_names` in order; `kind`: PROMPT, EMBEDDINGS or
  RAW; `prompts` and `threshold`: the bundle's, for the file's own metadata; `prompt_batch`:
  P for a graph answering P prompts per pair, None for the one-prompt graph.
  """
  kind: str
  fn: Callable[..., Any]
  consts: Sequence[Any]
  inputs: dict[str, Any]
  output_names: tuple[str, ...]
  prompts: tuple[str, ...]
  threshold: float
  prompt_batch: int | None = None


def check_args(out: str, size: int | None, prompts: Sequence[str] | None = None,
               embeddings: str | None = None, overwrite: bool = False,
               inputs: Sequence[str] = (), error: type[Exception] = BundleError,
               prompt_batch: int | None = None) -> None:
  """Refuses, before anything slow: `out` naming an input or an existing non-empty folder
  (without `overwrite`), a size (None: the config's) off the model stride, both prompt
  sources, and a prompt batch (None: one prompt) below 1."""
  atomic.check_output_dir(out, inputs, overwrite)
  if size is not None:
    config_lib.check_stride(size, '--size', error)
  if prompts and embeddings:
    raise error('give --prompts or --embeddings, not both')
  check_prompt_batch(prompt_batch, error)


def check_prompt_batch(prompt_batch: int | None, error: type[Exception] = BundleError) -> None:
  """Refuses a prompt batch that is not a positive integer (None: the one-prompt graphs)."""
  if prompt_batch is None:
    return
  if isinstance(prompt_batch, bool) or not isinstance(prompt_batch, (int, np.integer)):
    raise error(f'--prompt_batch={prompt_batch!r} must be an integer (prompts per image pair)')
  if prompt_batch < 1:
    raise error(f'--prompt_batch={prompt_batch} must be >= 1 (prompts per image pair; leave it '
                'out for the one-prompt graphs)')


def embeddings_file(model_file: str) -> str:
  """File of the EMBEDDINGS graph beside `model_file` (model.onnx -> model_embeddings.onnx)."""
  root, ext = os.path.splitext(model_file)
  return f'{root}_embeddings{ext}'


def graph_files(fmt: BundleFormat, raw_inputs: bool = False) -> dict[str, str]:
  """{model file: graph kind} of a bundle (module docstring), the main file first."""
  if raw_inputs:
    return {fmt.model_file: RAW}
  return {fmt.model_file: PROMPT, embeddings_file(fmt.model_file): EMBEDDINGS}


def graph_specs(config, size: int, kind: str, prompt_batch: int | None = None
                ) -> dict[str, Any]:
  """{input name: jax.ShapeDtypeStruct} of a graph of `kind`, batch symbolic 'b'; with
  `prompt_batch` P the prompt inputs gain a P axis after the batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  (b,) = jax.export.symbolic_shape('b')
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32 if kind == RAW else jnp.uint8)
  per_pair = (b,) if prompt_batch is None else (b, int(prompt_batch))
  text = jax.ShapeDtypeStruct(
      (*per_pair, int(config.text.max_tokens), int(config.text.dim)), jnp.float32)
  third = jax.ShapeDtypeStruct(per_pair, jnp.int32) if kind == PROMPT else text
  return dict(zip(GRAPH_INPUTS[kind], (image, image, third)))


def graph_function(config, variables: dict, kind: str, table: np.ndarray | None = None):
  """(fn, consts): the function a model file holds, `fn(consts, *inputs)` with the inputs of
  `graph_specs(config, size, kind[, prompt_batch])`, and the variables' leaves (float32
  numpy) as `consts`.

  RAW gives the logits; PROMPT and EMBEDDINGS (uint8 images, normalised as
  `segchange_jax.data.imagery.normalize` does) give (probabilities, mask) with the config's
  infer.threshold. PROMPT picks its text embedding from `table` [N, T, L] (a constant of the
  graph); an index outside 0..N-1 gives a NaN embedding, hence NaN probabilities. Prompt
  inputs with a prompt axis ([b, P] indices, [b, P, T, L] embeddings) give the model's P-prompt
  outputs: probabilities [b, S, S, P] (K = 1) or [b, S, S, P, K], mask [b, S, S, P].
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  model = segchange.build_model(config)
  leaves, tree = jax.tree.flatten(variables)
  k, threshold = int(config.model.num_classes), float(config.infer.threshold)
  if kind == PROMPT:
    if table is None or len(table) == 0:
      raise BundleError('a prompt-index graph needs a prompt table (--prompts or --embeddings)')
    table = np.asarray(table, np.float32)
  rows = 0 if table is None else len(table)

  def logits(lv, image_a, image_b, text_emb):
    v = jax.tree.unflatten(tree, lv)
    return model.apply(v, image_a, image_b, text_emb, train=False).astype(jnp.float32)

  def fn(lv, image_a, image_b, text):
    if kind == RAW:
      return logits(lv, image_a, image_b, text)
    if kind == PROMPT:
      valid = (text >= 0) & (text < rows)
      emb = jnp.take(table, jnp.clip(text, 0, rows - 1), axis=0, mode='clip')
      text = jnp.where(valid[..., None, None], emb, jnp.nan)
    y = logits(lv, imagery.normalize(image_a), imagery.normalize(image_b), text)
    if k == 1:
      probabilities = jax.nn.sigmoid(y)
      # One prompt: [b, S, S, 1] -> mask [b, S, S]; P prompts: [b, S, S, P] is the mask's shape.
      mask = (probabilities if text.ndim == 4 else probabilities[..., 0]) > threshold
    else:
      probabilities = jax.nn.softmax(y, axis=-1)
      mask = jnp.argmax(y, axis=-1)
    return probabilities, mask.astype(jnp.uint8)

  return fn, [np.asarray(x, np.float32) for x in leaves]


def make_graph(config, variables: dict, kind: str, size: int, table: np.ndarray | None = None,
               prompts: Sequence[str] = (), error: type[Exception] = BundleError,
               prompt_batch: int | None = None) -> Graph:
  """The `Graph` of kind `kind` for square inputs of `size` (a multiple of the model stride,
  else `error`): `graph_function`, `graph_specs` and the kind's output names together;
  `prompt_batch` P: the graph takes P prompts per image pair."""
  config_lib.check_stride(size, '--size', error)
  check_prompt_batch(prompt_batch, error)
  fn, consts = graph_function(config, variables, kind, table)
  return Graph(kind, fn, consts, graph_specs(config, size, kind, prompt_batch),
               (OUTPUT_NAME,) if kind == RAW else OUTPUT_NAMES, tuple(prompts),
               float(config.infer.threshold),
               None if prompt_batch is None else int(prompt_batch))


def _graph_io(kind: str, size: int, t: int, dim: int, k: int,
              prompt_batch: int | None = None) -> dict[str, Any]:
  image = {'shape': ['b', size, size, 3], 'dtype': 'float32' if kind == RAW else 'uint8'}
  per_pair = ['b'] if prompt_batch is None else ['b', int(prompt_batch)]
  third = ({'shape': per_pair, 'dtype': 'int32'} if kind == PROMPT
           else {'shape': [*per_pair, t, dim], 'dtype': 'float32'})
  inputs = dict(zip(GRAPH_INPUTS[kind], (image, dict(image), third)))
  # The model's shapes: one prompt keeps K (also for K = 1); P prompts drop it for K = 1.
  if prompt_batch is None:
    out, mask = ['b', size, size, k], ['b', size, size]
  else:
    out = ['b', size, size, int(prompt_batch)] + ([] if k == 1 else [k])
    mask = ['b', size, size, int(prompt_batch)]
  if kind == RAW:
    outputs = {OUTPUT_NAME: {'shape': out, 'dtype': 'float32'}}
  else:
    outputs = {'probabilities': {'shape': out, 'dtype': 'float32'},
               'mask': {'shape': mask, 'dtype': 'uint8'}}
  return {'function': FUNCTIONS[kind], 'inputs': inputs, 'outputs': outputs}


def signature(config, fmt: BundleFormat, size: int, text_shape: Sequence[int],
              prompts: Sequence[str], graphs: dict[str, tuple[str, dict[str, Any]]],
              prompt_batch: int | None = None) -> dict[str, Any]:
  """signature.json: each graph (`graphs`: file -> (kind, the format's own entries)), the main
  graph's inputs and outputs, normalisation, decision rule, threshold and prompts;
  `prompt_batch` (P prompts per pair) only for a `--prompt_batch` export."""
  from segchange_jax.data import imagery  # pylint: disable=g-import-not-at-top
  t, dim = (int(x) for x in text_shape)
  k = int(config.model.num_classes)
  main_kind, main_extra = graphs[fmt.model_file]
  raw = main_kind == RAW
  io = {f: {**_graph_io(kind, size, t, dim, k, prompt_batch), **extra}
        for f, (kind, extra) in graphs.items()}
  multi = prompt_batch is not None
  if raw:
    decision = ('change = sigmoid(logits[..., 0]) > threshold' if k == 1 and not multi else
                'change = sigmoid(logits) > threshold' if k == 1 else
                'class = argmax(logits, -1)')
  else:
    decision = ('mask = probabilities[..., 0] > threshold' if k == 1 and not multi else
                'mask = probabilities > threshold' if k == 1 else
                'mask = argmax(probabilities, -1)')
  extra = {} if not multi else {'prompt_batch': int(prompt_batch)}
  return {
      'function': FUNCTIONS[main_kind], 'format': fmt.name, 'file': fmt.model_file,
      'raw_inputs': raw, 'inputs': io[fmt.model_file]['inputs'],
      'outputs': io[fmt.model_file]['outputs'],
      'graphs': {f: {'kind': graphs[f][0], **v} for f, v in io.items()},
      'image_normalisation': {'scale': 1 / 255,
                              'mean': [round(float(v), 6) for v in imagery.IMAGENET_MEAN],
                              'std': [round(float(v), 6) for v in imagery.IMAGENET_STD],
                              'channels': 'RGB', 'in_graph': not raw},
      'decision': decision, 'decision_in_graph': not raw,
      'threshold': float(config.infer.threshold), 'prompts': list(prompts),
      'text_model': config.text.model, **extra, **main_extra}


def _classes(shape: Sequence[Any], multi: bool) -> int:
  """K of an output shape: [b, S, S, K] (one prompt), [b, S, S, P] or [b, S, S, P, K]."""
  return int(shape[4]) if len(shape) == 5 else 1 if multi else int(shape[3])


def _prompt_rows(prompt_batch: int, names: Sequence[str]) -> list[int]:
  """P table rows for a README example: each prompt once, then row 0 repeated as padding."""
  rows = list(range(min(prompt_batch, len(names))))
  return rows + [0] * (prompt_batch - len(rows))


def example_code(fmt: BundleFormat, prompt_batch: int | None = None,
                 names: Sequence[str] = ()) -> str:
  """The README's python block of a uint8 bundle: read a.png and b.png, run the model file with
  its runtime alone, save mask.png. The same text for every bundle of the format; with
  `prompt_batch` P (a `--prompt_batch` bundle whose table holds `names`) it asks for P rows
  and saves one mask_<p>.png per prompt."""
  imports = sorted(['import numpy as np', *fmt.imports])
  if prompt_batch is not None:
    rows = _prompt_rows(prompt_batch, names)
    used = min(prompt_batch, len(names))
    return (
        '\n'.join(imports) + '\nfrom PIL import Image\n\n'
        '# From the bundle folder: a.png, b.png show one place at two dates (RGB, the bundle '
        'size).\n'
        f'{fmt.load.strip()}\n'
        "a = np.asarray(Image.open('a.png').convert('RGB'))[None]  # uint8 [1, S, S, 3]\n"
        "b = np.asarray(Image.open('b.png').convert('RGB'))[None]\n"
        f'# [1, {prompt_batch}]: {prompt_batch} rows of the prompt table (signature.json '
        '"prompts"); fewer prompts: repeat a row and ignore its outputs.\n'
        f'prompt = np.array([{rows}], np.int32)\n'
        f'probabilities, mask = {fmt.call.strip()}\n'
        f'for p in range({used}):  # mask [1, S, S, {prompt_batch}]: one mask per prompt\n'
        "  Image.fromarray((mask[0, ..., p] > 0).astype(np.uint8) * 255).save(f'mask_{p}.png')\n")
  return (
      '\n'.join(imports) + '\nfrom PIL import Image\n\n'
      '# From the bundle folder: a.png, b.png show one place at two dates (RGB, the bundle size).\n'
      f'{fmt.load.strip()}\n'
      "a = np.asarray(Image.open('a.png').convert('RGB'))[None]  # uint8 [1, S, S, 3]\n"
      "b = np.asarray(Image.open('b.png').convert('RGB'))[None]\n"
      'prompt = np.array([0], np.int32)  # row 0 of the prompt table (signature.json "prompts")\n'
      f'probabilities, mask = {fmt.call.strip()}\n'
      "Image.fromarray((mask[0] > 0).astype(np.uint8) * 255).save('mask.png')  # white: change\n")


def _raw_code(fmt: BundleFormat, sig: dict[str, Any]) -> str:
  """The README's python block of a --raw_inputs bundle: normalise, call, decide."""
  size = sig['inputs']['image_a']['shape'][1]
  pb = sig.get('prompt_batch')
  out_shape = sig['outputs'][OUTPUT_NAME]['shape']
  k = _classes(out_shape, pb is not None)
  norm, thr, names = sig['image_normalisation'], sig['threshold'], sig['prompts']
  per = '' if pb is None else f', {pb}'
  if k == 1 and pb is None:
    decide = ('THRESHOLD = {thr!r}  # the config\'s infer.threshold\n'
              'change = 0.5 + 0.5 * np.tanh(0.5 * logits[..., 0]) > THRESHOLD  # sigmoid; '
              '[1, S, S] bool\n'
              ).format(thr=thr)
  elif k == 1:
    decide = ('THRESHOLD = {thr!r}  # the config\'s infer.threshold\n'
              'change = 0.5 + 0.5 * np.tanh(0.5 * logits) > THRESHOLD  # sigmoid; [1, S, S, {pb}] '
              'bool, one map per prompt\n').format(thr=thr, pb=pb)
  else:
    decide = f'classes = logits.argmax(-1)  # [1, S, S{per}] class id, 0 = no change\n'
  if pb is None:
    pick = ('prompts = np.load(\'prompts.npz\')\n'
            f'row = list(prompts[\'prompts\']).index({names[0]!r})\n'
            'text_emb = prompts[\'embeddings\'][row][None]  # [1, T, L]\n\n')
  else:
    pick = ('prompts = np.load(\'prompts.npz\')\n'
            f'# {pb} rows of the table (fewer prompts: repeat a row and ignore its outputs).\n'
            f'text_emb = prompts[\'embeddings\'][{_prompt_rows(pb, names)}][None]  '
            f'# [1, {pb}, T, L]\n\n')
  return (
      '\n'.join(sorted(['import numpy as np', *fmt.imports])) + '\n\n'
      f'{fmt.load.strip()}\n\n'
      f'MEAN = np.array({norm["mean"]}, np.float32)  # ImageNet, channels R, G, B\n'
      f'STD = np.array({norm["std"]}, np.float32)\n\n\n'
      'def normalise(rgb):\n'
      '  """uint8 RGB [H, W, 3] -> float32 [1, H, W, 3]."""\n'
      '  return ((rgb.astype(np.float32) * (1 / 255) - MEAN) / STD)[None]\n\n\n'
      f'# Two co-registered uint8 RGB images of {size} x {size} px (random here: use yours).\n'
      'rng = np.random.default_rng(0)\n'
      f'rgb_a = rng.integers(0, 256, ({size}, {size}, 3), dtype=np.uint8)\n'
      f'rgb_b = rng.integers(0, 256, ({size}, {size}, 3), dtype=np.uint8)\n\n'
      + pick +
      'image_a, image_b = normalise(rgb_a), normalise(rgb_b)\n'
      f'logits = {fmt.raw_call.strip()}  # {[1] + out_shape[1:]}\n' + decide)


def readme(fmt: BundleFormat, sig: dict[str, Any]) -> str:
  """README.md of a bundle with signature `sig`: what the model computes and how to run it."""
  raw = sig['raw_inputs']
  size = sig['inputs']['image_a']['shape'][1]
  graphs = sig['graphs']
  pb = sig.get('prompt_batch')
  multi = pb is not None
  emb_file = next((f for f, g in graphs.items() if g['kind'] == EMBEDDINGS), None)
  t, dim = (graphs[emb_file] if emb_file else sig)['inputs']['text_emb']['shape'][-2:]
  out_shape = next(iter(sig['outputs'].values()))['shape']
  k = _classes(out_shape, multi)
  shown = lambda shape: '[' + ', '.join(str(d) for d in shape) + ']'
  norm, thr, names = sig['image_normalisation'], sig['threshold'], sig['prompts']
  scale = '1 / 255' if norm['scale'] == 1 / 255 else repr(norm['scale'])
  normalise = (f'multiply by {scale}, subtract the ImageNet mean {norm["mean"]} and divide by '
               f'the ImageNet std {norm["std"]}, per channel')
  per = '' if not multi else f'{pb}, '
  text_emb = (f'float32 [b, {per}{t}, {dim}], '
              + ('a prompt embedding: one row' if not multi else
                 f'{pb} prompt embeddings per image pair: rows') +
              f' of `prompts.npz` (arrays `prompts` [P] str and `embeddings` [P, {t}, {dim}] '
              'float32) or, for other prompts, `python -m segchange_jax.embed_prompts` with the '
              f'text encoder `{sig["text_model"]}`')
  batch_note = '' if not multi else (
      f'\n\nThis bundle was exported with `--prompt_batch {pb}`: every call answers {pb} prompts '
      'per image pair in one pass (the image trunk runs once, the mask head for all prompts); '
      f'prompt p\'s outputs are at index p of the prompt axis. For fewer than {pb} prompts, '
      'repeat one and ignore its outputs; for more, re-export with a larger `--prompt_batch`.')
  if raw:
    if k == 1:
      rule = (f'change where `sigmoid(logits{"" if multi else "[..., 0]"}) > threshold`, '
              f'threshold = {thr!r} (the model config\'s `infer.threshold`)'
              + (', one map per prompt' if multi else ''))
    else:
      rule = '`class = argmax(logits, -1)` (0: no change; class ids as in training)'
    intro = (f'`{fmt.model_file}` computes `{FUNCTION}` on normalised float images (exported '
             'with `--raw_inputs`; without it the bundle takes uint8 images and returns '
             'probabilities and the mask)')
    inputs = (
        f'- `image_a`, `image_b`: float32 [b, {size}, {size}, 3] (NHWC; `b` is any batch '
        f'size). From uint8 images in channel order {", ".join(norm["channels"])}: '
        f'{normalise}.\n'
        f'- `text_emb`: {text_emb}, repeated over the batch. This bundle holds '
        f'{", ".join(repr(n) for n in names)}.\n'
        f'- `logits`: float32 {shown(out_shape)}.\n\n'
        f'Decision rule: {rule}.\n\n')
    how = 'From the bundle folder:'
    code = _raw_code(fmt, sig)
  else:
    if k == 1:
      rule = (f'`mask = probabilities{"" if multi else "[..., 0]"} > threshold`, threshold = '
              f"{thr!r} (the model config's `infer.threshold`)")
    else:
      rule = '`mask = argmax(probabilities, -1)` (0: no change; class ids as in training)'
    table = ', '.join(f'{i} = {n!r}' for i, n in enumerate(names))
    intro = (f'`{fmt.model_file}` computes `{FUNCTIONS[PROMPT]}`: the change between two '
             'co-registered images of one place, steered by a text prompt from the '
             "bundle's prompt table. The image normalisation, the prompt table and the "
             f'decision rule are inside the file; `{emb_file}` is the same model taking the '
             'prompt as an embedding `text_emb` in place of `prompt`, for prompts outside the '
             'table (ONNX has no optional inputs, hence two files)')
    mask_shape = sig['outputs']['mask']['shape']
    inputs = (
        f'- `image_a`, `image_b`: uint8 [b, {size}, {size}, 3], channels '
        f'{", ".join(norm["channels"])} as read from the image files (NHWC; `b` is any batch '
        f'size). The graph normalises them: {normalise}.\n'
        + (f'- `prompt` (`{fmt.model_file}`): int32 [b], a row of the prompt table: {table} '
           if not multi else
           f'- `prompt` (`{fmt.model_file}`): int32 [b, {pb}], {pb} rows of the prompt table '
           f'per image pair: {table} ') +
        '(`signature.json` "prompts", `prompts.npz`); an index outside the table gives NaN '
        'probabilities.\n'
        f'- `text_emb` (`{emb_file}`): {text_emb}.\n'
        f'- `probabilities`: float32 {shown(out_shape)}, '
        + ('sigmoid of the logits' if k == 1 else 'softmax of the logits over the classes')
        + '.\n'
        f'- `mask`: uint8 {shown(mask_shape)}, ' + ('1 = change, 0 = no change' if k == 1 else
                                                   'class id, 0 = no change') + '.\n\n'
        f'Decision rule (in the graph): {rule}.\n\n')
    how = (f'From the bundle folder, with two RGB images of {size} x {size} px saved as '
           '`a.png` and `b.png`; it writes '
           + ('`mask.png`:' if not multi else 'one `mask_<p>.png` per prompt:'))
    code = example_code(fmt, pb, names)
  notes = fmt.notes.format_map(sig).strip()
  return (
      f'# SegChange change detector: {fmt.title} bundle\n\n'
      f'{intro}. The weights are inside the file, so {fmt.runtime} and numpy alone run it '
      f'(no segchange_jax, no model code).{batch_note}\n\n'
      '## Inputs and outputs\n\n' + inputs +
      f'## Load and call ({fmt.runtime} alone)\n\n'
      f'{how}\n\n'
      f'```python\n{code}```\n\n'
      + (f'{notes}\n\n' if notes else '') +
      '## Other files\n\n'
      '- `signature.json`: the same facts as JSON (each graph\'s inputs and outputs, '
      'normalisation, decision, threshold, prompts' + (', prompt_batch' if multi else '') +
      ').\n'
      '- `variables/` + `config.json`: the same model for segchange_jax: '
      "`ChangeDetector.from_checkpoint('DIR')` (segchange_jax.inference.predictor); whole "
      'scenes: `python -m segchange_jax.infer --checkpoint DIR --a A.tif --b B.tif --out '
      'change.tif`.\n')


def write(out: str, config, variables: dict, fmt: BundleFormat,
          write_model: Callable[..., dict[str, Any]],
          prompts: Sequence[str] | None = None, embeddings: str | None = None,
          size: int | None = None, overwrite: bool = False,
          error: type[Exception] = BundleError, raw_inputs: bool = False,
          card: dict[str, Any] | None = None,
          prompt_batch: int | None = None) -> dict[str, Any]:
  """Writes the bundle (module docstring) and returns its signature.

  `card`: the model card of the exported checkpoint (`checkpoints.read_card`), copied into the
  bundle with the export settings added (`export_card`). `prompt_batch` P: graphs answering P
  prompts per image pair (`--prompt_batch`); None: the one-prompt graphs.

  `write_model(path, graph)` writes one model file holding the `Graph` `graph` and returns
  the signature entries of its own (platforms, opset, ...); it is called once per graph
  (`graph_files`). The folder is assembled under a
  temporary name beside `out` and renamed when complete; an existing bundle is replaced only
  with `overwrite`.
  """
  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  size = int(size or config.infer.window)
  check_args(out, size, prompts, embeddings, overwrite, error=error,
             prompt_batch=prompt_batch)
  names, emb = prompts_lib.embed(config, prompts or None, npz=embeddings)
  with atomic.atomic_dir(out) as tmp:
    checkpoints.save_variables(tmp, config, variables)
    prompts_lib.write_npz(os.path.join(tmp, PROMPTS_FILE), names, emb, '', config.text.model)
    graphs = {}
    for name, kind in graph_files(fmt, raw_inputs).items():
      graph = make_graph(config, variables, kind, size, emb, names, error, prompt_batch)
      try:
        graphs[name] = (kind, write_model(os.path.join(tmp, name), graph))
      except OverflowError as e:  # a shape product past int32 while tracing the graph
        raise error(f'--size {size} is too large to export ({e}); export the window size '
                    'you infer with (--size 512, say): whole scenes run window by window') from e
    sig = signature(config, fmt, size, emb.shape[1:], names, graphs, prompt_batch)
    with open(os.path.join(tmp, SIGNATURE_FILE), 'w') as f:
      json.dump(sig, f, indent=2)
    with open(os.path.join(tmp, README_FILE), 'w') as f:
      f.write(readme(fmt, sig))
    checkpoints.write_card(tmp, export_card(card, config, sig))
  return sig


def export_card(card: dict[str, Any] | None, config, sig: dict[str, Any]) -> dict[str, Any]:
  """The bundle's model card: the checkpoint's `card` plus an 'export' entry (format, files,
  size, prompts, threshold, the exporting code). Without a card (a convert_torch output, an
  upstream .pth, a checkpoint older than cards) a card of the export alone: config and code,
  no data or metrics."""
  from segchange_jax.interop import checkpoints  # pylint: disable=g-import-not-at-top
  if card is None:
    card = {'schema': checkpoints.CARD_SCHEMA, 'version': checkpoints.CARD_VERSION,
            'code': None, 'config': json.loads(config.to_json_best_effort()), 'data': None,
            'metrics': {}, 'seed': None, 'training': None, 'checkpoint': None,
            'hardware': None}
  card = copy.deepcopy(card)
  card['export'] = {
      'format': sig['format'], 'file': sig['file'], 'files': sorted(sig.get('graphs', {})),
      'raw_inputs': sig.get('raw_inputs', False), 'size': sig['inputs']['image_a']['shape'][1],
      'prompts': sig['prompts'], 'threshold': sig['threshold'],
      'code': checkpoints.code_version()}
  if 'prompt_batch' in sig:
    card['export']['prompt_batch'] = sig['prompt_batch']
  return card


def load_prompts(directory: str) -> dict[str, np.ndarray]:
  """{prompt: embedding [T, L]} from the bundle's prompts.npz."""
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  return cache.load_npz(os.path.join(directory, PROMPTS_FILE))[0]
