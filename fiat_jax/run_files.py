"""A run directory's integrity: atomic writes of its files, one `fiat train` at a time (the run lock), writability
checked before a long run, and the recorded settings a resumed run must match.

The truth for a resume is `train_config.json`: written when a run starts (and rewritten only when
`--allow_changed_settings` accepts a change, which `settings_history.jsonl` records), it holds every setting
that shapes the run: TrainConfig (optimizer, schedule, seed, steps), the model config (LoRA config included),
the base's reference, the training data's fingerprint, and the Recipe and Experiment of `fiat train`.
`config.gin` and `metrics.json` are written from the same settings after they were checked.
"""
import contextlib
import json
import os
import socket
import time

from fiat_jax import commands

SETTINGS_FILE = "train_config.json"
HISTORY_FILE = "settings_history.jsonl"
LOCK_FILE = "run.lock"
# Fields of train_config.json that say how a run is computed or logged, not what it computes: a resume may change
# them (another machine may need another kernel, remat policy or logging cadence). Experiment's names and paths
# locate files; the data's content is compared through data_fingerprint, and Experiment.seed is TrainConfig.seed.
HOW_NOT_WHAT = ("train.log_every", "train.tensorboard", "train.save_every", "train.keep", "train.remat_policy",
                "model.remat_policy", "model.kernels", "base.path", "run.experiment.name",
                "run.experiment.runs_root", "run.experiment.setting", "run.experiment.row",
                "run.experiment.tau_size", "run.experiment.data_dir", "run.experiment.store_dir",
                "run.experiment.eval_batch_size", "run.experiment.seed")
# What the checkpoints themselves depend on (the data position counts batches; the tensors have the base's and the
# adapter's shapes): no flag lets a resume change these.
FIXED = ("train.mode", "train.batch_size", "data_fingerprint", "base.config_fingerprint")
REBUILD = "rerun `fiat train` with the run's gin files in this run directory: it rebuilds them from the checkpoints"


class RunDirError(commands.UsageError):
  """A run directory that cannot be used as it is (busy, not writable, damaged, or recorded other settings)."""


def write_atomic(path: str, data: bytes | str, *, fsync: bool = True) -> None:
  """Writes `path` whole or not at all: a temporary file in the same directory, fsynced, renamed over it.

  A reader (or a run killed mid-write) sees the old file or the new one, never a prefix. fsync=False skips the
  flushes for files a rerun rewrites anyway.
  """
  data = data.encode("utf-8") if isinstance(data, str) else data
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{socket.gethostname()}-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  if fsync:  # the rename itself is durable only once the directory is
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_json(path: str, obj, **dump_kwargs) -> None:
  """json.dump of `obj` to `path`, atomically (indent 1 unless given)."""
  dump_kwargs.setdefault("indent", 1)
  write_atomic(path, json.dumps(obj, **dump_kwargs))


def read_json(path: str, rebuild: str = REBUILD) -> dict:
  """A run file's JSON object; a missing, empty or damaged file is a RunDirError naming it and how to rebuild it."""
  if not os.path.exists(path):
    raise RunDirError(f"{path}: missing; {rebuild}")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    obj = json.loads(raw.decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise RunDirError(f"{path}: damaged ({len(raw)} bytes, not valid JSON: {e}); {rebuild}") from None
  if not isinstance(obj, dict):
    raise RunDirError(f"{path}: damaged (a JSON {type(obj).__name__}, not an object); {rebuild}")
  return obj


def check_writable(run_dir: str) -> None:
  """Creates (and removes) a file in run_dir and in its checkpoints/: a run fails now, not after hours of training."""
  for directory in (run_dir, os.path.join(run_dir, "checkpoints")):
    if directory != run_dir and not os.path.isdir(directory):
      continue
    probe = os.path.join(directory, f".writable-{socket.gethostname()}-{os.getpid()}")
    try:
      os.makedirs(directory, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"0")
      os.remove(probe)
    except OSError as e:
      raise RunDirError(f"{directory}: not writable ({e.strerror or e}); a run writes its checkpoints and results "
                        f"there: make it writable, or bind another RUNS_DIR") from None


@contextlib.contextmanager
def lock(run_dir: str):
  """Holds run_dir/run.lock (flock, dropped by the OS when the holder dies, so a killed run leaves no stale lock)
  and writes the holder (host, pid, start time) into it; a second holder is refused naming the first."""
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only, like the store's shard locks)
  path = os.path.join(run_dir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not written its name"
      raise RunDirError(f"{run_dir}: another `fiat train` is using this run directory (held by {holder}; "
                        f"{path}); wait for it to end, or use another run directory") from None
    holder = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
    yield holder
  finally:
    os.close(fd)  # releases the lock


# ---- The recorded settings ------------------------------------------------------------------------------------

def _flat(tree, prefix: str = "") -> dict:
  """{dotted path: value} of nested dicts (lists stay whole values)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def plain(settings: dict) -> dict:
  """The settings as train_config.json holds them (tuples as lists, anything else JSON cannot hold as text)."""
  return json.loads(json.dumps(settings, default=str))


def differences(recorded: dict, current: dict) -> list[str]:
  """One line per setting that shapes the run and differs: `field: recorded X, now Y`."""
  old, new = _flat(plain(recorded)), _flat(plain(current))
  lines = []
  for field in sorted(set(old) | set(new)):
    if field in HOW_NOT_WHAT or old.get(field) == new.get(field):
      continue
    show = lambda d: json.dumps(d[field]) if field in d else "(not recorded)"
    lines.append(f"{field}: recorded {show(old)}, now {show(new)}")
  return lines


def check_settings(run_dir: str, current: dict, *, resuming_from: int | None, allow_changed: bool,
                   writer: bool = True) -> list[str]:
  """Records the run's settings, or checks a resumed run's against them; returns notices for the log.

  A fresh run (resuming_from None) writes train_config.json. A resume with other settings raises RunDirError
  with one line per field, unless allow_changed: then settings_history.jsonl gets the change (time, step, each
  field's old and new value) and train_config.json the new settings. Only the `writer` (process 0) writes; every
  process checks, so all of them stop on a refusal.
  """
  path = os.path.join(run_dir, SETTINGS_FILE)
  current = plain(current)
  if resuming_from is None:
    if writer:
      write_json(path, current)
    return []
  try:
    recorded = read_json(path, rebuild="it records the settings this run started with; restore it, or rerun with "
                                       "--allow_changed_settings to record this command's settings as the run's")
    lines = differences(recorded, current)
  except RunDirError as e:
    if not allow_changed:
      raise
    lines = [f"{SETTINGS_FILE}: unreadable ({str(e).split('; ')[0]}); this command's settings become the run's"]
  if not lines:
    return []
  fixed = [line for line in lines if line.split(":")[0] in FIXED]
  if fixed:
    raise RunDirError(f"{path}: a resume from step {resuming_from} cannot change these (the checkpoints depend on "
                      f"them), not even with --allow_changed_settings:\n" + "\n".join(f"  {line}" for line in fixed)
                      + "\nUse a new run directory (another Experiment.name or RUNS_DIR)")
  if not allow_changed:
    raise RunDirError(
        f"{path}: this command's settings differ from the ones the run recorded; refusing to resume from step "
        f"{resuming_from}:\n" + "\n".join(f"  {line}" for line in lines) +
        "\nUse a new run directory (another Experiment.name or RUNS_DIR), or rerun with --allow_changed_settings "
        f"to resume with this command's settings (the change is recorded in {HISTORY_FILE})")
  history = os.path.join(run_dir, HISTORY_FILE)
  if writer:
    entry = {"time": round(time.time(), 3), "resumed_from_step": resuming_from, "changes": lines}
    old = open(history, "rb").read() if os.path.exists(history) else b""
    write_atomic(history, old + (json.dumps(entry) + "\n").encode("utf-8"))
    write_json(path, current)
  return [f"--allow_changed_settings: resuming from step {resuming_from} with changed settings (recorded in "
          f"{history}):"] + [f"  {line}" for line in lines]
