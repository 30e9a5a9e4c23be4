"""One error path for every command line (train, infer, evaluate, export, convert_torch, ...).

`run(main)` replaces `absl.app.run(main)`:
- `--help` (also -h, -?, --helpshort) prints the module docstring and the program's own flags,
  `--config` included, and exits 0.
- A user error (a bad flag, a missing or unreadable file, a config typo or out-of-range value,
  an output that would overwrite an input) prints ONE line `error: <what> ... <fix>` to stderr
  and exits 2. User errors are ValueError (ConfigError, OutputError, ImageryError, ...),
  OSError (missing/unreadable files), absl flag errors and `UsageError`.
- Anything else is a bug and keeps its traceback. Set SEGCHANGE_TRACEBACK=1 to see the
  traceback of a user error too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

HELP_ARGS = ('--help', '-h', '-?', '--helpshort', '-help')
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, app.UsageError,
                                                flags.Error)


class UsageError(ValueError):
  """A flag is missing or out of range; the message names the flag and the allowed values."""


def one_line(exc: BaseException) -> str:
  """The exception's message on one line (multi-line messages joined with ' / ')."""
  lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
  return ' / '.join(lines) or type(exc).__name__


def fail(message: str, code: int = 2) -> None:
  """Prints `error: message` (one line) to stderr and exits with `code`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def print_help(argv: Sequence[str]) -> None:
  """The module docstring and the main module's flags (with --config) on stdout; exit 0."""
  fv = flags.FLAGS
  main_module = sys.argv[0] if argv is sys.argv else argv[0]
  if 'config' in fv:
    # --config is defined through config_lib, so absl attributes it to another module and
    # would leave it out of the short help.
    fv.register_key_flag_for_module(main_module, fv['config'])
  doc = sys.modules['__main__'].__doc__ or f'USAGE: {main_module} [flags]\n'
  try:
    sys.stdout.write(doc)
    sys.stdout.write('\nflags:\n' + fv.module_help(main_module) + '\n')
    sys.stdout.write('\nTry --helpfull to get a list of all flags.\n')
    sys.stdout.flush()
  except BrokenPipeError:  # `--help | head`
    pass
  sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS['config'].value.keys()  # a lazy proxy: this loads the file (or fails) now
    return rest
  except flags.Error as e:
    fail(f'{one_line(e)} (see --help)')
  except (AttributeError, KeyError) as e:  # --config.a.b=v naming an unknown field
    text = str(e.args[0] if e.args else e)
    names = re.findall(r"[\w.]+", text.split('Did you mean')[0])
    name = names[0] if names else text
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    bad = [a for a in argv if a.startswith('--config.') and name in a]
    fail(f'{bad[0] if bad else "--config"}: config has no field {name!r}'
         + (f'; did you mean {hint.group(1)!r}?' if hint else '')
         + ' (every field is in configs/base.py)')
  except (ValueError, OSError) as e:  # --config naming a missing or broken file
    text = one_line(e)
    if 'Failed loading config file' in text or 'earlier failure to load' in text:
      spec = [a.removeprefix('--config=') for a in argv if a.startswith('--config=')]
      if not spec and '--config' in argv[:-1]:
        spec = [argv[argv.index('--config') + 1]]
      path = spec[0].split(':', 1)[0] if spec else '?'
      why = ('does not exist' if not os.path.isfile(path) else
             'raised an error when loaded (run it with python to see where)')
      text = f'--config {path}: the config file {why}; pass e.g. configs/demo.py'
    fail(text)
  raise AssertionError('unreachable')


def guard(main: Callable[[list[str]], None],
          extra_errors: tuple[type[BaseException], ...] = (),
          errors: tuple[type[BaseException], ...] | None = None) -> Callable[[list[str]], None]:
  """`main` with user errors (`errors`, default USER_ERRORS, plus `extra_errors`) turned into
  one line on stderr and exit status 2."""
  errors = (USER_ERRORS if errors is None else tuple(errors)) + tuple(extra_errors)

  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except errors as e:  # pylint: disable=catching-non-exception
      if os.environ.get('SEGCHANGE_TRACEBACK'):
        raise
      fail(one_line(e))
  return wrapped


def run(main: Callable[[list[str]], None], argv: list[str] | None = None,
        extra_errors: tuple[type[BaseException], ...] = (),
        errors: tuple[type[BaseException], ...] | None = None) -> None:
  """absl.app.run(main) with the help and error rules of the module docstring."""
  argv = sys.argv if argv is None else argv
  if any(a in HELP_ARGS for a in argv[1:]):
    print_help(argv)
  app.run(guard(main, extra_errors, errors), argv=argv, flags_parser=_parse_flags)


class _DropLibraryChatter(logging.Filter):
  """Drops Orbax's INFO lines and its warnings about metadata files older checkpoints lack."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname and 'orbax' not in record.name:
      return True
    return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
  """Keeps library chatter out of a command's output (call before importing jax/transformers).

  Orbax logs a dozen INFO lines per restore and warns that _CHECKPOINT_METADATA is missing for
  checkpoints written without it (harmless); transformers warns "PyTorch was not found" although
  segchange_jax never uses torch.
  """
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  chatter = _DropLibraryChatter()
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(chatter)
  logging.getLogger('absl').addFilter(chatter)
  for name in ('orbax', 'orbax.checkpoint'):
    logging.getLogger(name).setLevel(logging.ERROR)
  logging.getLogger('pyogrio').setLevel(logging.WARNING)  # "Created N records"


def positive(name: str, value: int | None, minimum: int = 1) -> None:
  if value is not None and value < minimum:
    raise UsageError(f'--{name}={value} must be >= {minimum}')


def in_open_unit_interval(name: str, value: float | None) -> None:
  if value is not None and not 0.0 < value < 1.0:
    raise UsageError(f'--{name}={value} must be between 0 and 1 (exclusive), e.g. 0.5')
