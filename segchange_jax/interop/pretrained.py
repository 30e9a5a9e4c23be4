"""`config.model.pretrained`: start the backbone from ImageNet (or any classification) weights.

Values:
- `''`: random initialisation.
- `'imagenet'`: the weights upstream starts from, by Hub id (`IMAGENET`).
- a Hub id (`timm/resnet50.tv_in1k`, optionally `@revision`): its `model.safetensors` (or
  `pytorch_model.bin`), fetched once into the Hugging Face cache (`segchange_jax.interop.hub`).
- a local file: timm `model.safetensors` / `pytorch_model.bin`, torchvision `resnet50-*.pth`,
  D-FINE's `PPHGNetV2_B5_stage1.pth` (or a folder holding one of them).

The file's keys are brought to the stand-alone backbone's names and converted by the same
`torch_rules` as whole upstream checkpoints. Classifier heads, the final norm and other tensors
the backbone has no place for are listed as unused; a missing tensor or a shape mismatch is an
error naming it and the architecture the file looks like. The report (loaded / skipped / unused)
is written to the workdir by the trainer.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any

import numpy as np

from segchange_jax.interop import hub
from segchange_jax.interop import merge
from segchange_jax.interop import torch_pickle
from segchange_jax.models import backbones
from segchange_jax.models import torch_rules as tc

FIELD = 'config.model.pretrained'
# Hub ids of the weights upstream loads: timm's default Swin-B tag, torchvision's
# ResNet50_Weights.IMAGENET1K_V1 as timm re-hosts it, and timm's copy of the PaddleClas SSLD
# stage-1 HGNetv2-B5 weights (upstream's D-FINE code downloads PPHGNetV2_B5_stage1.pth from a
# GitHub release instead; that file loads too, by path).
IMAGENET = {
    'swin_base_patch4_window7_224': 'timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k',
    'resnet50': 'timm/resnet50.tv_in1k',
    'hgnetv2': 'timm/hgnetv2_b5.ssld_stage1_in22k_in1k',
}
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Tensors that are not weights: recomputed buffers and BatchNorm counters.
_NOT_WEIGHTS = re.compile(r'.*(num_batches_tracked|relative_position_index|attn_mask)$')
_LOCAL_HINT = (f'download the file yourself and pass --{FIELD}=PATH (a model.safetensors, '
               'pytorch_model.bin or .pth file)')


class PretrainedError(ValueError):
  """The pretrained file does not fit the configured backbone; the message says why."""


def resolve(spec: str, backbone: str) -> str:
  """Local path of the weights file that `spec` names (downloading Hub ids)."""
  if spec == 'imagenet':
    try:
      return resolve(IMAGENET[backbone], backbone)
    except hub.HubError as e:
      raise hub.HubError(f"{FIELD}='imagenet' is {IMAGENET[backbone]} for model.backbone="
                         f'{backbone!r}. {e}') from e
  path = os.path.expanduser(spec)
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    for want in (*WEIGHT_FILES, *[n for n in names if n.endswith(('.pth', '.pt'))]):
      if want in names:
        return os.path.join(path, want)
    raise FileNotFoundError(f'{FIELD}={spec!r} is a folder without {" / ".join(WEIGHT_FILES)} '
                            'or a .pth file')
  if hub.looks_like_repo_id(spec):
    repo, revision = hub.split_revision(spec)
    hint = _LOCAL_HINT
    if '/' in spec and not spec.startswith('timm/'):
      hint += f' (no local file or folder {os.path.abspath(path)!r} exists either)'
    return hub.download_file(repo, WEIGHT_FILES, FIELD, hint, revision=revision)
  raise FileNotFoundError(f'{FIELD}={spec!r} is neither a file, a folder, a Hub id '
                          "(owner/name) nor 'imagenet'")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a safetensors or torch pickle file (`{'model': sd}` / `{'state_dict': sd}` too)."""
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
      raise PretrainedError(f'{FIELD}: {path} is not a readable safetensors file ({e})') from e
  try:
    obj = torch_pickle.load(path)
  except Exception as e:  # zipfile / pickle errors of a damaged or foreign file
    raise PretrainedError(f'{FIELD}: {path} is neither a safetensors nor a PyTorch file ({e})') \
        from e
  if not isinstance(obj, dict):
    raise PretrainedError(f'{FIELD}: {path} holds a {type(obj).__name__}, not a state_dict')
  sd = tc.strip_prefixes(obj)
  return {k: np.asarray(v) for k, v in sd.items() if hasattr(v, 'shape')}


def _swin_layout(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """timm full-model names (`layers.N.`) -> features_only names (`layers_N.`).

  Checkpoints of timm < 0.9 and Microsoft's own release keep patch merging at the END of stage
  N (`layers.N.downsample`, N = 0..2); timm >= 0.9 at the START of stage N + 1.
  """
  old = any(k.startswith('layers.0.downsample.') for k in sd)
  out = {}
  for k, v in sd.items():
    m = re.match(r'layers[._](\d+)\.(.*)$', k)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      if old and rest.startswith('downsample.'):
        i += 1
      k = f'layers_{i}.{rest}'
    out[k] = v
  layout = 'Swin, pre-0.9 timm / Microsoft (merging at stage end)' if old else 'timm Swin'
  return out, layout


def describe(sd: dict[str, np.ndarray]) -> str:
  """What backbone a state_dict looks like, with the config fields that would fit it."""
  keys = list(sd)
  if any(k.startswith('dual_encoder.') for k in keys):
    return ('a whole SegChange-R1 model checkpoint, not a backbone: pass it as '
            '--config.init_from=PATH instead')
  if any('relative_position_bias_table' in k for k in keys):
    depths = collections.Counter()
    for k in keys:
      m = re.match(r'layers[._](\d+)\.blocks\.(\d+)\.norm1\.weight$', k)
      if m:
        depths[int(m.group(1))] += 1
    heads = [int(sd[f'layers{sep}{i}.blocks.0.attn.relative_position_bias_table'].shape[1])
             for i in sorted(depths) for sep in '._'
             if f'layers{sep}{i}.blocks.0.attn.relative_position_bias_table' in sd]
    embed = sd['patch_embed.proj.weight'].shape[0] if 'patch_embed.proj.weight' in sd else '?'
    return (f"a Swin Transformer (model.backbone='swin_base_patch4_window7_224' with "
            f'model.swin.embed_dim={embed}, depths={tuple(depths[i] for i in sorted(depths))}, '
            f'num_heads={tuple(heads)})')
  if 'layer1.0.conv1.weight' in sd:
    blocks = collections.Counter(int(m.group(1)) for k in keys
                                 if (m := re.match(r'layer(\d)\.(\d+)\.conv1\.weight$', k)))
    depths = tuple(blocks[i] for i in range(1, 5))
    width = sd['conv1.weight'].shape[0] if 'conv1.weight' in sd else '?'
    if 'layer1.0.conv3.weight' not in sd:
      return (f'a ResNet with basic blocks (ResNet-18/34, depths {depths}); only bottleneck '
              "ResNets (model.backbone='resnet50') are supported")
    return (f"a bottleneck ResNet (model.backbone='resnet50' with model.resnet.depths={depths}, "
            f'width={width})')
  if 'stem.stem1.conv.weight' in sd:
    outs = []
    for i in range(8):
      last = sorted((k for k in keys if re.match(rf'stages\.{i}\.blocks\.\d+\.aggregation\.1\.conv'
                                                 r'\.weight$', k)))
      if not last:
        break
      outs.append(int(sd[last[-1]].shape[0]))
    return (f"an HGNetv2 (model.backbone='hgnetv2'; stem width "
            f'{sd["stem.stem1.conv.weight"].shape[0]}, stage outputs {tuple(outs)}; B5 has 32 '
            'and (128, 512, 1024, 2048))')
  return f'none of the supported backbones (its first keys: {", ".join(keys[:5])})'


def convert(sd: dict[str, np.ndarray], model_cfg, expected: dict[tuple[str, ...], tuple],
            source: str) -> tuple[dict, dict[str, Any]]:
  """State_dict of a stand-alone backbone -> ({collection: {'backbone': ...}}, report).

  Args:
    sd: the file's tensors.
    model_cfg: config.model.
    expected: Flax path (collection, 'backbone', ...) -> shape, for the shape checks.
    source: the file, for messages.
  """
  layout = {'resnet50': 'torchvision / timm ResNet', 'hgnetv2': 'HGNetv2'}.get(model_cfg.backbone)
  if model_cfg.backbone == 'swin_base_patch4_window7_224':
    sd, layout = _swin_layout(sd)
  elif model_cfg.backbone == 'hgnetv2':
    layout = ('timm hgnetv2' if any(k.startswith('head.') for k in sd)
              else "D-FINE PPHGNetV2 (upstream's stage-1 file)")
  rules, _, _ = backbones.backbone_torch_mapping(model_cfg, ('backbone',), torch_prefix='')
  by_key = {r.torch_key: r for r in rules}
  fits = [k for k in sd if k in by_key]
  missing = [r.torch_key for r in rules if r.torch_key not in sd]
  what = f'{FIELD}: {source}'
  if len(fits) < len(rules) // 2:
    foreign = [f'{k} {tuple(sd[k].shape)}' for k in sd if k not in by_key
               and not _NOT_WEIGHTS.fullmatch(k)][:5]
    raise PretrainedError(
        f'{what} does not fit model.backbone={model_cfg.backbone!r}: only {len(fits)} of its '
        f'{len(rules)} tensors are there. First tensors that do not fit: {", ".join(foreign)}; '
        f'first missing: {", ".join(missing[:3])}. The file looks like {describe(sd)}.')
  if missing:
    raise PretrainedError(
        f'{what} lacks {len(missing)} tensors of model.backbone={model_cfg.backbone!r}, e.g. '
        f'{", ".join(missing[:5])}. The file looks like {describe(sd)}; set the config to match '
        'or pass a complete file.')
  for rule in rules:  # in network order: the first mismatch is the most telling one
    k = rule.torch_key
    want = tuple(tc.to_torch(np.zeros(expected[rule.path]), rule.kind).shape)
    if tuple(sd[k].shape) != want:
      raise PretrainedError(
          f'{what}: tensor {k} has shape {tuple(sd[k].shape)}, the configured backbone expects '
          f'{want}. The file looks like {describe(sd)}.')
  variables = tc.convert({k: sd[k] for k in fits}, rules, source=source)
  report = {
      'layout': layout,
      'loaded': len(fits),
      'skipped': sorted(k for k in sd if k not in by_key and _NOT_WEIGHTS.fullmatch(k)),
      'unused': [f'{k} {tuple(sd[k].shape)}' for k in sd
                 if k not in by_key and not _NOT_WEIGHTS.fullmatch(k)],
  }
  return variables, report


def load(config, params: Any, model_state: dict) -> tuple[Any, dict, dict[str, Any]]:
  """(params, model_state, report) with the backbone taken from `config.model.pretrained`."""
  spec = config.model.pretrained
  path = resolve(spec, config.model.backbone)
  target = {'params': params, **model_state}
  expected = {k: tuple(v.shape) for k, v in tc.flatten(target).items()
              if len(k) > 1 and k[1] == 'backbone'}
  source, report = convert(read_state_dict(path), config.model, expected, path)
  merged, merge_report = merge.merge(target, source)
  if merge_report['loaded'] != report['loaded'] or merge_report['unused']:
    raise AssertionError(f'pretrained merge disagrees with the conversion: {merge_report}')
  params = merged.pop('params')
  report = {'spec': spec, 'path': os.path.abspath(path), 'backbone': config.model.backbone,
            **report}
  return params, merged, report


def backbone_state_dict(config, variables: dict) -> dict[str, np.ndarray]:
  """Our backbone variables -> a stand-alone backbone state_dict in timm / torchvision layout.

  The inverse of `convert` (Swin stages as timm's full model names them, `layers.N.`), so a
  backbone trained here can be saved as `model.safetensors` and used as `model.pretrained`.
  """
  rules, _, _ = backbones.backbone_torch_mapping(config.model, ('backbone',), torch_prefix='')
  sd = tc.export({k: v for k, v in variables.items()}, rules)
  if config.model.backbone == 'swin_base_patch4_window7_224':
    sd = {re.sub(r'^layers_(\d+)\.', r'layers.\1.', k): v for k, v in sd.items()}
  return sd
