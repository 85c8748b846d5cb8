"""The `fiat` command: `fiat MODE [flags]`, like T5X's main; each mode's logic lives in its own library module."""
import importlib
import logging
import sys
import time

from fiat_jax import malloc

# mode -> ("module:function", joins a multi-process run); each function takes argv (without the mode) and returns
# an exit code. Modes that run JAX on the run's devices start jax.distributed first (flags, environment or a
# Cloud TPU VM's metadata: fiat_jax/distributed.py); score, report and plan are single-process tools.
MODES = {
    "rationales": ("fiat_jax.beta.run:main", True),
    "icl": ("fiat_jax.beta.run:icl_main", True),
    "serve": ("fiat_jax.beta.serve:main", True),
    "score": ("fiat_jax.metrics:main", False),
    "train": ("fiat_jax.run:train_main", True),
    "evaluate": ("fiat_jax.evaluation:evaluate_main", True),
    "infer": ("fiat_jax.infer:main", True),
    "report": ("fiat_jax.report:main", False),
    "plan": ("fiat_jax.plan:main", False),
}


def run(argv: list[str] | None = None) -> int:
  """Console-script entry point."""
  malloc.keep_freed_memory()  # with FIAT_GLIBC_MALLOC=reuse; before any library starts its threads
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in MODES:
    print(f"usage: fiat {{{','.join(MODES)}}} [--gin_file=... --gin.NAME=VALUE ...]", file=sys.stderr)
    return 2
  mode, rest = argv[0], argv[1:]
  target, distributed_mode = MODES[mode]
  start = time.time()
  if distributed_mode:
    from fiat_jax import cli, distributed  # pylint: disable=g-import-not-at-top
    cli.setup_logging()
    settings, rest = distributed.pop_flags(rest)
    distributed.initialize(settings)  # once, before any JAX computation; logs this process's place
    distributed.quiet_non_writers()
  module, func = target.split(":")
  code = int(getattr(importlib.import_module(module), func)(rest) or 0)
  if distributed_mode:
    logging.info("fiat %s: finished in %.1f s (exit code %d)", mode, time.time() - start, code)
  return code


if __name__ == "__main__":
  sys.exit(run())
