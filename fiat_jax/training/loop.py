"""The training loop: steps, logging, periodic evaluation with best-checkpoint selection, saving, SIGTERM.

Step t's metrics are fetched once step t+1 is dispatched (as in nanodo's loop): the host never blocks on the step it
just launched, and prepares the next batch while the device computes. Before a save, an evaluation or the end, the
metrics of every step up to it are fetched and checked, so a non-finite loss never reaches a checkpoint.
"""
import itertools
import math
import signal
import time
import typing
from typing import Any, Callable, Iterable

import jax
import numpy as np

from fiat_jax.model import sharding
from fiat_jax.training import checkpoint
from fiat_jax.training import logs


class Start(typing.NamedTuple):
  """A run as restore-or-start leaves it: the state to step from, and where it is logged and saved."""
  state: dict  # trainable tree, optimizer state, step and RNG: fresh, or the resumed checkpoint's
  frozen: Any
  state_sh: dict  # shardings of `state` (the step's jit, restores)
  frozen_sh: Any
  best: dict | None  # {'metric', 'step', 'value'} of the best evaluated checkpoint so far
  resumed: int | None  # the checkpoint step resumed from; None: a fresh start
  identity: dict  # what a resume must match (checkpoint.check_resume), recorded in every checkpoint
  base: dict  # the frozen base's reference (checkpoint.base_reference), recorded in every checkpoint
  mesh: Any
  log: logs.RunLog
  mgr: Any  # orbax CheckpointManager over run_dir/checkpoints


class End(typing.NamedTuple):
  """Where the loop stopped: its last step's state (saved) and the best evaluated checkpoint."""
  step: int
  state: dict
  best: dict | None
  preempted: bool  # stopped by SIGTERM after saving


class Validation(typing.NamedTuple):
  """How a state is validated: eval/loss of `loss_fn` over `batches`, and eval/<name> of `evaluate`."""
  evaluate: Callable[[int, dict], dict] | None
  batches: Iterable | Callable | None
  loss_fn: Callable  # jitted (trainable, frozen, batch) -> (summed NLL, summed loss weight)


class _Pending(typing.NamedTuple):
  """A dispatched step whose metrics are still on the device."""
  step: int
  metrics: dict
  tokens: int  # tokens in its global batch, for tokens_per_s


class _Sigterm:
  """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.received = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _batch_iterator(batches, start: int):
  """`batches(start_step)` when callable (e.g. batches.train_batches via functools.partial), else skips `start`."""
  if callable(batches):
    return iter(batches(start))
  return itertools.islice(iter(batches), start, None)


def _next_batch(it, rows: int, step: int, num_steps: int) -> dict:
  """This process's batch for update step + 1, with the DecoderFeatureConverter features and `rows` rows."""
  local = next(it, None)
  if local is None:
    raise ValueError(f"the training batches ran out after {step} steps; num_steps is {num_steps}")
  for name in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
    if name not in local:
      raise ValueError(f"batch for step {step + 1} has no {name!r} (keys: {sorted(local)}); batches need the "
                       f"seqio.DecoderFeatureConverter features")
  got = np.shape(local["decoder_input_tokens"])[0]
  if got != rows:
    raise ValueError(f"batch for step {step + 1} has {got} rows; TrainConfig.batch_size "
                     f"{rows * jax.process_count()} over {jax.process_count()} process(es) needs {rows} per process")
  return local


def _jit_step(step_fn, start: Start, batch: dict):
  """The step jitted with the shardings of the state, the frozen tree and `batch`; the state is donated."""
  batch_sh = {k: v.sharding for k, v in batch.items()}
  return jax.jit(step_fn, in_shardings=(start.state_sh, start.frozen_sh, batch_sh),
                 out_shardings=(start.state_sh, None), donate_argnums=(0,))


def _to_host(metrics: dict) -> dict:
  """A step's metrics as Python floats: the loop's one wait for the device per step."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _fetch_and_log(tcfg, start: Start, pending: _Pending, t_prev: float) -> float:
  """Fetches a step's metrics, stops on a non-finite loss, logs them on log steps; returns when they arrived."""
  scalars = _to_host(pending.metrics)
  step, loss = pending.step, scalars["loss"]
  if not math.isfinite(loss):
    last = start.mgr.latest_step()
    raise FloatingPointError(
        f"loss is {loss} at step {step} (the update from step {step - 1}); stopped without saving it. "
        f"The last good checkpoint is " + (f"{start.mgr.directory}/{last}" if last is not None else "none"))
  now = time.perf_counter()  # the step's end, as far as the host can tell: step_time_s spans two of them
  if step % tcfg.log_every == 0 or step == tcfg.num_steps:
    scalars["step_time_s"] = now - t_prev
    scalars["tokens_per_s"] = pending.tokens / (now - t_prev)
    start.log.scalars(step, scalars)
    start.log.progress(step, scalars)
  return now


def is_better(value: float, best: dict | None, mode: str) -> bool:
  """Whether a validation value beats the best so far (the first finite value beats a non-finite best)."""
  if best is None:
    return True
  if not math.isfinite(value):
    return False
  return not math.isfinite(best["value"]) or (value > best["value"] if mode == "max" else value < best["value"])


def _validation_metrics(step, state, frozen, validation: Validation, mesh) -> dict:
  """eval/loss over the validation batches (token-weighted) and eval/<name> of the evaluate callback."""
  metrics = {}
  if validation.batches is not None:
    nll, weight = 0.0, 0.0
    with sharding.activation_rules(mesh):
      for local in (validation.batches() if callable(validation.batches) else validation.batches):
        n, w = validation.loss_fn(state["trainable"], frozen, sharding.global_batch(local, mesh))
        nll, weight = nll + float(n), weight + float(w)
    metrics["eval/loss"] = nll / max(weight, 1e-9)
  if validation.evaluate is not None:
    scores = validation.evaluate(step, {**frozen, **state["trainable"]})
    metrics.update({f"eval/{k}": float(v) for k, v in scores.items()})
  return metrics


def _evaluate(tcfg, start: Start, validation: Validation, step: int, state, best) -> tuple[dict, float]:
  """Validates the state of `step` and logs it; returns (the best so far, this step's value of best_metric)."""
  metrics = _validation_metrics(step, state, start.frozen, validation, start.mesh)
  if tcfg.best_metric not in metrics:
    raise ValueError(f"TrainConfig.best_metric {tcfg.best_metric!r} is not among the evaluation's metrics "
                     f"{sorted(metrics)}")
  value = metrics[tcfg.best_metric]
  if is_better(value, best, tcfg.best_mode):
    best = dict(metric=tcfg.best_metric, step=step, value=value)
  start.log.scalars(step, metrics)
  start.log.text(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) +
                 f" (best {best['metric']} {best['value']:.4f} at step {best['step']})")
  return best, value


def _save(start: Start, step: int, state, best: dict | None, value: float | None = None):
  """Checkpoints `state` at `step`; `value` (its validation value) makes it a candidate for the best."""
  checkpoint.save(start.mgr, step, state, dict(step=step, data_position=step, identity=start.identity,
                                               base=start.base, best=best), value)


def run(tcfg, start: Start, step_fn: Callable, batches: Iterable | Callable[[int], Iterable],
        validation: Validation) -> End:
  """Steps from start.state to tcfg.num_steps, logging, evaluating and saving on the way; SIGTERM saves and stops.

  Args:
    tcfg: the run's train.TrainConfig.
    step_fn: (state, frozen, batch) -> (state, metrics), jitted here.
    batches: per-host batches in order; a callable gets the number of batches already consumed (resume).
  """
  step, state, best = int(start.state["step"]), start.state, start.best
  has_eval = validation.evaluate is not None or validation.batches is not None
  sigterm = _Sigterm()
  try:
    if start.resumed is None and tcfg.eval_at_start and has_eval:
      best, value = _evaluate(tcfg, start, validation, 0, state, best)
      _save(start, 0, state, best, value)
    it = _batch_iterator(batches, step)
    rows = tcfg.batch_size // jax.process_count()
    jitted, pending, t_prev = None, None, time.perf_counter()
    while step < tcfg.num_steps:
      try:
        local = _next_batch(it, rows, step, tcfg.num_steps)
        batch = sharding.global_batch(local, start.mesh)
        if jitted is None:  # the batch's shardings are known once its keys and ranks are
          jitted = _jit_step(step_fn, start, batch)
        with sharding.activation_rules(start.mesh):
          state, metrics = jitted(state, start.frozen, batch)
      except Exception:
        if pending is not None:  # a non-finite loss of the step before stays the error reported, as it came first
          _fetch_and_log(tcfg, start, pending, t_prev)
        raise
      step += 1
      if pending is not None:  # the previous step's metrics, while this one runs
        t_prev = _fetch_and_log(tcfg, start, pending, t_prev)
      pending = _Pending(step, metrics, np.size(local["decoder_input_tokens"]) * jax.process_count())
      stop = sigterm.received  # read once: the save below and the stop agree
      evaluating = has_eval and ((tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.num_steps)
      if evaluating or step % tcfg.save_every == 0 or step == tcfg.num_steps or stop:
        # This step's loss is checked before its state is evaluated or saved; the next step waits for that.
        t_prev, pending = _fetch_and_log(tcfg, start, pending, t_prev), None
        value = None
        if evaluating:
          best, value = _evaluate(tcfg, start, validation, step, state, best)
        _save(start, step, state, best, value)
      if stop:
        start.log.text(f"SIGTERM: saved {start.mgr.directory}/{step}; stopping (restart in the same run directory "
                       f"to resume)")
        return End(step, state, best, True)
    if start.mgr.latest_step() != step:  # resumed after the end, or a save was skipped
      _save(start, step, state, best)
    return End(step, state, best, False)
  finally:
    sigterm.restore()
