"""The whole SegChange-R1 model: siamese backbone -> unify -> BEV -> difference -> neck -> head.

Inputs are NHWC ImageNet-normalised images; text embeddings [B, T, L]; output logits
[B, H, W, num_classes] (float32). Several prompts per pair: text [B, P, T, L] -> logits
[B, H, W, P] (num_classes 1) or [B, H, W, P, num_classes], in one pass: everything before the
mask head runs once per pair, the head once for all P prompts (models/head.py).
"""

from __future__ import annotations

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segchange_jax.models import backbones
from segchange_jax.models import bev as bev_lib
from segchange_jax.models import diff as diff_lib
from segchange_jax.models import head as head_lib
from segchange_jax.models import kernels
from segchange_jax.models import layers
from segchange_jax.models import neck as neck_lib
from segchange_jax.models import prompt_film
from segchange_jax.models import prompt_readout
from segchange_jax.models import torch_rules as tc

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class SegChangeModel(nn.Module):
  """`model_cfg` is the config's `model` section (frozen, so the module stays hashable).

  `text_emb` [B, T, L]: one prompt per pair, logits [B, H, W, K] (upstream's model, same
  numbers). [B, P, T, L]: P prompts per pair, logits [B, H, W, P] for K = 1 and
  [B, H, W, P, K] otherwise; prompt p's logits are those of a call with text_emb[:, p]. The
  backbone, BEV, difference and neck run once per pair and the head's prompt-independent part
  once; in train mode too (the head has no BatchNorm; see head.MaskHead for its dropout).
  """
  model_cfg: ml_collections.FrozenConfigDict
  text_dim: int = 768

  @nn.compact
  def __call__(self, image_a: jax.Array, image_b: jax.Array, text_emb: jax.Array,
               train: bool = False) -> jax.Array:
    m = self.model_cfg
    dtype = _DTYPES[m.dtype]
    if image_a.shape != image_b.shape:
      raise ValueError(f'image_a {image_a.shape} and image_b {image_b.shape} must have one shape')
    if text_emb.ndim not in (3, 4):
      raise ValueError(f'text embeddings {text_emb.shape} must be [B, T, L] (one prompt per '
                       'pair) or [B, P, T, L] (P prompts per pair)')
    if text_emb.shape[-1] != self.text_dim:
      raise ValueError(f'text embeddings have width {text_emb.shape[-1]}, the model expects '
                       f'text.dim={self.text_dim}')
    b = image_a.shape[0]
    if text_emb.shape[0] != b:
      raise ValueError(f'text embeddings {text_emb.shape} are for {text_emb.shape[0]} pairs, '
                       f'the images for {b}: give one row per pair')
    if text_emb.ndim == 4 and text_emb.shape[1] == 0:
      raise ValueError(f'text embeddings {text_emb.shape} hold no prompt (P = 0)')
    backbone = backbones.build_backbone(m, dtype=dtype, name='backbone')
    if train and backbones.backbone_uses_batch_stats(m):
      # Two calls, as upstream: BatchNorm sees each time's batch separately (stats updated twice).
      fa, fb = backbone(image_a, train=True), backbone(image_b, train=True)
      feats = [jnp.concatenate([x, y], 0) for x, y in zip(fa, fb)]
    else:
      # Same weights and per-example maths: one call on the stacked pair (twice the rows per
      # matmul, half the ops; dropout / drop-path masks are drawn for the 2B examples at once).
      feats = backbone(jnp.concatenate([image_a, image_b], 0), train=train)
    out = []
    for i, (f, dim) in enumerate(zip(feats, m.out_dims)):
      f = layers.dense(dim, dtype, f'conv_list_{i}')(f)
      # BEV has no batch statistics: both times in one call.
      # `train` positional: remat's static argument.
      out.append(bev_lib.build_bev(m, dim, dtype, f'bev_{i}')(f, train))
    diffs = diff_lib.FeatureDiff(m.diff_attention, dtype, m.get('remat', 'none'),
                                 name='feature_diff')(
        [f[:b] for f in out], [f[b:] for f in out], train)
    head = head_lib.build_head(m, dtype, 'mask_head')
    signed, where = None, diff_lib.signed_difference_of(m)
    if where == 'map':
      (signed,) = diff_lib.SignedDifference(
          (m.token_dim if m.use_token_connector else m.fpn_dim,), dtype,
          name='signed_difference')([out[0][:b]], [out[0][b:]])
    elif where == 'scales':
      signed_diffs = diff_lib.SignedDifference(tuple(m.out_dims), dtype, name='signed_difference')(
          [f[:b] for f in out], [f[b:] for f in out])
      diffs = [d + s.astype(d.dtype) for d, s in zip(diffs, signed_diffs)]
    if not prompt_film.conditions_neck(prompt_film.conditioning_of(m)):
      neck_map = _with_direction(neck_lib.build_neck(m, dtype, 'fpn')(diffs, train), signed, 1)
      return head(neck_map, text_emb, train)
    # The prompt acts inside the neck: neck and head run once per (pair, prompt), as a batch of
    # B * P maps (row b * P + p), each with its own prompt.
    multi = text_emb.ndim == 4
    p = text_emb.shape[1] if multi else 1
    text = text_emb.reshape(b * p, *text_emb.shape[-2:])
    film = prompt_film.PromptFiLM((m.fpn_dim,) * len(diffs), dtype=dtype,
                                  name='prompt_film_neck')(text)
    diffs = [jnp.repeat(d, p, axis=0) for d in diffs]
    neck_map = _with_direction(neck_lib.build_neck(m, dtype, 'fpn')(diffs, train, film), signed, p)
    y = head(neck_map, text, train)
    if not multi:
      return y
    y = jnp.moveaxis(y.reshape(b, p, *y.shape[1:]), 1, 3)   # [B, H, W, P, K]
    return y[..., 0] if m.num_classes == 1 else y


def _with_direction(neck_map: layers.DeferredDense, signed: jax.Array | None,
                    repeats: int) -> layers.DeferredDense:
  """The neck's map plus the upsampled signed difference (config.model.signed_difference),
  added before the map's deferred 1x1 conv; rows repeated for a neck run per prompt."""
  if signed is None:
    return neck_map
  if repeats > 1:
    signed = jnp.repeat(signed, repeats, axis=0)
  up = kernels.upsample_bilinear_sum([signed], [neck_map.x.shape[1] // signed.shape[1]])
  return neck_map._replace(x=neck_map.x + up.astype(neck_map.x.dtype))


def build_model(config: ml_collections.ConfigDict) -> SegChangeModel:
  """The model for a full config (uses `config.model` and `config.text.dim`)."""
  return SegChangeModel(ml_collections.FrozenConfigDict(config.model), int(config.text.dim))


def init_variables(model: SegChangeModel, rng: jax.Array, image_size: int = 64,
                   batch: int = 1, text_tokens: int = 8) -> dict:
  """Initialises all collections with a small dummy input (shapes do not depend on it)."""
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  t = jnp.zeros((batch, text_tokens, model.text_dim), jnp.float32)
  return model.init(rng, x, x, t, train=False)


def variable_shapes(model: SegChangeModel, image_size: int = 64) -> dict:
  """`jax.eval_shape` of every variable (no compute, no memory)."""
  return jax.eval_shape(lambda r: init_variables(model, r, image_size), jax.random.PRNGKey(0))


def torch_mapping(config: ml_collections.ConfigDict):
  """(rules, aliases, ignore) mapping upstream `ChangeModel.state_dict()` onto our variables."""
  m = config.model
  rules, aliases, ignore = backbones.backbone_torch_mapping(m, ('backbone',))
  rules = list(rules)
  for i in range(len(m.out_dims)):
    rules += layers.conv1x1_rules(f'dual_encoder.conv_list.{i}', (f'conv_list_{i}',))
    rules += bev_lib.torch_rules(f'dual_encoder.bev.{i}', (f'bev_{i}',), m)
  rules += diff_lib.torch_rules('feature_diff', ('feature_diff',), m)
  rules += neck_lib.torch_rules('fpn', ('fpn',), m)
  rules += head_lib.torch_rules('mask_head', ('mask_head',), m, int(config.text.dim))
  return rules, dict(aliases), list(ignore) + [r'.*num_batches_tracked$']


def load_torch_state_dict(config: ml_collections.ConfigDict, state_dict, source: str = 'checkpoint',
                          image_size: int = 64) -> dict:
  """Upstream state_dict (numpy values) -> our variables, every problem listed in one error.

  Modules upstream has no counterpart for (_ADDED: the prompt conditioning and the signed
  difference) are converted without, then added at their start. FiLM after the GroupNorms
  ('film_head', 'film_neck') and the signed difference then leave upstream's logits unchanged;
  'dynamic_head' does not (the head's maps lose the prompt's gain): such a conversion is a start
  for fine-tuning.
  """
  rules, aliases, ignore = torch_mapping(config)
  expected = traverse_util.flatten_dict(variable_shapes(build_model(config), image_size))
  added = {path: {k[len(path):]: v for k, v in expected.items() if k[:len(path)] == path}
           for path in _ADDED}
  upstream = {k: v for k, v in expected.items()
              if not any(k[:len(path)] == path for path in _ADDED)}
  variables = tc.convert(tc.strip_prefixes(state_dict), rules,
                         expected=traverse_util.unflatten_dict(upstream), ignore=ignore,
                         aliases=aliases, source=source)
  flat = traverse_util.flatten_dict(variables, keep_empty_nodes=True)
  for path, shapes in added.items():
    if shapes:
      start = _ADDED[path](traverse_util.unflatten_dict(shapes))
      flat.update({path + k: v for k, v in traverse_util.flatten_dict(start).items()})
  return traverse_util.unflatten_dict(flat)


def _film_start(shapes) -> dict:
  """A PromptFiLM's parameters at their start (fc2 zero: scale 1, shift 0), for its shapes."""
  text_dim = shapes['fc1']['kernel'].shape[0]
  width = shapes['fc2']['kernel'].shape[1] // 2   # one block of that width: same shapes
  module = prompt_film.PromptFiLM((width,), hidden=shapes['fc1']['kernel'].shape[1])
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 1, text_dim), np.float32))['params']
  return jax.tree.map(np.asarray, params)


def _readout_start(shapes) -> dict:
  """A PromptReadout's parameters at their start (output layer zero), for its shapes."""
  text_dim, generator = shapes['fc1']['kernel'].shape
  hidden = shapes['b1']['kernel'].shape[1]
  neck = shapes['neck_gn']['scale'].shape[0]
  width = shapes['w1']['kernel'].shape[1] // hidden - neck
  # A GroupNorm's parameters do not depend on its number of groups.
  module = prompt_readout.PromptReadout(hidden, shapes['b2']['kernel'].shape[1], generator,
                                        groups=1)
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 1, 1, width), np.float32),
                       np.zeros((1, 1, 1, neck), np.float32),
                       np.zeros((1, 1, 1, text_dim), np.float32),
                       np.zeros((1, 1, shapes['fc_query']['kernel'].shape[0]), np.float32))
  return jax.tree.map(np.asarray, params['params'])


def _zeros_start(shapes) -> dict:
  """SignedDifference's parameters at their start (every map zero), for its shapes."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


# Variable paths upstream has no counterpart for -> their parameters at the start, from shapes.
_ADDED = {('params', 'mask_head', 'prompt_film'): _film_start,
          ('params', 'prompt_film_neck'): _film_start,
          ('params', 'signed_difference'): _zeros_start,
          ('params', 'mask_head', 'prompt_readout'): _readout_start}


def export_torch_state_dict(config: ml_collections.ConfigDict, variables) -> dict:
  """Our variables -> upstream state_dict (numpy), aliases duplicated, num_batches_tracked = 0."""
  if prompt_film.conditioning_of(config.model) != 'none':
    raise ValueError(f'config.model.prompt_conditioning='
                     f'{prompt_film.conditioning_of(config.model)!r} has no upstream counterpart: '
                     'an upstream state_dict would silently drop the prompt conditioning. Export '
                     'to Orbax / StableHLO / ONNX instead (python -m segchange_jax.export)')
  if diff_lib.signed_difference_of(config.model) != 'none':
    raise ValueError(f'config.model.signed_difference={config.model.signed_difference!r} has no '
                     'upstream counterpart: an upstream state_dict would silently drop it. Export '
                     'to Orbax / StableHLO / ONNX instead (python -m segchange_jax.export)')
  rules, aliases, _ = torch_mapping(config)
  variables = jax.tree.map(np.asarray, dict(variables))
  sd = tc.export(variables, rules)
  bn = [r.torch_key for r in rules if r.path[0] == 'batch_stats' and
        r.torch_key.endswith('.running_mean')]
  for alias, canonical in aliases.items():
    if canonical in sd:
      sd[alias] = sd[canonical].copy()
      if canonical in bn:
        bn.append(alias)
  for key in bn:
    sd[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return sd
