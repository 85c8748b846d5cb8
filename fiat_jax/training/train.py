"""Training τ, Algorithm 1's inner loop: g = ∇_PEFT log P(y | x, ŷ_β; θ_τ, θ_PEFT, I_τ), then UPDATE.

One pure train step (state = trainable tree + optimizer state + step + RNG; frozen tree; batch) -> (new state,
metrics), jitted once with shardings and donation. The same code trains the LoRA collection only ('peft') or every
base parameter ('full': the paper's "w/o parameter-efficient tuning" ablation). Mixed precision: the trainable tree
(LoRA tensors, or full tuning's master weights) and the optimizer state are float32, a frozen base keeps its
param_dtype, and the model computes in Config.dtype (TrainConfig.compute_dtype when set). `train` runs three
parts: restore-or-start (a fresh state, or the newest Orbax checkpoint, which resumes exactly), the loop (loop.py:
steps, metrics and a progress line, periodic evaluation and saving, SIGTERM saves) and select-and-test (the best
checkpoint on validation, tested once).

Batches are dicts of numpy arrays with seqio.DecoderFeatureConverter keys: decoder_input_tokens,
decoder_target_tokens, decoder_loss_weights, decoder_causal_attention and, when packed, decoder_segment_ids and
decoder_positions.
"""
import dataclasses
import functools
import typing
from typing import Any, Callable, Iterable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fiat_jax import config_check
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib
from fiat_jax import run_files
from fiat_jax.training import checkpoint
from fiat_jax.training import logs
from fiat_jax.training import loop
from fiat_jax.training import losses
from fiat_jax.training import optim as optim_lib

MODES = ("peft", "full")


@gin.configurable(denylist=["mode", "seed"])  # what the run sets (SET_BY_RUN): a gin binding of them is an error
@dataclasses.dataclass(frozen=True)
@config_check.typed
class TrainConfig:
  """Everything about a run except the model, the data and the callbacks."""
  SET_BY_RUN = {"mode": "Recipe.peft sets it (True: peft, False: full)", "seed": "Experiment.seed sets it"}
  mode: str = "peft"  # peft: only LoRA trains | full: every base parameter trains
  num_steps: int = 1000
  batch_size: int = 8  # global examples (rows) per update, over all hosts
  micro_batches: int = 1  # gradient accumulation: each update sums this many slices of the batch
  seed: int = 0  # LoRA init and dropout keys
  z_loss: float = 0.0  # + z_loss * log(Z)^2 per target token
  label_smoothing: float = 0.0
  loss_chunk: int = 0  # positions per cross-entropy chunk (never the whole [B, L, V] logits); 0: no chunking
  # λ of distilled CoT: batches with decoder_task_ids (0 label, 1 rationale) train on the label token mean
  # + λ · the rationale token mean (losses.task_mean_weights); other batches on the token mean.
  rationale_loss_weight: float = 1.0
  # e.g. "bfloat16": matmuls in it (None: the model config's dtype). The trainable tree (LoRA tensors, or full
  # tuning's master weights) and the optimizer state are float32 either way; a frozen base keeps its param_dtype.
  compute_dtype: str | None = None
  remat_policy: str = "none"  # what each layer keeps for the backward pass: model.REMAT_POLICIES (none, full, ...)
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  eval_at_start: bool = False  # also evaluate the untrained model (step 0)
  save_every: int = 100
  keep: int = 3  # newest checkpoints kept (the best one is kept besides)
  best_metric: str = "eval/loss"
  best_mode: str = "min"  # min | max
  tensorboard: bool = True
  optim: optim_lib.OptimConfig = dataclasses.field(default_factory=lambda: optim_lib.OptimConfig())

  def __post_init__(self):
    if self.remat_policy not in model_lib.REMAT_POLICIES:
      raise ValueError(f"TrainConfig.remat_policy: {self.remat_policy!r} is not one of "
                       f"{', '.join(model_lib.REMAT_POLICIES)}")
    if self.mode not in MODES:
      raise ValueError(f"TrainConfig.mode: {self.mode!r} is not one of {MODES}")
    if self.best_mode not in ("min", "max"):
      raise ValueError(f"TrainConfig.best_mode: {self.best_mode!r} is not min or max")
    if self.micro_batches < 1 or self.batch_size % self.micro_batches:
      raise ValueError(f"TrainConfig: batch_size {self.batch_size} is not divisible by micro_batches "
                       f"{self.micro_batches}")


class TrainResult(typing.NamedTuple):
  step: int  # updates done
  preempted: bool  # stopped by SIGTERM after saving
  best: dict | None  # {'metric', 'step', 'value'} of the selected checkpoint
  test_metrics: dict | None  # what final_eval returned for the selected checkpoint
  trainable: Any  # the selected checkpoint's trainable tree (the last one's when preempted)
  frozen: Any
  selected_step: int  # the step `trainable` comes from


# ---- The loss and the pure steps ------------------------------------------------------------------------------

def split_variables(mode: str, params, collections: dict | None = None) -> tuple[dict, dict]:
  """(trainable, frozen): peft trains {'lora'} against the frozen params and the variant's frozen tensors
  ('lora_init': lora.VARIANTS); full trains {'params'}."""
  if mode == "full":
    return {"params": params}, {}
  return ({lora_lib.TRAINABLE: collections[lora_lib.TRAINABLE]},
          {"params": params, **{k: v for k, v in collections.items() if k != lora_lib.TRAINABLE}})


def master_copy(trainable):
  """The trainable tree with floating leaves in float32: bf16 would round away updates under 2^-8 of a weight."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable)


def loss_sums(trainable, frozen, batch, key, *, model, tcfg: TrainConfig):
  """Summed token loss of a batch and (sum of loss weights, summed NLL); divided by the caller, so that
  micro-batches and devices add up to exactly the full batch's mean."""
  variables = {**frozen, **trainable}
  tokens_BL = batch["decoder_input_tokens"]
  targets_BL = batch["decoder_target_tokens"]
  weights_BL = batch["decoder_loss_weights"].astype(jnp.float32)
  rngs = {} if key is None else {"dropout": key}
  h_BLD, _ = model.apply(variables, tokens_BL, batch.get("decoder_positions"), batch.get("decoder_segment_ids"),
                         batch.get("decoder_causal_attention"), deterministic=key is None, return_hidden=True,
                         rngs=rngs)
  L = h_BLD.shape[1]
  C = tcfg.loss_chunk or L
  if L % C:
    raise ValueError(f"TrainConfig.loss_chunk={C} does not divide the sequence length {L}")

  if C == L:
    logits = model.apply(variables, h_BLD, method="logits")
    loss_sum, nll_sum = losses.cross_entropy_sums(logits.reshape(-1, logits.shape[-1]), targets_BL.reshape(-1),
                                                  weights_BL.reshape(-1), tcfg.z_loss, tcfg.label_smoothing)
  else:  # the vocabulary projection reads only the embedder's variables: pass those, trainable and frozen apart
    head = lambda tree: {c: {"embedder": v["embedder"]} for c, v in tree.items() if "embedder" in v}
    logits_fn = lambda t, f, h: model.apply({**f, **t}, h, method="logits")
    loss_sum, nll_sum = losses.chunked_cross_entropy(logits_fn, h_BLD, head(trainable), head(frozen), targets_BL,
                                                     weights_BL, C, tcfg.z_loss, tcfg.label_smoothing,
                                                     kernels=model.cfg.kernels)
  return loss_sum, (jnp.sum(weights_BL), nll_sum)


def loss_and_grads(trainable, frozen, batch, key, *, model, tcfg: TrainConfig):
  """(mean loss, mean NLL, summed loss weight, gradients of the mean loss w.r.t. the trainable tree only),
  accumulated over `micro_batches` slices of the batch. With decoder_task_ids the means are per task, mixed
  with TrainConfig.rationale_loss_weight (the weights are normalised over the whole batch before slicing)."""
  token_count = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
  per_task = "decoder_task_ids" in batch
  if per_task:
    batch = dict(batch, decoder_loss_weights=losses.task_mean_weights(
        batch["decoder_loss_weights"], batch["decoder_task_ids"], (1.0, tcfg.rationale_loss_weight)))
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, model=model, tcfg=tcfg), has_aux=True)
  M = tcfg.micro_batches
  if M == 1:
    (loss_sum, (weight_sum, nll_sum)), grads = grad_fn(trainable, frozen, batch, key)
  else:  # micro-batch m takes rows m, m+M, ...: every data shard contributes equally to every micro-batch
    micro = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // M, M, *x.shape[1:]), 0, 1),
                                   batch)

    def body(carry, xs):
      grads_acc, sums_acc = carry
      mkey = None if key is None else jax.random.fold_in(key, xs[1])
      (ls, (ws, ns)), g = grad_fn(trainable, frozen, xs[0], mkey)
      return (jax.tree_util.tree_map(jnp.add, grads_acc, g), sums_acc + jnp.stack([ls, ws, ns])), None
    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (grads, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros(3, jnp.float32)), (micro, jnp.arange(M)))
    loss_sum, weight_sum, nll_sum = sums[0], sums[1], sums[2]
  # NaN weights stay NaN (jnp.maximum propagates it): the loop stops. Per-task weights are already means.
  denom = jnp.ones((), jnp.float32) if per_task else jnp.maximum(weight_sum, 1e-9)
  grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
  return loss_sum / denom, nll_sum / denom, token_count, grads


def train_step(state, frozen, batch, *, model, tcfg: TrainConfig, tx, lr_fn):
  """One update: g = ∇ of the loss w.r.t. the trainable tree (clipped inside `tx`), then the optimizer."""
  step, trainable = state["step"], state["trainable"]
  key = jax.random.fold_in(state["rng"], step)
  loss, nll, weight_sum, grads = loss_and_grads(trainable, frozen, batch, key, model=model, tcfg=tcfg)
  updates, opt_state = tx.update(grads, state["opt_state"], trainable)
  # The state keeps its dtypes (an optimizer may promote a moment): a changed one would recompile the step.
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, old)
  new_state = dict(step=step + 1, trainable=keep(optax.apply_updates(trainable, updates), trainable),
                   opt_state=keep(opt_state, state["opt_state"]), rng=state["rng"])
  metrics = dict(loss=loss, nll=nll, grad_norm=optax.tree.norm(grads), learning_rate=lr_fn(step),
                 target_tokens=weight_sum)
  return new_state, metrics


def eval_step(trainable, frozen, batch, *, model, tcfg: TrainConfig):
  """(summed NLL, summed loss weight) of one batch, without dropout."""
  _, (weight_sum, nll_sum) = loss_sums(trainable, frozen, batch, None, model=model, tcfg=tcfg)
  return nll_sum, weight_sum


# ---- Shardings ------------------------------------------------------------------------------------------------

def like_params(tree, param_shardings, replicated):
  """Shardings of an optimizer state: a leaf whose path ends with a parameter's path and has its shape gets that
  parameter's sharding (Adam's mu / nu); everything else (counts, factored moments) is replicated."""
  by_path = {tuple(map(str, p)): s for p, s in jax.tree_util.tree_leaves_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, tuple))}

  def pick(path, x):
    keys = tuple(map(str, path))
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[1] == tuple(x.shape):
        return hit[0]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, tree)


def _shardings(cfg: model_lib.Config, mode: str, mesh, trainable, frozen, opt_shapes):
  """NamedShardings of (state, frozen)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  params_sh = sharding.param_shardings(cfg, mesh)
  if mode == "full":
    trainable_sh, frozen_sh = {"params": params_sh}, {}
  else:
    lora_sh = sharding.lora_shardings(cfg, mesh)
    trainable_sh = {k: lora_sh[k] for k in trainable}
    frozen_sh = {"params": params_sh, **{k: lora_sh[k] for k in frozen if k != "params"}}
  with_shapes = jax.tree_util.tree_map(lambda s, x: (s, tuple(x.shape)), trainable_sh, trainable)
  state_sh = dict(step=replicated, trainable=trainable_sh, opt_state=like_params(opt_shapes, with_shapes, replicated),
                  rng=replicated)
  return state_sh, frozen_sh


# ---- Restore-or-start, the loop (loop.py), select-and-test ------------------------------------------------------

def _fresh_state(tcfg: TrainConfig, cfg: model_lib.Config, params, lora_variables, mesh):
  """The step-0 state, built under jit straight into its shards, the frozen tree, the optimizer and shardings.

  The caller's arrays are copied, never aliased: the step donates (frees) the state it is given. The trainable
  tree becomes float32 (master_copy); the frozen one keeps its dtypes.
  """
  params = nn.meta.unbox(params)
  key_lora, key_rng = jax.random.split(jax.random.PRNGKey(tcfg.seed))
  collections = None
  if tcfg.mode == "peft":
    collections = lora_variables or sharding.init_lora_sharded(cfg, params, key_lora, mesh)
  trainable, frozen = split_variables(tcfg.mode, params, collections)
  tx = optim_lib.make(tcfg.optim, tcfg.num_steps, trainable, cfg.lora)
  state_sh, frozen_sh = _shardings(cfg, tcfg.mode, mesh, trainable, frozen,
                                   jax.eval_shape(lambda t: tx.init(master_copy(t)), trainable))
  trainable = jax.device_put(trainable, state_sh["trainable"], may_alias=False)
  # Cast the copy shard by shard (a whole float32 model never sits on one device); the bf16 copy is dropped here.
  trainable = jax.jit(master_copy, out_shardings=state_sh["trainable"])(trainable)
  frozen = jax.device_put(frozen, frozen_sh)
  state = jax.device_put(dict(step=np.zeros((), np.int32), trainable=trainable, opt_state=None, rng=key_rng),
                         dict(state_sh, opt_state=None))
  state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(state["trainable"])
  return state, frozen, tx, state_sh, frozen_sh


def _restore_or_start(tcfg: TrainConfig, cfg: model_lib.Config, model_cfg: model_lib.Config, params,
                      lora_variables, data_fingerprint: str, run_dir: str, base_path: str | None, mesh, stream,
                      settings: dict | None, allow_changed_settings: bool, on_start) -> tuple[loop.Start, Any]:
  """(the run to step from, its optimizer): the newest checkpoint that restores and matches the run, else step 0."""
  log = logs.RunLog(run_dir, tcfg.num_steps, tcfg.tensorboard, stream)
  for notice in checkpoint.recover_partial(run_dir):
    log.text(notice)
  mgr = checkpoint.manager(run_dir, tcfg.keep, tcfg.best_mode)
  state, frozen, tx, state_sh, frozen_sh = _fresh_state(tcfg, cfg, params, lora_variables, mesh)
  base = checkpoint.base_reference(model_cfg, base_path)
  identity = dict(mode=tcfg.mode, batch_size=tcfg.batch_size, data_fingerprint=data_fingerprint,
                  base_config_fingerprint=base["config_fingerprint"])
  # Every setting that shapes the run, checked against the recorded ones before anything is written or trained.
  recorded = dict(train=dataclasses.asdict(tcfg), model=dataclasses.asdict(model_cfg), base=base,
                  data_fingerprint=data_fingerprint, **(settings or {}))
  steps = mgr.all_steps()
  for notice in run_files.check_settings(run_dir, recorded, resuming_from=max(steps) if steps else None,
                                         allow_changed=allow_changed_settings, writer=jax.process_index() == 0):
    log.text(notice)
  if on_start is not None:
    on_start()

  def vet(meta, where):
    checkpoint.check_resume(meta["identity"], identity, where)
    if meta["base"]["path"] != base["path"]:
      log.text(f"note: the checkpoint's base was {meta['base']['path']!r}, this run loads {base['path']!r} "
               f"(same config fingerprint {base['config_fingerprint']})")

  best = None
  latest, restored, meta, notices = checkpoint.restore_newest(mgr, run_dir, checkpoint.abstract(state, state_sh), vet)
  for notice in notices:
    log.text(notice)
  if latest is not None:
    state, best = restored, meta["best"]
    log.text(f"resumed from {mgr.directory}/{latest}: step {latest}, data position {meta['data_position']} batches")
  # What was logged after the checkpoint resumed from (and a final test) is logged again from here on.
  dropped = log.rewind(-1 if latest is None else latest)
  if dropped:
    when = f"after step {latest}" if latest is not None else "by an attempt that saved no checkpoint"
    log.text(f"{log.path}: dropped {dropped} records logged {when} (this run logs those steps again)")
  if jax.process_index() == 0:
    log.text(lora_lib.summary(state["trainable"], frozen))
  return loop.Start(state, frozen, state_sh, frozen_sh, best, latest, identity, base, mesh, log, mgr), tx


def _select_and_test(start: loop.Start, end: loop.End, final_eval) -> TrainResult:
  """The selected checkpoint (best on validation, else the last): restored, tested once, and returned."""
  chosen, chosen_state = (end.best["step"] if end.best is not None else end.step), end.state
  if chosen != end.step:
    chosen_state, _ = checkpoint.restore(start.mgr, chosen, checkpoint.abstract(end.state, start.state_sh))
  start.log.text(f"selected checkpoint: step {chosen}" + (
      f" ({end.best['metric']} {end.best['value']:.4f})" if end.best else
      " (the last; no evaluation ranked checkpoints)"))
  test_metrics = None
  if final_eval is not None:
    test_metrics = {k: float(v) for k, v in final_eval(chosen, {**start.frozen, **chosen_state["trainable"]}).items()}
    start.log.scalars(chosen, {f"test/{k}": v for k, v in test_metrics.items()})
    start.log.text(f"test (checkpoint of step {chosen}): " +
                   ", ".join(f"{k} {v:.4f}" for k, v in sorted(test_metrics.items())))
  return TrainResult(end.step, False, end.best, test_metrics, chosen_state["trainable"], start.frozen, chosen)


def step_model_config(model_cfg: model_lib.Config, tcfg: TrainConfig) -> model_lib.Config:
  """The model config the train step runs: the run's remat policy and compute dtype applied (benchmarks build their
  step through this too, so what they measure is what train.train compiles)."""
  return dataclasses.replace(model_cfg, remat_policy=tcfg.remat_policy,
                             **({"dtype": tcfg.compute_dtype} if tcfg.compute_dtype else {}))


@gin.configurable(denylist=["params", "batches", "evaluate", "eval_batches", "final_eval", "mesh", "lora_variables",
                            "settings", "allow_changed_settings", "on_start"])
def train(tcfg: TrainConfig, model_cfg: model_lib.Config, params, batches: Iterable | Callable[[int], Iterable],
          data_fingerprint: str, run_dir: str, *, base_path: str | None = None, lora_variables: dict | None = None,
          evaluate: Callable[[int, dict], dict] | None = None, eval_batches: Iterable | Callable | None = None,
          final_eval: Callable[[int, dict], dict] | None = None, mesh=None, stream=None,
          settings: dict | None = None, allow_changed_settings: bool = False,
          on_start: Callable[[], None] | None = None) -> TrainResult:
  """Trains, evaluating every `eval_every` steps, and resumes from run_dir/checkpoints when there are any.

  Args:
    params: the base model's parameters (the frozen θ_τ in peft mode; the starting point in full mode).
    batches: per-host batches in order; a callable gets the number of batches already consumed (resume).
    data_fingerprint: identity of the training data (data.fingerprint); a resume with another one is an error.
    base_path: where `params` came from; checkpoints reference it instead of copying the base.
    lora_variables: initial LoRA collections (default: lora.init with the run's seed).
    evaluate: (step, variables) -> {name: value}, logged as eval/<name>; with eval_batches' loss (eval/loss) it
      ranks checkpoints by TrainConfig.best_metric.
    final_eval: (step, variables) -> {name: value}, called once on the selected (best) checkpoint, logged as
      test/<name>.
    settings: more sections of the run's recorded settings (run_files.SETTINGS_FILE), e.g. the recipe.
    allow_changed_settings: resume although the settings differ from the recorded ones (recording the change).
    on_start: called once the settings are checked and recorded, before anything is trained.
  """
  if tcfg.mode == "full" and model_cfg.lora is not None:
    raise ValueError("TrainConfig.mode='full' trains every base parameter: set the model config's lora to None")
  if tcfg.mode == "peft" and model_cfg.lora is None:
    raise ValueError("TrainConfig.mode='peft' needs a model config with lora=LoraConfig(...)")
  cfg = step_model_config(model_cfg, tcfg)
  model = model_lib.Transformer(cfg)
  mesh = sharding.make_mesh() if mesh is None else mesh
  start, tx = _restore_or_start(tcfg, cfg, model_cfg, params, lora_variables, data_fingerprint, run_dir, base_path,
                                mesh, stream, settings, allow_changed_settings, on_start)
  step_fn = functools.partial(train_step, model=model, tcfg=tcfg, tx=tx,
                              lr_fn=optim_lib.schedule(tcfg.optim, tcfg.num_steps))
  validation = loop.Validation(evaluate, eval_batches, jax.jit(functools.partial(eval_step, model=model, tcfg=tcfg)))
  try:
    end = loop.run(tcfg, start, step_fn, batches, validation)
    if end.preempted:
      return TrainResult(end.step, True, end.best, None, end.state["trainable"], start.frozen, end.step)
    return _select_and_test(start, end, final_eval)
  finally:
    start.log.close()
    start.mgr.close()
