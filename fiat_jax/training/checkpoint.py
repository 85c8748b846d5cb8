"""Orbax checkpoints of a training run: the trainable tree, optimizer state, step, RNG and data position.

The frozen base is referenced (its path and a fingerprint of its config), never copied. Retention keeps the
`keep` newest checkpoints plus the best by the configured metric. A save that was cut off (a half-written
directory) is moved aside on the next start and reported; it is never listed or restored.

A committed checkpoint that no longer restores (a missing or truncated file, missing metadata) is moved aside
too, and resume falls back to the newest one that does.

Layout of a run directory: checkpoints/<step>/{state, meta}, partial_checkpoints/<name>-<time> and
corrupt_checkpoints/<step>.corrupt-<time> (moved aside).
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINTS = "checkpoints"
PARTIAL = "partial_checkpoints"
CORRUPT = "corrupt_checkpoints"
META_FIELDS = ("step", "data_position", "identity", "base", "best")
COMMIT_FILE = "commit_success.txt"  # Orbax writes it last, before the atomic rename (or as the commit on GCS).
ITEMS = ("state", "meta")


def config_fingerprint(model_cfg) -> str:
  """sha256 (first 16 hex) of every field of the model config (LoRA config included)."""
  text = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_reference(model_cfg, path: str | None) -> dict:
  """How a checkpoint names its frozen base: where it was loaded from, and its config's fingerprint."""
  return {"path": path or "", "config_fingerprint": config_fingerprint(model_cfg)}


def is_complete(step_dir: str) -> bool:
  """A finished save: a step-number directory with Orbax's commit marker, in itself and in every item."""
  name = os.path.basename(step_dir.rstrip("/"))
  return (name.isdigit() and os.path.isfile(os.path.join(step_dir, COMMIT_FILE))
          and all(os.path.isfile(os.path.join(step_dir, item, COMMIT_FILE)) for item in ITEMS))


def recover_partial(run_dir: str) -> list[str]:
  """Moves half-written saves out of checkpoints/ (into partial_checkpoints/); returns one notice per save."""
  ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
  notices = []
  if jax.process_index() == 0 and os.path.isdir(ckpt_dir):
    for name in sorted(os.listdir(ckpt_dir)):
      path = os.path.join(ckpt_dir, name)
      if not os.path.isdir(path) or is_complete(path):
        continue
      dest = os.path.join(run_dir, PARTIAL, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(path, dest)
      notices.append(f"checkpoint: {path} is an incomplete save (interrupted before its commit); moved it to "
                     f"{dest} and will not use it")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fiat_jax.training.checkpoint.recover_partial")
  return notices


def _metric_key(best_mode: str):
  """Orbax BestN ranks ascending and keeps the last: the best value, and among equal values the earliest step
  (the trainer's own choice: it only replaces the best on a strict improvement)."""
  if best_mode == "max":
    return lambda m: (m["value"] if math.isfinite(m["value"]) else -math.inf, -m["step"])
  return lambda m: (m["value"] if math.isfinite(m["value"]) else math.inf, m["step"])


def manager(run_dir: str, keep: int, best_mode: str = "min") -> ocp.CheckpointManager:
  """Orbax manager over run_dir/checkpoints: keeps the `keep` newest saves plus the best evaluated one."""
  if keep < 1:
    raise ValueError(f"checkpoint keep={keep}: at least the newest checkpoint must be kept")
  if best_mode not in ("min", "max"):
    raise ValueError(f"best_mode={best_mode!r}: use 'min' or 'max'")
  keep_policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=_metric_key(best_mode), reverse=best_mode == "min", n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=keep_policy, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)), options=options,
                               item_names=ITEMS)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict, best_value: float | None = None):
  """Saves (and commits) one checkpoint; `best_value` marks it as evaluated, a candidate for the best."""
  metrics = None if best_value is None else {"value": float(best_value), "step": int(step)}
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
           metrics=metrics, force=True)
  mgr.wait_until_finished()


def abstract(state, shardings):
  """ShapeDtypeStructs of `state` placed with `shardings`: the restore target (any mesh, any device count)."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(state laid out as `abstract_state`, meta dict) of checkpoint `step`."""
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                  meta=ocp.args.JsonRestore()))
  return out.state, dict(out.meta)


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON part of checkpoint `step` (data position, base reference, best so far)."""
  return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def _move_aside(mgr: ocp.CheckpointManager, run_dir: str, step: int) -> str:
  """Moves checkpoint `step` to corrupt_checkpoints/<step>.corrupt-<time> (process 0) and re-lists the steps."""
  src = os.path.join(str(mgr.directory), str(step))
  dest = os.path.join(run_dir, CORRUPT, f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(src, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"fiat_jax.training.checkpoint.move_aside.{step}")
  mgr.reload()
  return dest


def restore_newest(mgr: ocp.CheckpointManager, run_dir: str, abstract_state,
                   check: Callable[[dict, str], None]) -> tuple[int | None, Any, dict | None, list[str]]:
  """(step, state, meta, notices) of the newest checkpoint that restores; (None, None, None, notices) if none.

  `check(meta, where)` vets a checkpoint before its state is read (a changed run identity raises: the user's
  error, never a fallback). A checkpoint whose metadata or state cannot be read is moved aside with a notice
  naming where it went, and the next older one is tried.
  """
  notices = []
  for step in sorted(mgr.all_steps(), reverse=True):
    where = f"{mgr.directory}/{step}"
    try:
      meta = read_meta(mgr, step)
      absent = [f for f in META_FIELDS if f not in meta]
      if absent:
        raise ValueError(f"its metadata lacks {absent}")
    except Exception as e:  # pylint: disable=broad-except  (Orbax and tensorstore raise many kinds)
      notices.append(_corrupt_notice(where, _move_aside(mgr, run_dir, step), e))
      continue
    check(meta, where)
    try:
      state, meta = restore(mgr, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      notices.append(_corrupt_notice(where, _move_aside(mgr, run_dir, step), e))
      continue
    return step, state, meta, notices
  return None, None, None, notices


def _corrupt_notice(where: str, dest: str, error: Exception) -> str:
  first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  return (f"warning: checkpoint {where} is committed but does not restore ({type(error).__name__}: {first}); "
          f"moved it to {dest} and trying the next older one")


def check_resume(saved: dict, current: dict, where: str):
  """Raises ValueError naming each field of the run's identity that differs from the checkpoint's."""
  changed = []
  for field in ("mode", "batch_size", "data_fingerprint", "base_config_fingerprint"):
    if saved.get(field) != current.get(field):
      changed.append(f"{field}: checkpoint has {saved.get(field)!r}, this run has {current.get(field)!r}")
  if changed:
    raise ValueError(f"cannot resume from {where}: " + "; ".join(changed) +
                     ". Use a new run directory, or restore the original setting.")
