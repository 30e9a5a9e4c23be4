"""The dataset-layout registry: CONTRIBUTING's "Adding a dataset layout" recipe on a toy layout.

The toy layout keeps one folder per pair, ROOT/{split}/<pair>/{before,after,mask}.png with an
optional prompt.txt, a structure no built-in reader accepts. Registered here, it is converted
into shards, read back and accepted as `config.data.layout`; an unknown layout gets one error
listing the registered ones from the config, the converter and the command line.
"""

import json
import os
import subprocess
import sys

from array_record.python import array_record_data_source
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax import default_config
from segchange_jax.data import convert
from segchange_jax.data import layouts
from segchange_jax.data import records

BUILT_IN = ('segchange-default', 'segchange-custom', 'opencd', 'sysu', 'changefine-json',
            'second')


@pytest.fixture
def registry(monkeypatch):
  """A copy of the registry for this test, so that the toy layout leaves no trace."""
  monkeypatch.setattr(layouts, 'REGISTRY', dict(layouts.REGISTRY))
  return layouts.REGISTRY


def _read_toy(root: str, split: str, num_splits: int) -> list[layouts.Pair]:
  """The toy reader: ROOT/{split}/<pair>/{before,after,mask}.png (+ prompt.txt)."""
  del num_splits
  base = os.path.join(root, split)
  if not os.path.isdir(base):
    raise layouts.LayoutError(f'{base} does not exist: expected ROOT/{split}/<pair>/')
  pairs = []
  for pair in sorted(os.listdir(base)):
    folder = os.path.join(base, pair)
    prompt_file = os.path.join(folder, 'prompt.txt')
    prompt = open(prompt_file).read().strip() if os.path.isfile(prompt_file) else ''
    pairs.append(layouts.Pair(f'{pair}.png', os.path.join(folder, 'before.png'),
                              os.path.join(folder, 'after.png'),
                              os.path.join(folder, 'mask.png'), prompt))
  return pairs


def _write_toy(root: str, helpers) -> dict:
  """Three pairs in train (one with a prompt, one without its mask), one in val."""
  written = {}
  for split, names, seed in (('train', ('p1', 'p2', 'p3'), 0), ('val', ('v1',), 7)):
    for i, name in enumerate(names):
      a, b, label = helpers.make_pair(seed + i, size=(24, 40))
      folder = os.path.join(root, split, name)
      helpers.write_png(os.path.join(folder, 'before.png'), a)
      helpers.write_png(os.path.join(folder, 'after.png'), b)
      if name != 'p3':
        helpers.write_png(os.path.join(folder, 'mask.png'), label)
      written[f'{name}.png'] = (a, b, label)
  with open(os.path.join(root, 'train', 'p1', 'prompt.txt'), 'w') as f:
    f.write('New roads.\n')
  return written


def _read_split(out: str, split: str) -> dict:
  info = json.load(open(os.path.join(out, convert.INFO_FILE)))
  paths = [os.path.join(out, n) for n in info['splits'][split]['shards']]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return {ex['file_name']: ex for ex in (records.decode(src[i]) for i in range(len(src)))}


def test_toy_layout_converts_reads_back_and_validates(tmp_path, helpers, registry):
  root, out = str(tmp_path / 'raw'), str(tmp_path / 'shards')
  written = _write_toy(root, helpers)
  assert layouts.register_layout('toy-folders', 'ROOT/{split}/<pair>/{before,after,mask}.png')(
      _read_toy) is _read_toy
  assert layouts.layout_names() == (*BUILT_IN, 'toy-folders')
  assert 'toy-folders: ROOT/{split}/<pair>/{before,after,mask}.png' in layouts.help_text()

  info = convert.convert('toy-folders', root, out, ['train', 'val'])
  assert info['source_layout'] == 'toy-folders'
  train = info['splits']['train']
  # p3 has no mask: train is not strict, so it is skipped and named, not dropped silently.
  assert train['num_pairs'] == 2 and train['num_examples'] == 2 and train['num_skipped'] == 1
  assert train['skipped'][0]['file_name'] == 'p3.png'
  assert os.path.join('p3', 'mask.png') in train['skipped'][0]['reason']
  assert info['prompts'] == ['', 'New roads.']
  got = {**_read_split(out, 'train'), **_read_split(out, 'val')}
  assert sorted(got) == ['p1.png', 'p2.png', 'v1.png']
  for name, ex in got.items():
    a, b, label = written[name]
    np.testing.assert_array_equal(ex['image_a'], a)
    np.testing.assert_array_equal(ex['image_b'], b)
    np.testing.assert_array_equal(ex['label'], label)
  assert got['p1.png']['prompt'] == 'New roads.' and got['p2.png']['prompt'] == ''

  config = default_config.get_config()
  config.data.layout = 'toy-folders'
  assert config_lib.validate_config(config).data.layout == 'toy-folders'


def test_unknown_layout_lists_the_registered_ones(tmp_path, helpers, registry):
  layouts.register_layout('toy-folders', 'one folder per pair')(_read_toy)
  listed = str((*BUILT_IN, 'toy-folders'))
  config = default_config.get_config()
  config.data.layout = 'toy-folder'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(config)
  assert str(e.value) == (f"config.data.layout='toy-folder' is not one of "
                          f"{list((*BUILT_IN, 'toy-folders'))}")
  with pytest.raises(convert.ConvertError) as e:
    convert.convert('toy-folder', str(tmp_path), str(tmp_path / 'out'))
  assert str(e.value) == f"--layout 'toy-folder' is not one of {listed}"
  assert not (tmp_path / 'out').exists()
  with pytest.raises(layouts.LayoutError) as e:
    layouts.list_pairs('toy-folder', str(tmp_path), 'train')
  assert str(e.value) == f"unknown layout 'toy-folder'; one of {listed}"


def test_registration_errors(registry):
  with pytest.raises(ValueError, match=r"layout 'opencd' is already registered \(by "
                                       r'segchange_jax\.data\.layouts\._opencd\)'):
    layouts.register_layout('opencd', 'a second opencd')(_read_toy)
  with pytest.raises(ValueError, match='use letters, digits'):
    layouts.register_layout('two words', 'x')
  with pytest.raises(ValueError, match='one non-empty line'):
    layouts.register_layout('toy', 'first line\nsecond line')
  with pytest.raises(TypeError, match='must be callable'):
    layouts.register_layout('toy', 'x')('not a function')
  assert layouts.layout_names() == BUILT_IN


def test_command_line_lists_the_registry(repo_root):
  """data_prep.convert's --layout choices and --help come from the registry."""
  run = lambda *args: subprocess.run([sys.executable, '-m', 'data_prep.convert', *args],
                                     cwd=repo_root, capture_output=True, text=True, timeout=300)
  help_out = run('--help').stdout
  for layout in layouts.REGISTRY.values():
    assert f'{layout.name}: {layout.description}' in help_out
  proc = run('--layout', 'nope', '--root', '.', '--out', 'unused')
  assert proc.returncode != 0
  assert f"value should be one of <{'|'.join(BUILT_IN)}>" in proc.stderr
