"""The command-line convention every `fiat` mode shares, as T5X users expect: --gin_file (repeatable; looked up
in the current directory, then in gin_configs/) and --gin.NAME=VALUE bindings; anything else fails fast."""
import argparse
import difflib
import inspect
import logging
import os
import re
import sys

import gin

from fiat_jax import commands

UsageError = commands.UsageError
# Installed (a wheel): the gin files ship inside the package. A source checkout (editable install): the repository's.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_PACKAGED = os.path.join(_PACKAGE, 'gin_configs')
GIN_DIR = _PACKAGED if os.path.isdir(_PACKAGED) else os.path.join(os.path.dirname(_PACKAGE), 'gin_configs')


class _GinPathNoise(logging.Filter):
  """gin logs an ERROR for every search-path location it tries before the one that holds the file (and INFO for
  the one that does)."""

  def filter(self, record):
    return not str(record.msg).startswith(('Path not found: ', 'system_path_file_exists:'))


class _CheckpointerNoise(logging.Filter):
  """Orbax logs a dozen INFO lines per save (through absl); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


_GIN_PATH_NOISE = _GinPathNoise()  # one instance: the root logger keeps it once however often modes parse
_CHECKPOINTER_NOISE = _CheckpointerNoise()


def parse_gin(argv: list[str], mode: str) -> argparse.Namespace:
  """Parses a mode's flags (commands.parser), sets up logging and parses the gin files and bindings.

  Every mistake (an unknown flag, a missing gin file, an unknown configurable or parameter, a value gin cannot
  parse, a required macro left unbound) is a UsageError naming it and the fix.

  The configurables the gin files name must be registered first: `fiat` imports fiat_jax.configurables before a
  gin mode starts (a script calling a mode's main does the same).
  """
  args, rest = commands.parser(mode).parse_known_args(argv)
  bindings = [a[len('--gin.'):] for a in rest if a.startswith('--gin.')]
  unknown = [a for a in rest if not a.startswith('--gin.')]
  if unknown:
    raise UsageError(f'unknown arguments {unknown}: gin bindings are --gin.NAME=VALUE (`fiat {mode} --help`)')
  setup_logging()
  gin.add_config_file_search_path(GIN_DIR)
  files = [resolve_gin_file(path) for path in args.gin_file]
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except SyntaxError as e:  # gin's parser: the binding or file line it could not read
    raise UsageError(_syntax_hint(e, bindings)) from e
  except ValueError as e:
    raise UsageError(_gin_error_line(e)) from e
  except ImportError as e:  # a gin file's `import my_module`: gin names the file and line
    raise UsageError(f'{_gin_error_line(e)}: a gin file imports from the working directory, PYTHONPATH and the '
                     f'installed packages') from e
  return args


def resolve_gin_file(path: str) -> str:
  """A --gin_file as a file path: as given when it exists, else under gin_configs/; else an error naming both."""
  for candidate in (path, os.path.join(GIN_DIR, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise UsageError(f'--gin_file={path}: not found (looked in the current directory and in {GIN_DIR})')


def _syntax_hint(e: SyntaxError, bindings: list[str]) -> str:
  where = f'{e.filename}:{e.lineno}' if e.filename and e.filename != '<string>' else 'a --gin. binding'
  text = (e.text or '').strip()
  name, eq, value = text.partition('=')
  if eq and text in [b.strip() for b in bindings] and value.strip()[:1] not in ('"', "'", '[', '(', '{', '@', '%'):
    return (f'--gin.{text}: gin cannot parse the value {value.strip()!r}; a string is quoted for gin inside the '
            f'shell\'s quotes: --gin.{name.strip()}="\'{value.strip()}\'"')
  return f'{where}: gin cannot parse {text!r}: {e.msg}'


def _gin_error_line(e: Exception) -> str:
  """gin's error as one line: an unbound macro, an unknown configurable or parameter (with where it was bound)."""
  msg = str(e)
  first = msg.splitlines()[0]
  if 'gin.macro' in first:  # "No bindings specified for 'DATA_DIR/gin.macro' in config string: <the whole config>"
    macro = first.split("'")[1].split('/')[0] if "'" in first else first
    return f'the gin macro {macro} is required and not bound: add --gin.{macro}=VALUE (or a gin file binding it)'
  where = [line.strip() for line in msg.splitlines()[1:] if line.strip()]
  return (_set_by_run(first) or first + _did_you_mean(first)) + (f' ({"; ".join(where[:2])})' if where else '')


def _set_by_run(message: str) -> str:
  """For gin's "Configurable 'C' has denylisted kwarg 'p'": what sets C.p instead (C.SET_BY_RUN), or ''."""
  match = re.match(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'", message)
  if not match:
    return ''
  try:  # pylint: disable=protected-access
    reasons = getattr(gin.config._REGISTRY.get_match(match.group(1)).wrapped, 'SET_BY_RUN', {})
  except (AttributeError, TypeError, ValueError):
    reasons = {}
  why = reasons.get(match.group(2), 'the code sets it')
  return f'{match.group(1)}.{match.group(2)} cannot be bound in gin: {why}; drop the binding'


def _did_you_mean(message: str) -> str:
  """For gin's "Configurable 'C' doesn't have a parameter named 'p'": C's parameters closest to p."""
  match = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
  if not match:
    return ''
  try:  # gin has no public look-up of a configurable's function; without it the message stays gin's
    fn = gin.config._REGISTRY.get_match(match.group(1)).wrapped  # pylint: disable=protected-access
    names = list(inspect.signature(fn).parameters)
  except (AttributeError, TypeError, ValueError):
    return ''
  close = difflib.get_close_matches(match.group(2), names, n=3)
  return f' Did you mean {" or ".join(close)}?' if close else f' Its parameters: {", ".join(names)}.'


def setup_logging() -> None:
  """INFO and above on stderr with times, whatever handler a library (absl via seqio) installed first."""
  level = logging.INFO
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
    level = logging.WARNING  # one log tells the story: process 0's
  logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(message)s', force=True)
  logging.getLogger().addFilter(_GIN_PATH_NOISE)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_CHECKPOINTER_NOISE)  # on the handler: absl's records reach it through the 'absl' logger
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity('info' if level == logging.INFO else 'warning')
  logging.captureWarnings(True)  # Python warnings in the same format as every other line
  if not commands.verbose():  # "Unable to initialize backend 'tpu'" and the like, on every machine without one
    logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)


def is_bound(name: str) -> bool:
  """Whether the parsed gin config binds `configurable.parameter`."""
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def name_missing_macros(fn):
  """Runs fn(); an unbound %MACRO's ValueError (gin reports it when the configurable is called) is a UsageError."""
  try:
    return fn()
  except ValueError as e:
    if 'gin.macro' in str(e).splitlines()[0]:
      raise UsageError(_gin_error_line(e)) from None
    raise
