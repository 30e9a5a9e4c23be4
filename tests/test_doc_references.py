"""Names written in prose resolve: docs and docstrings never point at moved or deleted code.

Checked: every `segchange_jax/<path>.py` (or tests/, bench/, data_prep/ path) and
every dotted `segchange_jax.<name>` or `data_prep.<name>` in the docstrings and comments of the
repository's Python files and in the Markdown documents; in docs/architecture.md and
CONTRIBUTING.md also every backticked relative path such as `inference/export.py`, which may be
relative to segchange_jax/ or to the repository root. A dotted name resolves when its longest
module prefix is a file or package and the rest are attributes: the module is imported and the
attributes looked up, or, when the import needs an optional package that is not installed,
found as definitions in its source.
"""

from __future__ import annotations

import ast
import importlib
import io
import pathlib
import re
import tokenize

REPO = pathlib.Path(__file__).resolve().parents[1]
PY_DIRS = ('segchange_jax', 'bench', 'data_prep', 'configs', 'tests')
MARKDOWN = ('README.md', 'CONTRIBUTING.md', 'docs/*.md', 'launch/*.md', 'bench/README.md')
# Documents whose backticked relative paths (`models/neck.py`, `inference/`) are checked too.
RELATIVE_PATH_DOCS = ('docs/architecture.md', 'CONTRIBUTING.md')
PACKAGES = ('segchange_jax', 'data_prep')

# configs/ is left out: `configs/x.py` is how the docs write "a config file".
_PATH = re.compile(r'(?<![\w/.-])(?:segchange_jax|bench|data_prep|tests)/[\w/]*\w\.py\b')
# A dotted name; `segchange_jax.egg-info` and `segchange_jax.<x>` templates are not names.
_DOTTED = re.compile(r'(?<![\w/.-])(?:%s)(?:\.[A-Za-z_]\w*)+(?![\w<{*-])' % '|'.join(PACKAGES))
_BACKTICKED = re.compile(r'`([\w.-]+(?:/[\w.-]+)*/(?:[\w-]+\.(?:py|md|toml))?)`')


def _prose_lines(path: pathlib.Path):
  """(line number, text) of the docstrings and comments of a Python file."""
  source = path.read_text(encoding='utf-8')
  lines = source.splitlines()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      yield tok.start[0], tok.string
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        for lineno in range(body[0].lineno, body[0].end_lineno + 1):
          yield lineno, lines[lineno - 1]


def _markdown_lines(path: pathlib.Path):
  yield from enumerate(path.read_text(encoding='utf-8').splitlines(), 1)


def _module_file(parts: list[str]) -> pathlib.Path | None:
  base = REPO.joinpath(*parts)
  for cand in (base.with_suffix('.py'), base / '__init__.py'):
    if cand.is_file():
      return cand
  return None


def _defined_in_source(path: pathlib.Path, attrs: list[str]) -> bool:
  """Whether `attrs` (a.b.c) are defined in the file: top-level names, then class bodies."""
  body = ast.parse(path.read_text(encoding='utf-8')).body
  for attr in attrs:
    found = None
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if node.name == attr:
          found = node
      elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
          found = node
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        if any((a.asname or a.name.split('.')[0]) == attr for a in node.names):
          found = node
    if found is None:
      return False
    body = found.body if isinstance(found, ast.ClassDef) else []
  return True


def _has_attr(obj, attr: str) -> bool:
  # Dataclass fields without a default are annotations, not class attributes.
  return hasattr(obj, attr) or attr in getattr(obj, '__annotations__', {})


def _dotted_problem(name: str) -> str | None:
  parts = name.split('.')
  for i in range(len(parts), 0, -1):
    path = _module_file(parts[:i])
    if path is not None:
      break
  else:
    return 'no such module'
  module, attrs = '.'.join(parts[:i]), parts[i:]
  if not attrs:
    return None
  try:
    obj = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and e.name.split('.')[0] in PACKAGES:
      return f'importing {module} failed: {e}'
    # An optional package is missing: look for the definitions in the source instead.
    return None if _defined_in_source(path, attrs) else f'{module} defines no {".".join(attrs)}'
  except Exception as e:  # pylint: disable=broad-except
    return f'importing {module} failed: {type(e).__name__}: {e}'
  for j, attr in enumerate(attrs):
    if not _has_attr(obj, attr):
      return f'{".".join([module, *attrs[:j]])} has no attribute {attr!r}'
    obj = getattr(obj, attr, None)
  return None


def _relative_path_problem(text: str) -> str | None:
  if any((base / text).exists() for base in (REPO / 'segchange_jax', REPO)):
    return None
  return 'no such file or folder under segchange_jax/ or the repository root'


def _sources():
  for folder in PY_DIRS:
    for path in sorted((REPO / folder).rglob('*.py')):
      yield path, _prose_lines(path)
  for pattern in MARKDOWN:
    for path in sorted(REPO.glob(pattern)):
      yield path, _markdown_lines(path)


def _problems() -> list[str]:
  problems, checked = [], {}
  relative_docs = {REPO / d for d in RELATIVE_PATH_DOCS}
  for path, lines in _sources():
    rel = path.relative_to(REPO)
    for lineno, text in lines:
      found = [(m, lambda m: None if (REPO / m).is_file() else 'no such file')
               for m in _PATH.findall(text)]
      found += [(m, _dotted_problem) for m in _DOTTED.findall(text)]
      if path in relative_docs:
        found += [(m, _relative_path_problem) for m in _BACKTICKED.findall(text)]
      for name, check in found:
        if name not in checked:
          checked[name] = check(name)
        if checked[name]:
          problems.append(f'{rel}:{lineno}: {name}: {checked[name]}')
  return problems


def test_names_in_docs_and_docstrings_resolve():
  problems = _problems()
  assert not problems, f'{len(problems)} stale name(s):\n' + '\n'.join(problems)


def test_the_checker_catches_stale_names():
  assert _dotted_problem('segchange_jax.data.layouts.list_pairs') is None
  assert _dotted_problem('segchange_jax.data.layouts.Pair.label') is None
  assert _dotted_problem('segchange_jax.train_lib') == "segchange_jax has no attribute 'train_lib'"
  assert _dotted_problem('data_prep.convert.convert_pair') == (
      "data_prep.convert has no attribute 'convert_pair'")
  assert _dotted_problem('segchange_jax.data.layouts.LAYOUTS') == (
      "segchange_jax.data.layouts has no attribute 'LAYOUTS'")
  layouts_py = REPO / 'segchange_jax' / 'data' / 'layouts.py'
  assert _defined_in_source(layouts_py, ['Pair', 'label'])
  assert _defined_in_source(layouts_py, ['register_layout'])
  assert not _defined_in_source(layouts_py, ['Pair', 'labels'])
  assert _relative_path_problem('models/neck.py') is None
  assert _relative_path_problem('pretrained.py') is not None
  assert _PATH.findall('see segchange_jax/interop/pretrained.py, tests/data/conftest.py.') == [
      'segchange_jax/interop/pretrained.py', 'tests/data/conftest.py']
  assert _DOTTED.findall('`segchange_jax.egg-info`, segchange_jax.data.records.decode.') == [
      'segchange_jax.data.records.decode']


# A timing, a FLOP count or a speed-up quoted as a fact ("0.33 -> 0.16 s", "38 GFLOP", "5x
# slower"); sizes such as "2 GB" are limits and allowed.
_MEASUREMENT = re.compile(r'\b\d+(?:\.\d+)? ?(?:ms|s|GFLOPs?|TFLOPs?|GiB)\b(?! *[=(])'
                          r'|\b\d+(?:\.\d+)?x (?:slower|faster)\b')


def test_library_comments_quote_no_measurements():
  """Figures go in bench/README.md and commit messages (CONTRIBUTING.md, "Comments and figures")."""
  found = [f'{path.relative_to(REPO)}:{n}: {text.strip()}'
           for path in sorted((REPO / 'segchange_jax').rglob('*.py'))
           for n, text in _prose_lines(path) if _MEASUREMENT.search(text)]
  assert not found, 'measurements in comments; move them to bench/README.md:\n' + '\n'.join(found)
