"""Config loading, command-line overrides and validation errors."""

import os
import subprocess
import sys

import pytest

from segchange_jax import config_lib

VARIANTS = ['configs/base.py', 'configs/dvcd.py', 'configs/levir.py', 'configs/whu.py',
            'configs/sysu_fewshot.py', 'configs/sysu_fewshot.py:10', 'configs/demo.py',
            'configs/demo_llm.py']


@pytest.mark.parametrize('spec', VARIANTS)
def test_every_variant_loads_and_validates(repo_root, spec):
  path, _, arg = spec.partition(':')
  config = config_lib.load_config(str(repo_root / path) + (f':{arg}' if arg else ''))
  assert config.model.backbone in config_lib.backbone_names()


def test_base_matches_upstream_defaults(repo_root):
  c = config_lib.load_config(str(repo_root / 'configs/base.py'))
  assert (c.model.backbone, c.model.bev, c.model.fpn_type, c.model.diff_attention) == (
      'swin_base_patch4_window7_224', 'LinearAttention', 'L-FPN', 'CBAM')
  assert c.model.use_ega and not c.model.use_token_connector
  assert (c.loss.weight_ce, c.loss.weight_dice, c.loss.weight_focal, c.loss.weight_bcl) == (
      1.0, 1.5, 1.5, 0.3)
  assert (c.train.lr, c.train.lr_backbone, c.train.weight_decay, c.train.lr_drop) == (
      1e-4, 1e-5, 1e-4, 20)
  assert c.seed == 42 and c.train.batch_size == 4 and c.model.img_size == 512


def test_sysu_fraction_argument(repo_root):
  c5 = config_lib.load_config(str(repo_root / 'configs/sysu_fewshot.py'))
  c10 = config_lib.load_config(str(repo_root / 'configs/sysu_fewshot.py') + ':10%')
  assert c5.data.train_list.endswith('sysucd-train-5%')
  assert c10.data.train_list.endswith('sysucd-train-10%')
  with pytest.raises(ValueError, match='fraction'):
    config_lib.load_config(str(repo_root / 'configs/sysu_fewshot.py') + ':7')


def test_overrides_are_typed(repo_root):
  c = config_lib.load_config(str(repo_root / 'configs/dvcd.py'), [
      'train.batch_size=8', '--config.model.use_ega=false', 'train.lr=3e-4',
      'model.out_dims=(128, 128, 128, 128)', 'model.bev=Transformer'])
  assert c.train.batch_size == 8 and c.model.use_ega is False and c.train.lr == 3e-4
  assert c.model.out_dims == (128, 128, 128, 128) and c.model.bev == 'Transformer'


@pytest.mark.parametrize('override, message', [
    ('model.backbone=swin_tiny', r"model.backbone='swin_tiny' is not one of \['swin_base"),
    ('model.bev=Linear', 'model.bev'),
    ('train.scheduler=exp', r"\['step', 'plateau', 'cosine'\]"),
    ('train.batch_size=0', 'train.batch_size=0 must be >= 1'),
    ('train.lr=-1.0', 'train.lr'),
    ('data.image_size=500', 'multiple of 32'),
    ('infer.overlap=512', 'smaller than infer.window'),
    ('model.num_classes=2', 'use 1 for binary'),
    ('train.grad_accum_steps=3', 'must divide'),
    ('mesh.data=0', 'positive integer or -1'),
    ('data.augment.apply_prob=1.5', 'apply_prob=1.5 must be <= 1.0'),
    ('distributed.heartbeat_timeout=0', 'heartbeat_timeout=0 must be >= 1'),
    ('distributed.initialization_timeout=0', 'initialization_timeout=0 must be >= 1'),
])
def test_validation_names_field_and_choices(repo_root, override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config(str(repo_root / 'configs/dvcd.py'), [override])


def test_unknown_field_is_a_clear_error(repo_root):
  with pytest.raises(config_lib.ConfigError, match=r"no field 'train.bach_size'.*batch_size"):
    config_lib.load_config(str(repo_root / 'configs/dvcd.py'), ['train.bach_size=8'])


def test_base_config_is_locked(repo_root):
  c = config_lib.load_config(str(repo_root / 'configs/base.py'))
  with pytest.raises(AttributeError):
    c.model.backbon = 'resnet50'


def test_missing_config_file():
  with pytest.raises(config_lib.ConfigError, match='does not exist'):
    config_lib.load_config('configs/nope.py')


def test_absl_config_flag_overrides(repo_root, tmp_path):
  """`--config file --config.a.b=v` through absl, as the entry modules parse it."""
  script = tmp_path / 'show.py'
  script.write_text(
      'from absl import app\n'
      'from segchange_jax import config_lib\n'
      'CONFIG = config_lib.define_config_flag()\n'
      'def main(_):\n'
      '  config_lib.validate_config(CONFIG.value)\n'
      '  print(CONFIG.value.train.batch_size, CONFIG.value.model.backbone)\n'
      'app.run(main)\n')
  env = {**os.environ, 'PYTHONPATH': str(repo_root)}
  out = subprocess.run(
      [sys.executable, str(script), '--config', str(repo_root / 'configs/dvcd.py'),
       '--config.train.batch_size=8', '--config.model.backbone=resnet50'],
      capture_output=True, text=True, check=True, cwd=tmp_path, env=env)
  assert out.stdout.split() == ['8', 'resnet50']
  bad = subprocess.run(
      [sys.executable, str(script), '--config', str(repo_root / 'configs/dvcd.py'),
       '--config.train.bach_size=8'], capture_output=True, text=True, cwd=tmp_path, env=env)
  assert bad.returncode != 0 and 'bach_size' in bad.stderr


@pytest.mark.parametrize('field, value, words', [
    ('text.freeze', 'false', 'always frozen'),
    ('name', '  ', 'non-empty string'),
])
def test_fields_that_must_keep_their_meaning(field, value, words):
  with pytest.raises(config_lib.ConfigError, match=words):
    config_lib.load_config('configs/demo.py', [f'{field}={value}'])
