"""The package layout's import rules (segchange_jax/*/__init__.py, docs/architecture.md).

Static (AST) and cheap: every `segchange_jax...` import inside a subpackage must target the
subpackage itself, a base module, or a layer it is allowed to use. A new import that breaks
the layering fails here with the file and the import.
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / 'segchange_jax'
# subpackage -> what else of segchange_jax it may import (besides itself and the base modules)
ALLOWED = {
    'models': {'interop.torch_rules'},
    'text': {'interop.hub'},
    'data': {'text'},
    'interop': {'models', 'text', 'data'},
    'train': {'models', 'text', 'data', 'interop'},
    'inference': {'models', 'text', 'data', 'interop'},
}
BASE = {'allocator', 'atomic', 'cli', 'config_lib', 'default_config', 'jax_compat', 'paths'}


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('segchange_jax'):
      yield from (f'{node.module}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith('segchange_jax'))


def _allowed(pkg: str, target: str) -> bool:
  parts = target.split('.')[1:]
  if not parts or parts[0] == pkg or parts[0] in BASE or parts == ['__version__']:
    return True
  if parts[0] not in ALLOWED:  # a command module: nothing in a subpackage may import one
    return False
  name = '.'.join(parts)
  return any(name == a or name.startswith(a + '.') or parts[0] == a for a in ALLOWED[pkg])


@pytest.mark.parametrize('pkg', sorted(ALLOWED))
def test_subpackage_imports_follow_the_layering(pkg):
  bad = [f'{f.relative_to(PKG.parent)} imports {m}'
         for f in sorted((PKG / pkg).rglob('*.py')) for m in _imports(f)
         if not _allowed(pkg, m)]
  assert not bad, 'imports against docs/architecture.md "Layout":\n' + '\n'.join(bad)


def test_every_subpackage_says_what_it_may_import():
  for pkg in ALLOWED:
    doc = ast.get_docstring(ast.parse((PKG / pkg / '__init__.py').read_text())) or ''
    assert 'May import' in doc, f'segchange_jax/{pkg}/__init__.py lacks its import rule'


def test_base_modules_import_no_subpackage_at_module_level():
  """Base modules are imported by every command before flags are parsed: only lazy imports."""
  for name in BASE:
    tree = ast.parse((PKG / f'{name}.py').read_text())
    for node in tree.body:
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('segchange_jax.'):
        assert node.module.split('.')[1] in BASE, f'{name}.py imports {node.module} at the top'
