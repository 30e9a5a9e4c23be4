"""Loading and validating ml_collections configs (`configs/*.py`).

Every config field is checked here, once; code elsewhere may trust the values it reads.
Entry points use `define_config_flag()` so that `--config configs/x.py[:arg]` and
`--config.train.batch_size=8` work as in any ml_collections program.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterable, Sequence

import ml_collections

BEVS = ('LinearAttention', 'Transformer')
FPN_TYPES = ('FPN', 'L-FPN')
DIFF_ATTENTIONS = ('SE', 'CBAM')
# Rematerialisation (segchange_jax/models/remat.py): what the backward pass recomputes.
REMAT_POLICIES = ('none', 'dots', 'block')
PROMPT_CONDITIONINGS = ('none', 'film_head', 'film_neck', 'dynamic_head')   # models/prompt_film.py
GRAD_REDUCTIONS = ('per_param', 'flat')   # train/train_step.py
SIGNED_DIFFERENCES = ('none', 'map', 'scales')   # models/diff.py
DTYPES = ('float32', 'bfloat16')
SCHEDULERS = ('step', 'plateau', 'cosine')
TARGET_MODES = ('label', 'prompts')  # config.data.targets
# The K target masks of a training example travel through the augmentation as the bits of one
# uint16 map (nearest-neighbour warps and flips move bits exactly), so K is at most 16.
MAX_PROMPTS_PER_EXAMPLE = 16
HGNET_VARIANTS = ('B5',)


def backbone_names() -> tuple[str, ...]:
  """The `model.backbone` choices: the backbone registry is their one list."""
  from segchange_jax.models import backbones  # pylint: disable=g-import-not-at-top
  return tuple(backbones.REGISTRY)


def layout_names() -> tuple[str, ...]:
  """The `data.layout` choices: the layout registry (`segchange_jax.data.layouts`) is their list."""
  from segchange_jax.data import layouts  # pylint: disable=g-import-not-at-top
  return layouts.layout_names()


class ConfigError(ValueError):
  """A config field has a value we cannot use; the message names the field and the fix."""


# The backbones downsample by 32 in all: every image side the model sees is a multiple of it.
STRIDE = 32


def check_stride(value: int, name: str, error: type[Exception] = ConfigError,
                 message: str = '{name}={value} must be a positive multiple of {stride} '
                 '(the model stride)') -> int:
  """`value` if it is a positive multiple of STRIDE, else raises `error(message)`.

  `message` is formatted with `name`, `value` and `stride`; every size check of the package
  (config fields, --size, --window, image sides, the bench scripts' sizes) goes through here.
  """
  if value <= 0 or value % STRIDE:
    raise error(message.format(name=name, value=value, stride=STRIDE))
  return value


def _config_root(path: str) -> str:
  """The directory that holds the `configs` package of a config file path."""
  return os.path.dirname(os.path.dirname(os.path.abspath(path)))


def add_config_root_to_path(argv: Sequence[str]) -> None:
  """Makes `from configs import base` work in config files wherever they are run from.

  Config files are plain modules that import `configs.base`; absl's config_flags loads them
  by path, so the folder above `configs/` must be importable. Called before flag parsing.
  """
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    if value:
      root = _config_root(value.split(':', 1)[0])
      if root not in sys.path:
        sys.path.insert(0, root)


def define_config_flag(name: str = 'config', help_string: str = 'Path to a configs/*.py file.'):
  """Defines the `--config` flag (with `--config.x.y=v` overrides) for an entry module."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  add_config_root_to_path(sys.argv)
  return config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)


def define_checkpoint_flags(
    config_help: str = "configs/*.py describing the model; needed for an upstream .pth, else "
    "the checkpoint's own config is used.") -> None:
  """`--config` and `--checkpoint` of every command that loads a trained model (infer,
  evaluate, export, app): one definition of what `--checkpoint` accepts."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  define_config_flag(help_string=config_help)
  flags.DEFINE_string('checkpoint', None, 'Training checkpoints dir, convert_torch dir, export '
                      'bundle, or upstream .pth (with --config).')


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies `a.b=value` overrides and validates the result.

  Args:
    spec: a config file path, optionally followed by `:arg` passed to `get_config(arg)`.
    overrides: strings `field.path=value` parsed like command-line overrides.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist; pass e.g. configs/demo.py')
  root = _config_root(path)
  if root not in sys.path:
    sys.path.insert(0, root)
  module_name = f'_segchange_config_{abs(hash(os.path.abspath(path)))}'
  spec_ = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} has no get_config() function')
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} must look like field.path=value')
    set_field(config, key.removeprefix('--config.').removeprefix('config.'), value)
  validate_config(config)
  return config


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """Base config updated with `values` (e.g. a saved config.json); validated."""
  from segchange_jax import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()

  def update(node, vals, prefix):
    for key, value in vals.items():
      dotted = f'{prefix}{key}'
      if key not in node:
        raise ConfigError(f'saved config has field {dotted!r}, which this version of '
                                     'segchange_jax does not know; update segchange_jax')
      if isinstance(node[key], ml_collections.ConfigDict):
        update(node[key], value, dotted + '.')
      else:
        if isinstance(node[key], tuple) and isinstance(value, list):
          value = tuple(value)
        if dotted == 'model.pretrained' and isinstance(value, bool):
          # Runs saved before `pretrained` was implemented: the flag was read by nothing and
          # every backbone started from random weights.
          value = ''
        with node.unlocked():
          node[key] = value

  update(config, values, '')
  return validate_config(config)


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets `a.b.c` to `value` (a string is parsed to the field's current type)."""
  parts = dotted.split('.')
  node = config
  for i, part in enumerate(parts[:-1]):
    if part not in node:
      raise ConfigError(_unknown_field('.'.join(parts[:i + 1]), node))
    node = node[part]
  leaf = parts[-1]
  if leaf not in node:
    raise ConfigError(_unknown_field(dotted, node))
  current = node[leaf]
  if isinstance(value, str) and not isinstance(current, str):
    value = _parse_like(value, current, dotted)
  with node.unlocked():
    node[leaf] = value


def _unknown_field(dotted: str, node: ml_collections.ConfigDict) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  name = dotted.rsplit('.', 1)[-1]
  close = difflib.get_close_matches(name, list(node.keys()), n=3)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  return f'config has no field {dotted!r}.{hint} Fields here: {sorted(node.keys())}'


def _parse_like(text: str, current: Any, dotted: str) -> Any:
  import ast  # pylint: disable=g-import-not-at-top
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ConfigError(f'config.{dotted} must be true or false, got {text!r}')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f'config.{dotted}: cannot parse {text!r} as {type(current).__name__}') from e
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


# ---------------------------------------------------------------------------- validation


def _choice(config, dotted: str, choices: Sequence[Any]) -> None:
  value = _get(config, dotted)
  if value not in choices:
    raise ConfigError(f'config.{dotted}={value!r} is not one of {list(choices)}')


def _range(config, dotted: str, lo=None, hi=None, *, integer=False, lo_open=False) -> None:
  value = _get(config, dotted)
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok_type:
    kind = 'an integer' if integer else 'a number'
    raise ConfigError(f'config.{dotted}={value!r} must be {kind}')
  if lo is not None and (value <= lo if lo_open else value < lo):
    raise ConfigError(f'config.{dotted}={value!r} must be {">" if lo_open else ">="} {lo}')
  if hi is not None and value > hi:
    raise ConfigError(f'config.{dotted}={value!r} must be <= {hi}')


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _check_pretrained(config) -> None:
  """`model.pretrained` names weights by form only; files and Hub ids are resolved in training."""
  from segchange_jax.interop import hub  # pylint: disable=g-import-not-at-top
  value = config.model.pretrained
  if not isinstance(value, str):
    raise ConfigError(f'config.model.pretrained={value!r} must be a string: \'\' (random init), '
                      "'imagenet', a Hugging Face Hub id or a weights file")
  if value in ('', 'imagenet'):
    return
  if value.lower() in ('true', 'false', 'none', '0', '1', 'yes', 'no'):
    raise ConfigError(f'config.model.pretrained={value!r}: use \'imagenet\' for ImageNet weights '
                      "or '' for random initialisation (it is not a boolean any more)")
  # Existence is checked when training starts, not here: a saved run's config.json must stay
  # loadable (evaluate, infer) on machines that lack the file.
  looks_like_path = value.startswith(('/', './', '../', '~')) or os.path.splitext(value)[1] in (
      '.pth', '.pt', '.bin', '.safetensors')
  if not looks_like_path and not os.path.exists(value) and not hub.looks_like_repo_id(value):
    raise ConfigError(f'config.model.pretrained={value!r} is neither an existing file nor a '
                      "Hugging Face Hub id (owner/name); use '', 'imagenet', an id or a path")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field's type and range; raises ConfigError naming the field and the fix."""
  m = config.model
  _choice(config, 'model.backbone', backbone_names())
  _choice(config, 'model.bev', BEVS)
  _choice(config, 'model.fpn_type', FPN_TYPES)
  _choice(config, 'model.diff_attention', DIFF_ATTENTIONS)
  _choice(config, 'model.dtype', DTYPES)
  _choice(config, 'model.remat', REMAT_POLICIES)
  _choice(config, 'model.prompt_conditioning', PROMPT_CONDITIONINGS)
  _choice(config, 'model.signed_difference', SIGNED_DIFFERENCES)
  _choice(config, 'text.dtype', DTYPES)
  if config.text.freeze is not True:
    raise ConfigError(f'config.text.freeze={config.text.freeze!r}: the text encoder is always '
                      'frozen here (prompt embeddings are computed once and cached, as upstream '
                      'trains with freeze_text_encoder=True); remove the override')
  if not isinstance(config.name, str) or not config.name.strip():
    raise ConfigError(f'config.name={config.name!r} must be a non-empty string (it names the '
                      'run in logs and TensorBoard)')
  _choice(config, 'model.hgnetv2.variant', HGNET_VARIANTS)
  _choice(config, 'data.layout', layout_names())
  _choice(config, 'train.scheduler', SCHEDULERS)
  _check_pretrained(config)
  _range(config, 'model.num_classes', 1, integer=True)
  if m.num_classes == 2:
    raise ConfigError('config.model.num_classes=2: use 1 for binary change (sigmoid, as '
                      'upstream) or >= 3 for semantic change classes')
  if len(m.out_dims) != 4 or any(not isinstance(d, int) or d < 1 for d in m.out_dims):
    raise ConfigError(f'config.model.out_dims={m.out_dims!r} must be 4 positive integers')
  for dotted in ('model.fpn_dim', 'model.token_dim', 'model.num_queries', 'model.head_heads',
                 'model.decoder_layers', 'model.decoder_ffn', 'model.bev_heads',
                 'model.bev_dim_head', 'model.bev_transformer_layers',
                 'model.bev_transformer_ffn', 'model.gn_groups', 'text.dim', 'text.max_tokens'):
    _range(config, dotted, 1, integer=True)
  vis_dim = m.token_dim if m.use_token_connector else m.fpn_dim
  if vis_dim % m.head_heads:
    raise ConfigError(f'config.model.head_heads={m.head_heads} must divide the mask-head width '
                      f'{vis_dim} (model.{"token_dim" if m.use_token_connector else "fpn_dim"})')
  for width, name in ((m.fpn_dim, 'fpn_dim'), (vis_dim // 2, 'mask-head width / 2'),
                      (vis_dim // 4, 'mask-head width / 4')):
    if width % m.gn_groups:
      raise ConfigError(f'config.model.gn_groups={m.gn_groups} must divide {name}={width}')
  if m.diff_attention == 'CBAM' or m.diff_attention == 'SE':
    for d in m.out_dims:
      if d < 16:
        raise ConfigError(f'config.model.out_dims={m.out_dims}: {m.diff_attention} reduces '
                          'channels by 16, so every entry must be >= 16')
  if m.bev == 'Transformer':
    for d in m.out_dims:
      if d % m.bev_heads:
        raise ConfigError(f'config.model.bev_heads={m.bev_heads} must divide out_dims {m.out_dims}')
  _range(config, 'model.dropout', 0.0, 1.0)
  for dotted in ('model.img_size', 'data.image_size'):
    _range(config, dotted, STRIDE, integer=True)
    check_stride(_get(config, dotted), f'config.{dotted}', message='{name}={value} must be a '
                 'multiple of {stride} (the backbone downsamples by {stride})')
  s = m.swin
  if len(s.depths) != 4 or len(s.num_heads) != 4:
    raise ConfigError('config.model.swin.depths and num_heads must have 4 entries each')
  for i, h in enumerate(s.num_heads):
    if (s.embed_dim * 2**i) % h:
      raise ConfigError(f'config.model.swin.num_heads[{i}]={h} must divide stage width '
                        f'{s.embed_dim * 2**i}')
  _range(config, 'model.swin.window_size', 1, integer=True)
  _range(config, 'model.swin.drop_path_rate', 0.0, 1.0)
  if len(m.resnet.depths) != 4:
    raise ConfigError('config.model.resnet.depths must have 4 entries')
  _range(config, 'model.resnet.width', 1, integer=True)

  a = config.data.augment
  for dotted in ('data.augment.apply_prob', 'data.augment.erase_prob', 'data.augment.clahe'):
    _range(config, dotted, 0.0, 1.0)
  for dotted in ('data.augment.color_jitter', 'data.augment.rotation_degree',
                 'data.augment.affine_degree', 'data.augment.blur_sigma'):
    _range(config, dotted, 0.0)
  if len(a.gamma_range) != 2 or not 0 < a.gamma_range[0] <= a.gamma_range[1]:
    raise ConfigError(f'config.data.augment.gamma_range={a.gamma_range!r} must be (lo, hi) '
                      'with 0 < lo <= hi')
  if len(a.erase_ratio) != 2 or not 0 <= a.erase_ratio[0] <= a.erase_ratio[1] <= 1:
    raise ConfigError(f'config.data.augment.erase_ratio={a.erase_ratio!r} must be (lo, hi) '
                      'in [0, 1]')
  _range(config, 'data.num_workers', 0, integer=True)
  _range(config, 'data.worker_processes', 0, integer=True)
  _range(config, 'data.prefetch_buffer', 1, integer=True)
  _range(config, 'data.synthetic.n', 0, integer=True)
  _range(config, 'data.synthetic.size', 32, integer=True)
  _choice(config, 'data.targets', TARGET_MODES)
  _range(config, 'data.prompts_per_example', 1, integer=True)
  if config.data.prompts_per_example > MAX_PROMPTS_PER_EXAMPLE:
    raise ConfigError(f'config.data.prompts_per_example={config.data.prompts_per_example} must '
                      f'be <= {MAX_PROMPTS_PER_EXAMPLE} (the masks of one example are augmented '
                      'as the bits of a 16-bit map); lower it')
  _range(config, 'data.negative_rate', 0.0, 1.0)
  _range(config, 'data.hard_negative_share', 0.0, 1.0)
  if config.data.targets == 'prompts' and m.num_classes != 1:
    raise ConfigError(f"config.data.targets='prompts' trains one binary mask per prompt, but "
                      f'config.model.num_classes={m.num_classes}; set num_classes=1 or '
                      "data.targets='label'")

  for dotted in ('loss.weight_ce', 'loss.weight_dice', 'loss.weight_focal', 'loss.weight_bcl',
                 'loss.gamma', 'loss.bcl_margin'):
    _range(config, dotted, 0.0)
  _range(config, 'loss.alpha', 0.0, 1.0)

  t = config.train
  _range(config, 'train.epochs', 1, integer=True)
  _range(config, 'train.max_steps', 0, integer=True)
  _range(config, 'train.batch_size', 1, integer=True)
  for dotted in ('train.lr', 'train.lr_backbone', 'train.eps'):
    _range(config, dotted, 0.0, lo_open=True)
  _range(config, 'train.weight_decay', 0.0)
  _range(config, 'train.b1', 0.0, 1.0)
  _range(config, 'train.b2', 0.0, 1.0)
  _range(config, 'train.lr_drop', 1, integer=True)
  _range(config, 'train.lr_gamma', 0.0, 1.0, lo_open=True)
  _range(config, 'train.warmup_steps', 0, integer=True)
  _range(config, 'train.plateau_patience', 0, integer=True)
  _range(config, 'train.plateau_factor', 0.0, 1.0, lo_open=True)
  _range(config, 'train.grad_clip_norm', 0.0)
  _range(config, 'train.grad_accum_steps', 1, integer=True)
  _choice(config, 'train.grad_reduction', GRAD_REDUCTIONS)
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'config.train.grad_accum_steps={t.grad_accum_steps} must divide '
                      f'train.batch_size={t.batch_size}')
  _range(config, 'train.eval_every_epochs', 1, integer=True)
  _range(config, 'train.start_eval', 0, integer=True)
  _range(config, 'train.log_every_steps', 1, integer=True)
  _range(config, 'train.stop_check_every', 1, integer=True)
  profile = t.profile_steps
  if (len(profile) != 2 or not all(isinstance(x, int) and x >= 0 for x in profile)
      or (profile[1] and profile[1] <= profile[0])):
    raise ConfigError(f'config.train.profile_steps={tuple(profile)!r} must be (start, stop) with '
                      '0 <= start < stop (the steps after `start` up to `stop` are traced), or '
                      '(0, 0) for no trace')
  if not isinstance(t.compilation_cache_dir, str):
    raise ConfigError(f'config.train.compilation_cache_dir={t.compilation_cache_dir!r} must be a '
                      "folder path, or '' for no persistent compilation cache")
  for dotted in ('train.threshold', 'eval.threshold', 'infer.threshold'):
    _range(config, dotted, 0.0, 1.0)
  _range(config, 'eval.batch_size', 1, integer=True)
  _range(config, 'eval.num_images', 0, integer=True)

  i = config.infer
  _range(config, 'infer.window', STRIDE, integer=True)
  check_stride(i.window, 'config.infer.window', message='{name}={value} must be a multiple of '
               '{stride}')
  _range(config, 'infer.overlap', 0, integer=True)
  if i.overlap >= i.window:
    raise ConfigError(f'config.infer.overlap={i.overlap} must be smaller than '
                      f'infer.window={i.window}')
  _range(config, 'infer.batch_size', 1, integer=True)
  _range(config, 'infer.min_area', 0, integer=True)
  _range(config, 'infer.max_perimeter_ratio', 0.0)
  _range(config, 'infer.min_convexity', 0.0, 1.0)

  for dotted in ('mesh.data', 'mesh.fsdp'):
    value = _get(config, dotted)
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
      raise ConfigError(f'config.{dotted}={value!r} must be a positive integer or -1 (the rest)')
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    raise ConfigError('config.mesh.data and config.mesh.fsdp cannot both be -1')
  _range(config, 'mesh.fsdp_min_size', 0, integer=True)
  _range(config, 'checkpoint.keep', 1, integer=True)
  _range(config, 'checkpoint.every_steps', 0, integer=True)
  _range(config, 'distributed.num_processes', 0, integer=True)
  _range(config, 'distributed.process_id', -1, integer=True)
  _range(config, 'distributed.initialization_timeout', 1, integer=True)
  _range(config, 'distributed.heartbeat_timeout', 1, integer=True)
  return config
