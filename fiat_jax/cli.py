"""The command-line convention every `fiat` mode shares, as T5X users expect: --gin_file (repeatable; looked up
in the current directory, then in gin_configs/) and --gin.NAME=VALUE bindings; anything else fails fast."""
import argparse
import logging
import os
import sys

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin_configs')


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


def parse_gin(argv: list[str], prog: str, extra=None, description: str | None = None) -> argparse.Namespace:
  """Parses the flags (`extra(ap)` adds a mode's own), sets up logging and parses the gin files and bindings.

  An unknown flag, a missing gin file or an unknown configurable / parameter is an error naming it.
  """
  ap = argparse.ArgumentParser(prog=prog, description=description)
  ap.add_argument('--gin_file', action='append', default=[], help='repeatable; relative to gin_configs/ or cwd')
  if extra:
    extra(ap)
  args, rest = ap.parse_known_args(argv)
  bindings = [a[len('--gin.'):] for a in rest if a.startswith('--gin.')]
  unknown = [a for a in rest if not a.startswith('--gin.')]
  if unknown:
    ap.error(f'unknown arguments {unknown}: gin bindings are --gin.NAME=VALUE')
  setup_logging()
  gin.add_config_file_search_path(GIN_DIR)
  files = [resolve_gin_file(path) for path in args.gin_file]
  # Every configurable any gin file may name must exist before gin parses, whichever mode this is.
  from fiat_jax import configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  gin.parse_config_files_and_bindings(files, bindings)  # raises naming any unknown configurable
  return args


def resolve_gin_file(path: str) -> str:
  """A --gin_file as a file path: as given when it exists, else under gin_configs/; else an error naming both."""
  for candidate in (path, os.path.join(GIN_DIR, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f'--gin_file={path}: not found (looked in the current directory and {GIN_DIR})')


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


def is_bound(name: str) -> bool:
  """Whether the parsed gin config binds `configurable.parameter`."""
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def name_missing_macros(fn):
  """Runs fn(); an unbound %MACRO's ValueError is re-raised naming it plainly."""
  try:
    return fn()
  except ValueError as e:
    if 'gin.macro' in str(e):
      raise ValueError(f'a required gin macro is not bound: {str(e).splitlines()[0]}') from None
    raise
