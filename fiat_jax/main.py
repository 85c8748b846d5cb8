"""The `fiat` command: `fiat MODE [flags]`, like T5X's main; each mode's logic lives in its own library module."""
import importlib
import sys

from fiat_jax import malloc

# mode -> "module:function"; each function takes argv (without the mode) and returns an exit code.
MODES = {
    "rationales": "fiat_jax.beta.run:main",
    "icl": "fiat_jax.beta.run:icl_main",
    "serve": "fiat_jax.beta.serve:main",
    "score": "fiat_jax.metrics:main",
    "train": "fiat_jax.run:train_main",
    "evaluate": "fiat_jax.run:evaluate_main",
    "infer": "fiat_jax.infer:main",
    "report": "fiat_jax.report:main",
    "plan": "fiat_jax.plan:main",
}


def run(argv: list[str] | None = None) -> int:
  """Console-script entry point."""
  malloc.keep_freed_memory()  # with FIAT_GLIBC_MALLOC=reuse; before any library starts its threads
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in MODES:
    print(f"usage: fiat {{{','.join(MODES)}}} [--gin_file=... --gin.NAME=VALUE ...]", file=sys.stderr)
    return 2
  module, func = MODES[argv[0]].split(":")
  return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(run())
