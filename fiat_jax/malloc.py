"""Keeps the memory XLA frees on the CPU mapped for its next step (glibc malloc settings for this process).

XLA's CPU runtime allocates each execution's temporaries (gigabytes for a train step) from its worker threads
and frees them when the step ends. Under glibc's defaults those threads allocate from per-thread arenas, whose
heaps cannot grow past 64 MiB, so every large buffer is a fresh `mmap` that is `munmap`ped on free: the next step
page-faults all of it in again (for the train-step benchmark's config, 2.5 GiB and ~650,000 page faults per
step, a quarter of the step's CPU time spent in the kernel). The environment variable `GLIBC_TUNABLES` with
`mmap_max=0` does not cure it, because glibc still falls back to `mmap` in non-main arenas.

`keep_freed_memory()` makes every thread allocate from the main arena, which grows with `brk`, and never trims
or maps it away, so a step reuses the previous step's pages. The same buffers are live at the peak, but freed
memory is never returned, and when small allocations land in the hole a step's temporaries left before the next
step asks for it again, the heap grows by that much once (the train-step benchmark's LoRA step: peak RSS ~5.7 GB
rather than ~3.1 GB in 4 of 10 runs here, with a 14 s step where the heap grew). The `fiat` command, the demo and
the sweep call it first thing; set `FIAT_GLIBC_MALLOC=default` to keep glibc's own settings. It must run before
the process starts threads (numpy's BLAS pool does at import): arenas already handed out stay in use.
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
  """Sets one arena, no mmap and no trimming; False where this is not glibc or it is switched off."""
  if os.environ.get(ENV, "") == "default":
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
