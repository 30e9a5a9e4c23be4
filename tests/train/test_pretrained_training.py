"""The trainer starts the backbone from config.model.pretrained; config.init_from wins over it."""

import json
import os

import jax
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.interop import pretrained
from segchange_jax.train import checkpointing
from segchange_jax.train import loop
from tests.train.conftest import tiny_overrides

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')


def _params(workdir):
  root = os.path.join(workdir, 'checkpoints', 'latest')
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  return jax.tree.map(np.asarray, checkpointing.restore_params(os.path.join(root, str(step))))


def _pretrained_run(repo_root, dataset, tmp_path):
  """One training step of configs/demo.py from a timm-layout file of its backbone's shape."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = timm.create_model('swin_base_patch4_window7_224', embed_dim=32, depths=(1, 1, 1, 1),
                            num_heads=(1, 2, 4, 8))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / 'model.safetensors'))
  config = config_lib.load_config(str(repo_root / 'configs/demo.py'), tiny_overrides(
      dataset, **{'train.max_steps': 1, 'model.pretrained': str(tmp_path / 'model.safetensors')}))
  loop.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.slow
def test_pretrained_backbone_is_where_training_starts(repo_root, dataset, tmp_path):
  """A whole (1-step) training run: 325 s on the shared 2-core machine at load 10."""
  _pretrained_run(repo_root, dataset, tmp_path)
  with open(tmp_path / 'run' / 'pretrained_report.json') as f:
    report = json.load(f)
  assert report['loaded'] == 65 and len(report['unused']) == 4, report
  # One AdamW step moves each weight by about lr_backbone (1e-3) at most: the run started from
  # the file, not from a random initialisation.
  want = pretrained.read_state_dict(str(tmp_path / 'model.safetensors'))
  got = _params(str(tmp_path / 'run'))['backbone']
  kernel = got['patch_embed']['proj']['kernel']
  np.testing.assert_allclose(kernel, want['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                             atol=1.5e-3)
  table = got['layers_3']['blocks_0']['attn']['relative_position_bias_table']
  np.testing.assert_allclose(table, want['layers.3.blocks.0.attn.relative_position_bias_table'],
                             atol=1.5e-3)


@pytest.mark.slow
def test_init_from_wins_over_pretrained(repo_root, dataset, tmp_path):
  """A whole model (init_from) is the start; pretrained (here a missing file) is not applied."""
  _pretrained_run(repo_root, dataset, tmp_path)
  tuned = config_lib.load_config(str(repo_root / 'configs/demo.py'), tiny_overrides(
      dataset, **{'train.max_steps': 1, 'model.pretrained': str(tmp_path / 'nowhere.pth'),
                  'init_from': str(tmp_path / 'run' / 'checkpoints')}))
  loop.train_and_evaluate(tuned, str(tmp_path / 'tuned'))
  assert os.path.isfile(tmp_path / 'tuned' / 'init_from_report.json')
  assert not os.path.exists(tmp_path / 'tuned' / 'pretrained_report.json')
