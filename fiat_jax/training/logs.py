"""Run logging: TensorBoard event files (clu metric writers), a metrics.jsonl file and a progress line with ETA.

Only process 0 writes files; every process may print its progress line.
"""
import datetime
import json
import math
import os
import sys
import time

import jax

from fiat_jax import run_files

METRICS_FILE = "metrics.jsonl"


def _plain(v):
  """A JSON-safe float (NaN / Inf become strings, which json would otherwise write as invalid tokens)."""
  v = float(v)
  return v if math.isfinite(v) else str(v)


class RunLog:
  """Scalars to TensorBoard + JSON lines, and a one-line progress report."""

  def __init__(self, run_dir: str, num_steps: int, tensorboard: bool = True, stream=None):
    self.num_steps = num_steps
    self.stream = stream or sys.stdout
    self.writes = jax.process_index() == 0
    self._writer = None
    self._jsonl = None
    self._t0, self._step0 = None, None
    self.path = os.path.join(run_dir, METRICS_FILE)
    if self.writes:
      os.makedirs(run_dir, exist_ok=True)
      self._jsonl = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from clu import metric_writers  # imports TensorFlow: only when event files are wanted
        self._writer = metric_writers.create_default_writer(os.path.join(run_dir, "tensorboard"),
                                                            just_logging=False, asynchronous=False)

  def scalars(self, step: int, metrics: dict):
    """Writes `metrics` ({name: number}) at `step` to TensorBoard and metrics.jsonl."""
    if not self.writes or not metrics:
      return
    if self._writer is not None:
      self._writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})
      self._writer.flush()
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def rewind(self, step: int) -> int:
    """Drops the records after `step` and every final test/ record (a resumed run logs them again); returns how
    many were dropped, a torn last line included. metrics.jsonl is rewritten atomically."""
    if not self.writes:
      return 0
    self._jsonl.close()
    with open(self.path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:  # a line cut by a kill mid-write
        continue
      if isinstance(record, dict) and record.get("step", math.inf) <= step and \
          not any(k.startswith("test/") for k in record):
        kept.append(line)
    if len(kept) != len(lines):
      run_files.write_atomic(self.path, "".join(line + "\n" for line in kept))
    self._jsonl = open(self.path, "a", encoding="utf-8")
    return len(lines) - len(kept)

  def text(self, message: str):
    """A line for the user (stdout), e.g. resume and checkpoint notices."""
    print(message, file=self.stream, flush=True)

  def progress(self, step: int, metrics: dict):
    """`step 120/1000 (12.0%) loss 1.2345 lr 1.0e-04 |g| 0.52 3,210 tok/s 0.41 s/step ETA 0:06:01`."""
    now = time.time()
    if self._t0 is None:
      self._t0, self._step0 = now, step
    parts = [f"step {step}/{self.num_steps} ({100.0 * step / max(self.num_steps, 1):.1f}%)"]
    if "loss" in metrics:
      parts.append(f"loss {float(metrics['loss']):.4f}")
    if "learning_rate" in metrics:
      parts.append(f"lr {float(metrics['learning_rate']):.1e}")
    if "grad_norm" in metrics:
      parts.append(f"|g| {float(metrics['grad_norm']):.3g}")
    if "tokens_per_s" in metrics:
      parts.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
    if "step_time_s" in metrics:
      parts.append(f"{float(metrics['step_time_s']):.3g} s/step")
    if step > self._step0:
      rate = (now - self._t0) / (step - self._step0)
      parts.append(f"ETA {datetime.timedelta(seconds=round(rate * (self.num_steps - step)))}")
    self.text(" ".join(parts))

  def close(self):
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
