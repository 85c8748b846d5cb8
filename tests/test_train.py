"""The trainer: overfitting, 8 devices == 1 device, gradient accumulation, peft vs full, the loss, optimizers,
metrics fetched one step late."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import decoding
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import loop
from fiat_jax.training import losses
from fiat_jax.training import optim
from fiat_jax.training import train
import helpers

VOCAB = 64
EOS = 1


def make_batch(examples, length):
  """seqio.DecoderFeatureConverter features (unpacked prefix LM, BOS 0) of (inputs, targets) token lists."""
  n = len(examples)
  shape = (n, length)
  tgt, inp, w, causal = (np.zeros(shape, np.int32) for _ in range(4))
  for i, (x, y) in enumerate(examples):
    seq = list(x) + list(y)
    tgt[i, :len(seq)] = seq
    inp[i, 1:len(seq)] = seq[:-1]
    w[i, len(x):len(seq)] = 1
    causal[i, :len(x) + 1] = 1
  return dict(decoder_input_tokens=inp, decoder_target_tokens=tgt, decoder_loss_weights=w,
              decoder_causal_attention=causal)


def random_batch(seed, rows=8, length=16, vocab=VOCAB):
  """A batch of random examples (varying input / target lengths), the same for the same seed."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(rows):
    n_in = int(rng.integers(2, length // 2))
    n_out = int(rng.integers(1, length - n_in))
    examples.append((rng.integers(2, vocab, n_in).tolist(), rng.integers(2, vocab, n_out - 1).tolist() + [EOS]))
  return make_batch(examples, length)


def step_batches(rows=8, length=16, vocab=VOCAB):
  """batches(start) -> the stream random_batch(start), random_batch(start + 1), ...: resumable by position."""
  def batches(start):
    step = start
    while True:
      yield random_batch(step, rows, length, vocab)
      step += 1
  return batches


def params_of(cfg, seed=0):
  """helpers.tiny_params (gain 1) under jit: one compilation instead of one per operation."""
  return jax.jit(functools.partial(helpers.tiny_params, cfg, seed, 1.0))()


def lora_of(cfg, params, seed=1):
  """helpers.perturbed_lora under jit."""
  return jax.jit(functools.partial(helpers.perturbed_lora, cfg, seed=seed))(params)


def one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def tiny(lora=True, **kw):
  cfg = model_lib.tiny_config(vocab_size=VOCAB, **kw)
  return helpers.with_lora(cfg, rank=4) if lora else cfg


def test_tiny_model_overfits_a_handful_of_examples(tmp_path):
  cfg = helpers.with_lora(model_lib.tiny_config(vocab_size=VOCAB), rank=8,
                          targets=("q", "k", "v", "o", "gate", "up", "down", "unembed"))
  params = params_of(cfg)
  rng = np.random.default_rng(0)
  examples = [(rng.integers(2, VOCAB, 4).tolist(), rng.integers(2, VOCAB, 3).tolist() + [EOS]) for _ in range(4)]
  batch = make_batch(examples, 8)
  tcfg = train.TrainConfig(num_steps=100, batch_size=4, log_every=100, save_every=100, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=1e-2, clip_norm=None))
  res = train.train(tcfg, cfg, params, lambda start: iter(lambda: batch, None), "handful", str(tmp_path),
                    mesh=one_device())
  final = read_metrics(tmp_path)[-1]
  assert final["step"] == 100 and final["loss"] < 0.01, final
  out = decoding.generate(model_lib.Transformer(cfg), {**res.frozen, **res.trainable}, [[0] + x for x, _ in examples],
                          max_new_tokens=6, eos_id=EOS)
  assert out.tokens == [y[:-1] for _, y in examples]


def test_eight_devices_give_the_single_device_loss_curve(tmp_path):
  cfg = model_lib.tiny_config(vocab_size=VOCAB)
  cfg = helpers.with_lora(cfg, rank=4)
  params = params_of(cfg)
  tcfg = train.TrainConfig(num_steps=10, batch_size=8, log_every=1, save_every=10, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=1e-2))
  curves = {}
  for name, mesh in [("one", one_device()), ("eight", sharding.make_mesh(data=2, model=4))]:
    res = train.train(tcfg, cfg, params, step_batches(), "random", str(tmp_path / name), mesh=mesh)
    curves[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    if name == "eight":
      assert len(res.trainable["lora"]["layer_0"]["attn"]["q"]["b"].sharding.device_set) == 8
  assert len(curves["one"]) == 10 and curves["one"][-1] < curves["one"][0] - 0.1
  np.testing.assert_allclose(curves["eight"], curves["one"], atol=1e-5)


def _grads(cfg, tcfg, trainable, frozen, batch):
  fn = jax.jit(lambda t, f, b: train.loss_and_grads(t, f, b, None, model=model_lib.Transformer(cfg), tcfg=tcfg))
  return fn(trainable, frozen, batch)


def test_gradient_accumulation_over_four_micro_batches_equals_one_big_batch():
  cfg = tiny()
  params = params_of(cfg)
  trainable, frozen = train.split_variables("peft", params, lora_of(cfg, params))
  batch = random_batch(3, rows=8)  # rows have different numbers of target tokens: means must weight by tokens
  big = _grads(cfg, train.TrainConfig(batch_size=8), trainable, frozen, batch)
  acc = _grads(cfg, train.TrainConfig(batch_size=8, micro_batches=4), trainable, frozen, batch)
  np.testing.assert_allclose(acc[0], big[0], atol=1e-6)
  assert float(acc[2]) == float(big[2]) == float(batch["decoder_loss_weights"].sum())
  for a, b in zip(jax.tree_util.tree_leaves(acc[3]), jax.tree_util.tree_leaves(big[3])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(big[3])) > 1e-3


@pytest.mark.parametrize("mode,tied,targets,z_loss,smoothing", [
    ("peft", False, lora_lib.DENSE_TARGETS, 1e-3, 0.1),
    ("peft", True, lora_lib.DENSE_TARGETS + ("unembed",), 0.0, 0.0),  # the projection itself has LoRA
    ("peft", False, lora_lib.DENSE_TARGETS + ("unembed",), 1e-3, 0.0),
    ("full", False, None, 0.0, 0.1),  # the unembedding is trainable
    ("full", True, None, 0.0, 0.0),
])
def test_chunked_cross_entropy_equals_the_full_logits_loss(mode, tied, targets, z_loss, smoothing):
  cfg = model_lib.tiny_config(vocab_size=VOCAB, tie_embeddings=tied)
  if mode == "peft":
    cfg = helpers.with_lora(cfg, rank=4, targets=targets)
  params = params_of(cfg)
  trainable, frozen = train.split_variables(mode, params, lora_of(cfg, params) if mode == "peft" else None)
  batch = random_batch(4)
  ref = _grads(cfg, train.TrainConfig(mode=mode, z_loss=z_loss, label_smoothing=smoothing), trainable, frozen, batch)
  chunked = _grads(cfg, train.TrainConfig(mode=mode, z_loss=z_loss, label_smoothing=smoothing, loss_chunk=4),
                   trainable, frozen, batch)
  np.testing.assert_allclose(chunked[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(chunked[1], ref[1], rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(chunked[3]), jax.tree_util.tree_leaves(ref[3])):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="loss_chunk=5 does not divide the sequence length 16"):
    _grads(cfg, train.TrainConfig(loss_chunk=5), trainable, frozen, batch)


@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.2)])
def test_chunked_cross_entropy_vjp_of_both_sums_equals_autodiff(z_loss, smoothing):
  """Cotangents on the loss and on the NLL (different when z-loss or smoothing is on) reach h and the head."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  w_head = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  frozen_bias = jnp.asarray(rng.normal(size=(11,)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.float32)
  logits_fn = lambda p, f, x: x @ p["w"] + f["b"]

  def plain(x, p):
    return losses.cross_entropy_sums(logits_fn(p, {"b": frozen_bias}, x).reshape(-1, 11), targets.reshape(-1),
                                     weights.reshape(-1), z_loss, smoothing)

  def chunked(x, p):
    return losses.chunked_cross_entropy(logits_fn, x, p, {"b": frozen_bias}, targets, weights, 2, z_loss, smoothing)

  out_ref, vjp_ref = jax.vjp(plain, h, {"w": w_head})
  out, vjp = jax.vjp(chunked, h, {"w": w_head})
  np.testing.assert_allclose(out, out_ref, rtol=1e-6)
  for cot in [(1.0, 0.0), (0.0, 1.0), (0.7, -1.3)]:
    cot = tuple(jnp.float32(c) for c in cot)
    for a, b in zip(jax.tree_util.tree_leaves(vjp(cot)), jax.tree_util.tree_leaves(vjp_ref(cot))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cross_entropy_with_z_loss_and_label_smoothing_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
  targets, weights = jnp.array([0, 2]), jnp.array([1.0, 0.5])
  loss, nll = losses.cross_entropy_sums(logits, targets, weights, z_loss=0.01, label_smoothing=0.2)
  log_z = np.log(np.exp(logits).sum(-1))
  nll_ref = log_z - np.array([2.0, 0.5])
  smooth = 0.8 * nll_ref + 0.2 * (log_z - np.asarray(logits).mean(-1))
  np.testing.assert_allclose(nll, (nll_ref * [1.0, 0.5]).sum(), rtol=1e-6)
  np.testing.assert_allclose(loss, ((smooth + 0.01 * log_z ** 2) * [1.0, 0.5]).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(nll), 0.1698 + 0.5 * 1.0986, atol=1e-3)


def test_distilled_cot_loss_is_label_mean_plus_lambda_rationale_mean_by_hand():
  """Row 0: a 2-token label, NLL ln 2 per token; row 1: a 6-token rationale, NLL ln(4/3) per token."""
  logits = np.zeros((2, 8, 2), np.float32)
  logits[1, :, 0] = np.log(3.0)  # p(target 0) = 3/4
  targets = jnp.zeros((2, 8), jnp.int32)
  weights = jnp.array([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.float32)
  task_ids = jnp.array([[0] * 8, [1] * 8], jnp.int32)
  per_task = losses.task_mean_weights(weights, task_ids, (1.0, 0.5))
  np.testing.assert_allclose(per_task[0, :2], [0.5, 0.5])
  np.testing.assert_allclose(per_task[1, :6], [0.5 / 6] * 6, rtol=1e-6)
  loss, nll = losses.cross_entropy_sums(jnp.asarray(logits).reshape(-1, 2), targets.reshape(-1),
                                        per_task.reshape(-1), 0.0, 0.0)
  np.testing.assert_allclose(float(loss), np.log(2) + 0.5 * np.log(4 / 3), rtol=1e-6)  # 0.8370
  np.testing.assert_allclose(float(nll), float(loss))
  token_mean = (2 * np.log(2) + 6 * np.log(4 / 3)) / 8  # 0.3891: what one token-weighted mean would train on
  assert abs(float(loss) - token_mean) > 0.4
  only_labels = losses.task_mean_weights(weights.at[1].set(0.0), task_ids, (1.0, 0.5))
  np.testing.assert_allclose(only_labels, weights.at[1].set(0.0) / 2)  # an absent task adds nothing


@pytest.mark.parametrize("chunk,micro", [(0, 1), (4, 1), (0, 2)])
def test_per_task_loss_and_grads_equal_the_two_task_means_mixed(chunk, micro):
  cfg = tiny()
  params = params_of(cfg)
  trainable, frozen = train.split_variables("peft", params, lora_of(cfg, params))
  batch = random_batch(5, rows=8)
  rationale_rows = np.array([0, 1, 0, 1, 1, 1, 0, 1], bool)  # 3 label rows, 5 rationale rows
  task_ids = np.broadcast_to(rationale_rows[:, None].astype(np.int32), batch["decoder_loss_weights"].shape)
  only = lambda rows: dict(batch, decoder_loss_weights=batch["decoder_loss_weights"] * rows[:, None])
  label = _grads(cfg, train.TrainConfig(batch_size=8), trainable, frozen, only(~rationale_rows))
  rationale = _grads(cfg, train.TrainConfig(batch_size=8), trainable, frozen, only(rationale_rows))
  tcfg = train.TrainConfig(batch_size=8, rationale_loss_weight=0.3, loss_chunk=chunk, micro_batches=micro)
  got = _grads(cfg, tcfg, trainable, frozen, dict(batch, decoder_task_ids=task_ids.copy()))
  np.testing.assert_allclose(got[0], label[0] + 0.3 * rationale[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], label[1] + 0.3 * rationale[1], rtol=1e-5)
  assert float(got[2]) == float(batch["decoder_loss_weights"].sum())  # target_tokens stays a token count
  for a, b, c in zip(*(jax.tree_util.tree_leaves(x[3]) for x in (got, label, rationale))):
    np.testing.assert_allclose(a, b + 0.3 * c, atol=1e-6)
  token_mean = _grads(cfg, train.TrainConfig(batch_size=8), trainable, frozen, batch)
  assert abs(float(got[0]) - float(token_mean[0])) > 1e-2


@pytest.mark.parametrize("mode", ["peft", "full"])
def test_peft_keeps_the_base_bit_identical_and_full_changes_it(tmp_path, mode):
  cfg = tiny(lora=mode == "peft")
  params = params_of(cfg)
  before = jax.tree_util.tree_map(np.array, params)
  tcfg = train.TrainConfig(mode=mode, num_steps=3, batch_size=8, log_every=1, save_every=3, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=1e-2, weight_decay=0.1))
  res = train.train(tcfg, cfg, params, step_batches(), "random", str(tmp_path), mesh=one_device())
  base_after = res.frozen["params"] if mode == "peft" else res.trainable["params"]
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                      jax.tree_util.tree_leaves(base_after))]
  if mode == "peft":
    assert not any(changed)
    b = res.trainable["lora"]["layer_1"]["mlp"]["down"]["b"]
    assert float(jnp.max(jnp.abs(b))) > 1e-3  # B starts at zero: LoRA did train
  else:
    assert all(changed) and "lora" not in res.trainable
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)  # the caller's arrays survive the step's buffer donation


def test_mode_and_lora_must_agree(tmp_path):
  with pytest.raises(ValueError, match="mode='full' trains every base parameter"):
    train.train(train.TrainConfig(mode="full"), tiny(), None, [], "x", str(tmp_path))
  with pytest.raises(ValueError, match="mode='peft' needs a model config with lora"):
    train.train(train.TrainConfig(mode="peft"), tiny(lora=False), None, [], "x", str(tmp_path))
  with pytest.raises(ValueError, match="batch_size 8 is not divisible by micro_batches 3"):
    train.TrainConfig(batch_size=8, micro_batches=3)


def test_schedules_warm_up_then_decay():
  cos = optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine",
                                         end_lr_fraction=0.1), num_steps=14)
  np.testing.assert_allclose([float(cos(s)) for s in (0, 3, 4, 9, 14, 20)], [0.25, 1.0, 1.0, 0.55, 0.1, 0.1],
                             atol=1e-6)
  lin = optim.schedule(optim.OptimConfig(learning_rate=2.0, warmup_steps=2, schedule="linear"), num_steps=6)
  np.testing.assert_allclose([float(lin(s)) for s in (0, 1, 2, 4, 6)], [1.0, 2.0, 2.0, 1.0, 0.0], atol=1e-6)
  const = optim.schedule(optim.OptimConfig(learning_rate=3e-4), num_steps=10)
  assert float(const(0)) == float(const(9)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="schedule: 'step' is not one of"):
    optim.OptimConfig(schedule="step")


def test_loraplus_scales_only_the_b_updates():
  cfg = tiny()
  params = params_of(cfg)
  trainable, _ = train.split_variables("peft", params, lora_of(cfg, params))
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), trainable)
  updates = {}
  for ratio in (None, 16.0):
    tx = optim.make(optim.OptimConfig(learning_rate=1e-3, loraplus_ratio=ratio, clip_norm=None), 10, trainable,
                    cfg.lora)
    updates[ratio], _ = tx.update(grads, tx.init(trainable), trainable)
  q_plain, q_plus = updates[None]["lora"]["layer_0"]["attn"]["q"], updates[16.0]["lora"]["layer_0"]["attn"]["q"]
  np.testing.assert_allclose(q_plain["b"], -1e-3, rtol=1e-5)  # Adam's first step: lr * sign(g)
  np.testing.assert_allclose(q_plus["b"], -16e-3, rtol=1e-5)
  np.testing.assert_allclose(q_plus["a"], q_plain["a"], rtol=1e-6)
  with pytest.raises(ValueError, match="no LoRA B matrices"):
    optim.make(optim.OptimConfig(loraplus_ratio=4.0), 10, {"params": params})
  vera = helpers.with_lora(cfg, rank=4, variant="vera")  # VeRA's d and b are no B matrices: LoRA+ refuses it
  with pytest.raises(ValueError, match="no LoRA B matrices.*variant: 'vera'"):
    optim.make(optim.OptimConfig(loraplus_ratio=4.0), 10,
               train.split_variables("peft", params, lora_lib.init(vera.lora, params, jax.random.PRNGKey(0)))[0],
               vera.lora)


def test_adafactor_and_bf16_compute_train_with_float32_state(tmp_path):
  cfg = tiny()
  params = params_of(cfg)
  tcfg = train.TrainConfig(num_steps=6, batch_size=8, log_every=1, save_every=6, tensorboard=False,
                           compute_dtype="bfloat16", optim=optim.OptimConfig(optimizer="adafactor",
                                                                             learning_rate=3e-2))
  batch = random_batch(0)
  res = train.train(tcfg, cfg, params, lambda s: iter(lambda: batch, None), "one", str(tmp_path), mesh=one_device())
  losses = [m["loss"] for m in read_metrics(tmp_path)]
  assert losses[-1] < losses[0] - 0.2, losses
  assert {x.dtype for x in jax.tree_util.tree_leaves(res.trainable)} == {jnp.dtype("float32")}


def test_logs_tensorboard_and_jsonl_and_progress(tmp_path, capsys):
  cfg = tiny()
  params = params_of(cfg)
  tcfg = train.TrainConfig(num_steps=4, batch_size=8, log_every=2, save_every=4, tensorboard=True)
  train.train(tcfg, cfg, params, step_batches(), "random", str(tmp_path), mesh=one_device())
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 4]
  assert {"loss", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s"} <= set(records[0])
  assert records[0]["learning_rate"] == pytest.approx(1e-4)
  events = os.listdir(tmp_path / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100
  out = capsys.readouterr().out
  assert "trainable params: 4,096 / total" in out
  assert "step 4/4 (100.0%) loss" in out and "tok/s" in out and "ETA 0:00:00" in out
  saved = json.load(open(tmp_path / "train_config.json", encoding="utf-8"))
  assert saved["train"]["batch_size"] == 8 and saved["model"]["lora"]["rank"] == 4


def test_step_metrics_are_read_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
  dispatched, read_at = [], []  # read_at[t - 1]: steps dispatched when step t's metrics were read
  jit_step, to_host = loop._jit_step, loop._to_host

  def counting_jit(*args):
    jitted = jit_step(*args)

    def dispatch(*step_args):
      out = jitted(*step_args)
      dispatched.append(len(dispatched) + 1)
      return out
    return dispatch

  def spying_to_host(metrics):
    read_at.append(len(dispatched))
    return to_host(metrics)

  monkeypatch.setattr(loop, "_jit_step", counting_jit)
  monkeypatch.setattr(loop, "_to_host", spying_to_host)
  cfg = tiny()
  tcfg = train.TrainConfig(num_steps=10, batch_size=8, log_every=1, save_every=4, tensorboard=False)
  train.train(tcfg, cfg, params_of(cfg), step_batches(), "random", str(tmp_path), mesh=one_device())
  # One read per step, after the next step is launched; a step that is saved (4, 8, 10: the last) is read at once,
  # since its loss is checked before its state is written. A loop that waits every step reads [1, 2, ..., 10].
  assert read_at == [2, 3, 4, 4, 6, 7, 8, 8, 10, 10]
  assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))


def test_evaluation_selects_the_best_checkpoint_and_tests_it_once(tmp_path):
  cfg = tiny()
  params = params_of(cfg)
  f1_by_step = {0: 0.1, 2: 0.3, 4: 0.7, 6: 0.5, 8: 0.7}  # ties keep the earlier checkpoint
  seen = {}

  def evaluate(step, variables):
    seen[step] = np.array(variables["lora"]["layer_0"]["attn"]["q"]["b"])
    return {"f1": f1_by_step[step]}

  tested = []

  def final_eval(step, variables):
    tested.append(step)
    np.testing.assert_array_equal(variables["lora"]["layer_0"]["attn"]["q"]["b"], seen[step])
    return {"f1": 0.42}

  tcfg = train.TrainConfig(num_steps=8, batch_size=8, eval_every=2, eval_at_start=True, save_every=100, keep=1,
                           best_metric="eval/f1", best_mode="max", tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=1e-2))
  res = train.train(tcfg, cfg, params, step_batches(), "random", str(tmp_path), evaluate=evaluate,
                    eval_batches=[random_batch(100), random_batch(101)], final_eval=final_eval, mesh=one_device())
  assert res.best == {"metric": "eval/f1", "step": 4, "value": 0.7}
  assert tested == [4] and res.test_metrics == {"f1": 0.42}
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]  # keep=1 newest, plus the best
  records = read_metrics(tmp_path)
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
  assert records[-1] == {"step": 4, "time": records[-1]["time"], "test/f1": 0.42}
  with pytest.raises(ValueError, match="best_metric 'eval/bleu' is not among the evaluation's metrics"):
    train.train(train.TrainConfig(num_steps=2, batch_size=8, eval_every=1, best_metric="eval/bleu",
                                  tensorboard=False), cfg, params, step_batches(), "random", str(tmp_path / "b"),
                evaluate=lambda step, variables: {"f1": 0.0}, mesh=one_device())
