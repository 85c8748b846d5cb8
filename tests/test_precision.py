"""Mixed precision: a bf16 base stays bf16, adapters / master weights and optimizer state are float32, the step
compiles once, and updates bf16 would round away are kept."""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import optim
from fiat_jax.training import plan
from fiat_jax.training import train
import helpers
from test_train import VOCAB, one_device, params_of, step_batches

# (mode, variant, scan_layers): every variant, full tuning, and the scanned model's stacked trees.
RUNS = [("peft", v, False) for v in lora_lib.VARIANTS] + [("full", None, False), ("peft", "pissa", True),
                                                           ("full", None, True)]
F32, BF16 = jnp.dtype("float32"), jnp.dtype("bfloat16")


def bf16_tiny(variant, scan_layers=False):
  cfg = model_lib.tiny_config(vocab_size=VOCAB, param_dtype="bfloat16", dtype="bfloat16", scan_layers=scan_layers)
  return helpers.with_lora(cfg, rank=4, variant=variant) if variant else cfg


def avals(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@contextlib.contextmanager
def watched_step(monkeypatch):
  """train.train_step as the trainer jits it, recording each trace's (state, frozen, new state) avals, and the
  XLA compilations of train_step (jax.monitoring's backend-compile event, named by function)."""
  seen = dict(traces=[], compiles=0)
  real = train.train_step

  @functools.wraps(real)
  def step(state, frozen, batch, **kw):
    new_state, metrics = real(state, frozen, batch, **kw)
    seen["traces"].append((avals(state), avals(frozen), avals(new_state)))
    return new_state, metrics

  def on_event(event, _, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") in ("jit(train_step)",
                                                                                        "train_step"):
      seen["compiles"] += 1
  monkeypatch.setattr(train, "train_step", step)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def run(tmp_path, mode, cfg, params, steps=3, lr=1e-3, lora_variables=None, eps=1e-8, **kw):
  tcfg = train.TrainConfig(mode=mode, num_steps=steps, batch_size=8, log_every=1, save_every=steps,
                           tensorboard=False, optim=optim.OptimConfig(learning_rate=lr, clip_norm=None, eps=eps))
  return train.train(tcfg, cfg, params, step_batches(), "random", str(tmp_path), mesh=one_device(),
                     lora_variables=lora_variables, **kw)


def dtypes(tree):
  return {x.dtype for x in jax.tree_util.tree_leaves(tree)}


@pytest.mark.parametrize("mode,variant,scan_layers", RUNS)
def test_bf16_base_float32_trainable_and_optimizer_one_compilation(tmp_path, monkeypatch, mode, variant, scan_layers):
  cfg = bf16_tiny(variant, scan_layers)
  params = params_of(cfg)
  assert dtypes(params) == {BF16}
  with watched_step(monkeypatch) as seen:
    res = run(tmp_path, mode, cfg, params)
  assert seen["compiles"] == 1 and len(seen["traces"]) == 1, seen
  state, frozen, new_state = seen["traces"][0]
  assert new_state == state  # dtypes and shapes the same after the step: the donated buffers are reused
  assert dtypes(state["trainable"]) == {F32}
  floats = {d for d in dtypes(state["opt_state"]) if jnp.issubdtype(d, jnp.floating)}
  assert floats == {F32}  # Adam's mu and nu (the counts are int32)
  assert dtypes(frozen.get("params", {})) <= {BF16}  # the base stays in the checkpoint's dtype
  assert dtypes(frozen.get(lora_lib.FROZEN, {})) <= {F32}  # PiSSA's initial factors, VeRA's projections
  assert dtypes(res.trainable) == {F32}


@pytest.mark.parametrize("mode", ["peft", "full"])
def test_an_update_bf16_would_round_away_is_kept(tmp_path, mode):
  # Adam's first update is lr * g / (|g| + eps), lr * sign(g) with eps 1e-20: 1e-4 on weights of 1.0, where bf16's
  # spacing is 2^-7 = 0.0078. The weights: LoRA's B matrices set to ones (peft), the RMSNorm scales (full).
  cfg = bf16_tiny("lora" if mode == "peft" else None)
  params = params_of(cfg)
  lora_variables = None
  if mode == "peft":
    lora_variables = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(1))
    lora_variables["lora"] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if p[-1].key == "b" else x, lora_variables["lora"])
  res = run(tmp_path, mode, cfg, params, steps=1, lr=1e-4, lora_variables=lora_variables, eps=1e-20)
  tree = res.trainable["lora"] if mode == "peft" else res.trainable["params"]
  ones = [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key in ("b", "scale")]
  moved = np.abs(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in ones]) - 1.0)
  assert moved.size == (2048 if mode == "peft" else 160)
  np.testing.assert_allclose(moved, 1e-4, rtol=1e-3)  # every one moved by lr (float32's spacing at 1: 6e-8)
  assert jnp.bfloat16(1.0 - 1e-4) == 1.0  # what a bf16 weight would have kept: no move at all


@pytest.mark.parametrize("variant", list(lora_lib.VARIANTS))
def test_merge_and_unmerge_give_the_base_dtype(variant):
  cfg = helpers.with_lora(bf16_tiny(None), rank=4, variant=variant,
                          targets=lora_lib.DENSE_TARGETS + lora_lib.EMBED_TARGETS)
  params = params_of(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(1), cfg.tie_embeddings)
  assert dtypes(cols) == {F32}
  merged, merged_cfg = lora_lib.merge(cfg, params, cols)
  assert dtypes(merged) == {BF16} and merged_cfg.param_dtype == "bfloat16"
  base = dict(params, embedder=dict(params["embedder"], unembed=params["embedder"]["embedding"].T))  # untied
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(merged)):
    np.testing.assert_array_equal(a, b)  # at init every variant adds exactly nothing (float32 math, one rounding)
  trained = helpers.perturbed_lora(cfg, params, seed=2)
  merged, _ = lora_lib.merge(cfg, params, trained)
  assert dtypes(merged) == {BF16}
  changed = np.abs(np.asarray(merged["layer_0"]["attn"]["q"]["kernel"], np.float32) -
                   np.asarray(params["layer_0"]["attn"]["q"]["kernel"], np.float32))
  assert changed.max() > 1e-3
  if variant != "dora":  # DoRA's merged weight does not determine the base (lora.unmerge raises)
    back = lora_lib.unmerge(cfg, merged, trained)
    assert dtypes(back) == {BF16}
    q = lambda tree: np.asarray(tree["layer_0"]["attn"]["q"]["kernel"], np.float32)
    np.testing.assert_allclose(q(back), q(params), atol=2 * 2.0 ** -8)  # bf16 rounding of W' and of W' - ΔW


def test_a_resumed_run_restores_the_float32_state_and_compiles_once(tmp_path, monkeypatch, capsys):
  cfg = bf16_tiny("pissa")
  params = params_of(cfg)
  first = run(tmp_path, "peft", cfg, params, steps=2)
  with watched_step(monkeypatch) as seen:
    res = run(tmp_path, "peft", cfg, params, steps=4, allow_changed_settings=True)  # num_steps 2 -> 4
  assert "resumed from" in capsys.readouterr().out and res.step == 4
  assert seen["compiles"] == 1 and len(seen["traces"]) == 1
  state, frozen, new_state = seen["traces"][0]
  assert new_state == state and dtypes(state["trainable"]) == {F32}
  assert {d for d in dtypes(state["opt_state"]) if jnp.issubdtype(d, jnp.floating)} == {F32}
  assert dtypes(frozen["params"]) == {BF16} and dtypes(frozen[lora_lib.FROZEN]) == {F32}
  assert dtypes(first.trainable) == dtypes(res.trainable) == {F32}


@pytest.mark.parametrize("mode,variant", [("peft", "lora"), ("peft", "pissa"), ("full", None)])
def test_plan_counts_a_bf16_base_and_float32_adapters_master_weights_and_moments(mode, variant):
  # test_plan's tiny model (vocab 256: 26,784 params, 4,096 LoRA rank-4 params) on data=2, fsdp=2, model=2: a
  # float32 copy of the params takes 26,944 bytes per device, of the LoRA tensors 8,192 (test_plan's numbers).
  cfg = model_lib.tiny_config(vocab_size=256, param_dtype="bfloat16", dtype="bfloat16")
  r = plan.plan(model=cfg, lora={"rank": 4, "variant": variant} if variant else None,
                train=train.TrainConfig(mode=mode, batch_size=8), seq_len=16, decode_batch=8, decode_len=64,
                compile=False, num_devices=8, data=2, fsdp=2, model_axis=2)
  s = r["per_device"]
  assert r["param_dtype"] == "bfloat16" and r["trainable_dtype"] == "float32"
  if mode == "full":  # the step holds float32 master weights, not the bf16 checkpoint
    assert (s["params"], s["lora"], s["optimizer"]) == (26944, 0, 2 * 26944 + 8)
  else:  # PiSSA's frozen initial factors are a second float32 copy of the LoRA tensors
    assert (s["params"], s["lora"], s["optimizer"]) == (26944 // 2, 8192 * (2 if variant == "pissa" else 1),
                                                        2 * 8192 + 8)
  assert "trainable (float32)" in plan.format_plan(r)
