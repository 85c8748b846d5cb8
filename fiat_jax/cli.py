"""The command-line convention every `fiat` mode shares, as T5X users expect: --gin_file (repeatable; looked up
in the current directory, then in gin_configs/) and --gin.NAME=VALUE bindings; anything else fails fast."""
import argparse
import logging
import os

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin_configs')


class _GinPathNoise(logging.Filter):
  """gin logs an ERROR for every search-path location it tries before the one that holds the file."""

  def filter(self, record):
    return not str(record.msg).startswith('Path not found: ')


_GIN_PATH_NOISE = _GinPathNoise()  # one instance: the root logger keeps it once however often modes parse


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
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger().addFilter(_GIN_PATH_NOISE)
  gin.add_config_file_search_path(GIN_DIR)
  for path in args.gin_file:
    if not os.path.exists(path) and not os.path.exists(os.path.join(GIN_DIR, path)):
      raise FileNotFoundError(f'--gin_file={path}: not found (looked in the current directory and {GIN_DIR})')
  # local_beta and tau_model load checkpoints through hf: its configurables must exist before gin parses.
  from fiat_jax import hf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  gin.parse_config_files_and_bindings(args.gin_file, bindings)  # raises naming any unknown configurable
  return args


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
