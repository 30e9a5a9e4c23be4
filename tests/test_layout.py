"""The package layout's import rules, read from their one statement: docs/architecture.md.

The "Import rules" table there says what each layer may import; this test parses that table and
holds the code to it exactly, both ways: an import the table does not allow fails (naming the file
and the import), and so does an allowance that no code uses (the table must not promise more
freedom than the code takes). Imports inside functions count like any other. It also forbids
import cycles between modules, lazy imports included. Static (AST) and cheap.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / 'segchange_jax'
DOC = ROOT / 'docs' / 'architecture.md'
BASE = 'base modules'
COMMANDS = 'commands'


def _rules() -> dict[str, set[str]]:
  """{layer: what it may import} from the table under '### Import rules'."""
  text = DOC.read_text()
  section = text.split('### Import rules', 1)[1]
  rules = {}
  for line in section.splitlines()[1:]:
    if line.startswith('#'):
      break
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) != 2 or not cells[0].startswith('`') and cells[0] not in (BASE, COMMANDS):
      continue
    layer = cells[0].strip('`').rstrip('/')
    if cells[1] == 'anything':
      rules[layer] = {'anything'}
      continue
    rules[layer] = {t.rstrip('/').removesuffix('.py').replace('/', '.')
                    for t in re.findall(r'`([^`]+)`', cells[1])}
  return rules


RULES = _rules()
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / '__init__.py').exists())
BASE_MODULES = sorted(p.stem for p in PKG.glob('*.py') if p.stem != '__init__' and
                      not re.search(r'^def main\(', p.read_text(), re.M))
COMMAND_MODULES = sorted(p.stem for p in PKG.glob('*.py') if p.stem not in BASE_MODULES and
                         p.stem != '__init__')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path):
  """Every segchange_jax module `path` imports, at any depth (lazy imports included)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('segchange_jax'):
      for alias in node.names:  # `from pkg import module` names a module; otherwise the module
        sub = f'{node.module}.{alias.name}'
        is_module = (ROOT / (sub.replace('.', '/') + '.py')).exists() or (
            ROOT / sub.replace('.', '/') / '__init__.py').exists()
        yield sub if is_module else node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith('segchange_jax'))


def _layer(module: str) -> str:
  """The layer a segchange_jax module belongs to: a subpackage, BASE or COMMANDS."""
  parts = module.split('.')[1:]
  if not parts:
    return BASE
  if parts[0] in SUBPACKAGES:
    return parts[0]
  return BASE if parts[0] in BASE_MODULES else COMMANDS


def _files(layer: str) -> list[pathlib.Path]:
  if layer == BASE:
    return [PKG / f'{m}.py' for m in BASE_MODULES]
  if layer == COMMANDS:
    return [PKG / f'{m}.py' for m in COMMAND_MODULES]
  return sorted((PKG / layer).rglob('*.py'))


def _edges(layer: str):
  """(file, imported module, the rule entry that covers it or None) for imports across layers."""
  for f in _files(layer):
    for target in _imports(f):
      other = _layer(target)
      if other == layer or other == BASE:
        continue
      rel = target.removeprefix('segchange_jax.')
      covering = [r for r in RULES[layer] if r == 'anything' or rel == r or rel.startswith(r + '.')]
      yield f, target, (covering[0] if covering else None)


def test_the_table_names_every_layer():
  assert set(RULES) == set(SUBPACKAGES) | {BASE, COMMANDS}, (
      f'docs/architecture.md "Import rules" lists {sorted(RULES)}; the package has '
      f'{sorted(SUBPACKAGES)} plus base modules and commands')


@pytest.mark.parametrize('layer', SUBPACKAGES + [BASE, COMMANDS])
def test_imports_follow_the_table(layer):
  bad = [f'{f.relative_to(ROOT)} imports {m}' for f, m, rule in _edges(layer) if rule is None]
  assert not bad, f'imports that docs/architecture.md "Import rules" does not allow {layer}:\n' + (
      '\n'.join(bad))


@pytest.mark.parametrize('layer', SUBPACKAGES + [BASE])
def test_every_allowance_is_used(layer):
  used = {rule for _, _, rule in _edges(layer)}
  unused = RULES[layer] - used
  assert not unused, (f'docs/architecture.md allows {layer}/ to import {sorted(unused)} but no '
                      'code does: drop it from the table')


def test_single_modules_allowed_across_layers_are_leaves():
  """An allowance of one module (e.g. text/ -> interop/hub.py) must not bring its layer along."""
  for layer in SUBPACKAGES:
    for rule in RULES[layer]:
      path = PKG / (rule.replace('.', '/') + '.py')
      if path.exists():
        deps = {_layer(m) for m in _imports(path)} - {BASE}
        assert not deps, f'{path.relative_to(ROOT)} (allowed to {layer}) imports {deps}'


def test_base_modules_import_subpackages_only_inside_functions():
  """Base modules are imported by every command before flags are parsed: only lazy imports."""
  for name in BASE_MODULES:
    for node in ast.parse((PKG / f'{name}.py').read_text()).body:
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('segchange_jax.'):
        assert _layer(node.module) == BASE, f'{name}.py imports {node.module} at the top'


def test_no_import_cycles_between_modules():
  graph = {}
  for f in PKG.rglob('*.py'):
    graph[_module_name(f)] = {m for m in _imports(f) if m != _module_name(f)}
  done, path = set(), []

  def visit(node):
    if node in path:
      cycle = path[path.index(node):] + [node]
      pytest.fail('import cycle (lazy imports count): ' + ' -> '.join(cycle))
    if node in done or node not in graph:
      return
    path.append(node)
    for nxt in sorted(graph[node]):
      if not (node.startswith(nxt + '.') and nxt in graph):  # a module importing its package
        visit(nxt)
    path.pop()
    done.add(node)

  for node in sorted(graph):
    visit(node)


def test_subpackage_docstrings_point_to_the_one_statement():
  for pkg in SUBPACKAGES:
    doc = ast.get_docstring(ast.parse((PKG / pkg / '__init__.py').read_text())) or ''
    assert 'May import' not in doc and 'docs/architecture.md' in doc, (
        f'segchange_jax/{pkg}/__init__.py: say what lives there and point to '
        'docs/architecture.md "Import rules" instead of restating them')
