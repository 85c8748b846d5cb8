"""fiat_jax.malloc: a large buffer freed by a worker thread is reused without page faults, as XLA's temporaries."""
import os
import subprocess
import sys

import pytest

# A fresh process: a worker thread allocates 256 MiB, writes it and frees it, twice (as XLA's threads do with a
# step's temporaries); prints the minor page faults of the second round.
PROBE = r"""
import ctypes, ctypes.util, resource, sys, threading
from fiat_jax import malloc
applied = malloc.keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
N = 256 << 20

def step():
  p = libc.malloc(N)
  ctypes.memset(p, 1, N)
  libc.free(p)

def in_thread():
  t = threading.Thread(target=step)
  t.start()
  t.join()

in_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_thread()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, N // 4096)
"""


def _probe(setting: str) -> tuple[int, int, int]:
  env = dict(os.environ, FIAT_GLIBC_MALLOC=setting)
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
  applied, faults, pages = (int(x) for x in out.stdout.split())
  return applied, faults, pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_buffer_is_reused_without_page_faults():
  applied, faults, pages = _probe("reuse")
  assert applied == 1
  assert faults < 0.02 * pages, (faults, pages)  # 65,536 pages; a few hundred faults at most from Python itself
  # Not asked for, glibc's own settings: the thread's arena maps the buffer afresh and unmaps it on free, so every
  # page faults again.
  applied, faults, pages = _probe("")
  assert applied == 0
  assert faults > 0.95 * pages, (faults, pages)


def test_unknown_setting_is_an_error(monkeypatch):
  from fiat_jax import malloc  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("FIAT_GLIBC_MALLOC", "yes")
  with pytest.raises(ValueError, match="FIAT_GLIBC_MALLOC='yes'"):
    malloc.keep_freed_memory()
