"""Multi-host start-up (`jax.distributed`) from flags or the environment, and "only process 0 writes" helpers.

Where the settings come from, first match wins:
  1. flags: --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
  2. environment: FIAT_COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS), FIAT_NUM_PROCESSES, FIAT_PROCESS_ID,
     FIAT_LOCAL_DEVICE_IDS, FIAT_DISTRIBUTED (launch/local.sh sets these);
  3. a Cloud TPU VM / pod slice: `jax.distributed.initialize()` finds every worker by itself;
  4. otherwise one process: nothing to start.
`--distributed=off` forces one process, `--distributed=on` fails unless one of 1-3 applies.
On CPU, cross-process collectives use gloo (jax config "jax_cpu_collectives_implementation").
"""
import dataclasses
import functools
import glob
import importlib.util
import logging
import os

import jax
from jax.experimental import multihost_utils

from fiat_jax import commands

FLAGS = ("coordinator_address", "num_processes", "process_id", "local_device_ids", "distributed")
ENV = {"coordinator_address": ("FIAT_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("FIAT_NUM_PROCESSES",), "process_id": ("FIAT_PROCESS_ID",),
       "local_device_ids": ("FIAT_LOCAL_DEVICE_IDS",), "distributed": ("FIAT_DISTRIBUTED",)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How this process joins a multi-process run (all None: decide from the environment)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  distributed: str = "auto"  # auto | on | off


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise commands.UsageError(f"{name}={value!r} is not an integer") from None


def _ids(value: str, name: str) -> tuple[int, ...]:
  return tuple(_int(v, name) for v in value.split(",") if v.strip())


def pop_flags(argv: list[str]) -> tuple[Settings, list[str]]:
  """Removes this module's --flag=value arguments from argv: (settings, the other arguments)."""
  values, rest = {}, []
  for arg in argv:
    name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    if name in FLAGS:
      if not eq:
        raise commands.UsageError(f"--{name} needs a value: --{name}=VALUE")
      values[name] = value
    else:
      rest.append(arg)
  return _settings(values, "--"), rest


def _settings(values: dict, prefix: str) -> Settings:
  out = {}
  for name, value in values.items():
    if name in ("num_processes", "process_id"):
      out[name] = _int(value, prefix + name)
    elif name == "local_device_ids":
      out[name] = _ids(value, prefix + name)
    else:
      out[name] = value
  mode = out.get("distributed", "auto")
  if mode not in ("auto", "on", "off"):
    raise commands.UsageError(f"{prefix}distributed={mode!r}: choose auto, on or off")
  return Settings(**out)


def from_env(environ=None) -> Settings:
  """Settings from FIAT_* (and JAX_COORDINATOR_ADDRESS) environment variables."""
  environ = os.environ if environ is None else environ
  values = {}
  for field, names in ENV.items():
    for name in names:
      if environ.get(name):
        values[field] = environ[name]
        break
  return _settings(values, "$")


def merge(flags: Settings, env: Settings) -> Settings:
  """Flags win over the environment, field by field."""
  return Settings(**{f.name: getattr(flags, f.name) if getattr(flags, f.name) not in (None, "auto")
                     else getattr(env, f.name) for f in dataclasses.fields(Settings)})


def on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM: libtpu installed and TPU chips attached (accel or vfio device files)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _explicit(s: Settings) -> bool:
  return any(v is not None for v in (s.coordinator_address, s.num_processes, s.process_id))


def initialize(settings: Settings | None = None, cpu_collectives: str = "gloo", timeout_s: int = 300) -> dict:
  """Starts jax.distributed when the settings (or the machine) ask for it; returns this process's place.

  Must run before the first JAX computation. Calling it again is a no-op.
  """
  s = merge(settings or Settings(), from_env())
  if jax.distributed.is_initialized():
    return describe()
  if s.distributed == "off":
    return describe()
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if _explicit(s):
    missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(s, n) is None]
    if missing:
      raise commands.UsageError(f"multi-process start-up needs coordinator_address, num_processes and process_id; missing "
                       f"{missing} (flags --NAME=VALUE or environment {[ENV[n][0] for n in missing]})")
    if not 0 <= s.process_id < s.num_processes:
      raise commands.UsageError(f"process_id={s.process_id} is not in [0, num_processes={s.num_processes})")
    jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id,
                               local_device_ids=list(s.local_device_ids) if s.local_device_ids else None,
                               initialization_timeout=timeout_s)
  elif on_cloud_tpu_vm():
    jax.distributed.initialize(initialization_timeout=timeout_s)  # workers found from the TPU metadata
  elif s.distributed == "on":
    raise commands.UsageError("--distributed=on but no coordinator_address / num_processes / process_id was given and this "
                     "is not a Cloud TPU VM")
  info = describe()
  logging.info("process %d of %d: %d local / %d global devices (%s)", info["process_index"], info["process_count"],
               info["local_devices"], info["global_devices"], info["platform"])
  return info


def describe() -> dict:
  """This process's index, the process count and device counts."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count(),
              local_devices=jax.local_device_count(), global_devices=jax.device_count(),
              platform=jax.devices()[0].platform)


def is_writer() -> bool:
  """Process 0 writes logs, reports and configs; Orbax checkpoints are the exception (every process saves)."""
  return jax.process_index() == 0


def writer_only(fn):
  """Decorator: runs `fn` on process 0 only; other processes get None."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    return fn(*args, **kwargs) if is_writer() else None
  return wrapped


def quiet_non_writers(level: int = logging.WARNING) -> None:
  """Processes other than 0 log only warnings and errors, so one log tells the story."""
  if not is_writer():
    logging.getLogger().setLevel(level)
    try:
      from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
      absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
      pass


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def shard_info() -> tuple[int, int]:
  """(shard_index, num_shards) of this host's input: one data shard per process."""
  return jax.process_index(), jax.process_count()


def process_share(items: list, index: int | None = None, count: int | None = None) -> list:
  """Items i with i % count == index: every item goes to exactly one process."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process_share: index {index} is not in [0, {count})")
  return items[index::count]


def main_with_distributed(entry):
  """Wraps a `main(argv) -> int` so it first pops the distributed flags and starts jax.distributed."""
  @functools.wraps(entry)
  def wrapped(argv: list[str]) -> int:
    settings, rest = pop_flags(argv)
    initialize(settings)
    quiet_non_writers()
    return entry(rest)
  return wrapped
