"""The `fiat` command: `fiat MODE [flags]`, like T5X's main; each mode's logic lives in its own library module
(the table and the flags: commands.py)."""
import importlib
import logging
import os
import sys
import time

from fiat_jax import commands
from fiat_jax import malloc

MODES = commands.MODES


def run(argv: list[str] | None = None) -> int:
  """Console-script entry point: help without importing JAX; a user's mistake is one line and exit code 2."""
  malloc.keep_freed_memory()  # with FIAT_GLIBC_MALLOC=reuse; before any library starts its threads
  argv = sys.argv[1:] if argv is None else argv
  # A gin file's `import my_module` (a user's LoRA variant) imports as Python does, but a console script's
  # sys.path lacks the working directory that `python -m` has: appended, so a module beside the run is found and
  # never shadows an installed package of the same name.
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())
  if not argv or argv[0] in ('-h', '--help'):
    print(commands.overview(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  mode, rest = argv[0], argv[1:]
  if mode not in MODES:
    print(f"fiat: error: unknown mode {mode!r}; the modes: {', '.join(MODES)} (fiat --help)", file=sys.stderr)
    return 2
  if '-h' in rest or '--help' in rest:
    commands.parser(mode).print_help()
    return 0
  return commands.run_guarded(f'fiat {mode}', lambda args: _run_mode(mode, args), rest)


def _run_mode(mode: str, rest: list[str]) -> int:
  spec = MODES[mode]
  start = time.time()
  if spec.distributed:
    from fiat_jax import cli  # pylint: disable=g-import-not-at-top  (JAX: not for `fiat --help`)
    from fiat_jax.training import distributed  # pylint: disable=g-import-not-at-top
    cli.setup_logging()
    settings, rest = distributed.pop_flags(rest)
    distributed.initialize(settings)  # once, before any JAX computation; logs this process's place
    distributed.quiet_non_writers()
  if spec.gin:  # every configurable a gin file may name, whichever mode reads it
    from fiat_jax import configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  module, func = spec.target.split(':')
  code = int(getattr(importlib.import_module(module), func)(rest) or 0)
  if spec.distributed:
    logging.info('fiat %s: finished in %.1f s (exit code %d)', mode, time.time() - start, code)
  return code


if __name__ == '__main__':
  sys.exit(run())
