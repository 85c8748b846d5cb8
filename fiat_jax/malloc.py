"""Keeps the memory XLA frees on the CPU mapped for its next step (glibc malloc settings for this process).

XLA's CPU runtime allocates each execution's temporaries (gigabytes for a train step) from its worker threads
and frees them when the step ends. Under glibc's defaults those threads allocate from per-thread arenas, whose
heaps cannot grow past 64 MiB, so every large buffer is a fresh `mmap` that is `munmap`ped on free: the next step
page-faults all of it in again (for the train-step benchmark's config, 2.5 GiB and ~650,000 page faults per
step, a quarter of the step's CPU time spent in the kernel). The environment variable `GLIBC_TUNABLES` with
`mmap_max=0` does not cure it, because glibc still falls back to `mmap` in non-main arenas.

With `FIAT_GLIBC_MALLOC=reuse` in the environment, `keep_freed_memory()` makes every thread allocate from the main
arena, which grows with `brk`, and never trims or maps it away, so a step reuses the previous step's pages (the
train-step benchmark's LoRA step: ~7.2 s -> ~6.0 s here). It is off by default because freed memory is never
returned, and when small allocations land in the hole a step's temporaries left before the next step asks for
it again, the heap grows by that much once: the same benchmark's peak RSS was ~5 GB rather than ~3 GB in some
runs here (about half before `lora.lora_dense`, 1 of 13 after), with a 14 s step where the heap grew. The `fiat`
command, the demo and the sweep call it first thing; it must run before the process starts threads (numpy's
BLAS pool does at import): arenas already handed out stay in use.
"""
import ctypes
import ctypes.util
import logging
import os

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIMMING = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

ENV = "FIAT_GLIBC_MALLOC"


def keep_freed_memory() -> bool:
  """With FIAT_GLIBC_MALLOC=reuse: one arena, no mmap and no trimming. False where it is not asked for (or not
  glibc); any other value of the variable is an error."""
  setting = os.environ.get(ENV, "")
  if setting not in ("", "default", "reuse"):
    raise ValueError(f"environment variable {ENV}={setting!r}: use 'reuse' (keep freed memory mapped) or 'default'")
  if setting != "reuse":
    return False
  path = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(path)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (only glibc has it)
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIMMING)))
  if not ok:
    logging.warning("glibc mallopt refused a setting; XLA's CPU temporaries may be re-faulted every step")
  return ok
