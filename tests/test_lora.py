"""LoRA: the base at init, exact merges for every variant, unmerge, tree shapes and counts, VeRA, a variant added
from a test by its registry entry alone, and LoraConfig from gin."""
import dataclasses
import functools
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import ops
from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import optim
from fiat_jax.training import train
import helpers

TOKENS = np.array([[3, 17, 250, 9, 41, 5, 77, 120], [8, 8, 1, 2, 3, 200, 4, 6]])


def _logits(cfg, variables):
  return model_lib.Transformer(cfg).apply(variables, TOKENS)[0]


def test_lora_at_init_equals_base_exactly():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, targets=lora_lib.DENSE_TARGETS + ("embed", "unembed"))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(3))
  base = _logits(dataclasses.replace(cfg, lora=None), {"params": params})
  np.testing.assert_array_equal(_logits(cfg, {"params": params, **cols}), base)


@pytest.mark.parametrize("variant,rslora", [("lora", False), ("lora", True), ("dora", False), ("pissa", False),
                                            ("vera", False)])
@pytest.mark.parametrize("tied", [True, False])
def test_merge_is_exact(variant, rslora, tied):
  targets = lora_lib.DENSE_TARGETS + ("embed", "unembed")
  cfg = helpers.with_lora(model_lib.tiny_config(tie_embeddings=tied, qkv_bias=True), rank=4, alpha=8.0,
                          variant=variant, rslora=rslora, targets=targets)
  params = helpers.tiny_params(cfg, gain=1.0)
  cols = helpers.perturbed_lora(cfg, params, scale=0.02)
  tuned = _logits(cfg, {"params": params, **cols})
  merged, merged_cfg = lora_lib.merge(cfg, params, cols)
  assert merged_cfg.lora is None and not merged_cfg.tie_embeddings  # embed LoRA unties a tied model
  base = _logits(dataclasses.replace(cfg, lora=None), {"params": params})
  assert float(jnp.abs(tuned - base).max()) > 1e-2  # the adapter matters...
  np.testing.assert_allclose(_logits(merged_cfg, {"params": merged}), tuned, atol=1e-5)  # ...and merges exactly
  if variant != "dora":
    restored = lora_lib.unmerge(cfg, merged, cols)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
      np.testing.assert_allclose(a, b, atol=1e-6)
  else:
    with pytest.raises(ValueError, match="DoRA"):
      lora_lib.unmerge(cfg, merged, cols)


def test_pissa_starts_from_principal_directions_and_base_output():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=2, variant="pissa", targets=("q",))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(0))
  w = params["layer_0"]["attn"]["q"]["kernel"]
  a, b = cols["lora"]["layer_0"]["attn"]["q"]["a"], cols["lora"]["layer_0"]["attn"]["q"]["b"]
  u, s, vt = np.linalg.svd(np.asarray(w))
  np.testing.assert_allclose(cfg.lora.scale * a @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
  base = _logits(dataclasses.replace(cfg, lora=None), {"params": params})
  np.testing.assert_allclose(_logits(cfg, {"params": params, **cols}), base, atol=1e-6)


def test_dora_magnitude_starts_at_column_norms():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=2, variant="dora", targets=("down",))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(0))
  w = np.asarray(params["layer_1"]["mlp"]["down"]["kernel"])
  np.testing.assert_allclose(cols["lora"]["layer_1"]["mlp"]["down"]["m"], np.linalg.norm(w, axis=0), rtol=1e-6)


def test_exact_tree_shapes_and_counts():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, targets=("q", "v", "down", "unembed"))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(0))
  shapes = jax.tree_util.tree_map(lambda x: x.shape, cols)
  layer = {"attn": {"q": {"a": (32, 4), "b": (4, 32)}, "v": {"a": (32, 4), "b": (4, 16)}},
           "mlp": {"down": {"a": (64, 4), "b": (4, 32)}}}
  assert shapes == {"lora": {"layer_0": layer, "layer_1": layer,
                             "embedder": {"unembed_a": (32, 4), "unembed_b": (4, 259)}}}
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map_with_path(lambda p, x: x if p[-1].key.endswith("b") else jnp.zeros(()), cols)))
  n = 2 * (32 * 4 + 4 * 32 + 32 * 4 + 4 * 16 + 64 * 4 + 4 * 32) + 32 * 4 + 4 * 259
  assert lora_lib.count(cols) == n
  assert lora_lib.summary(cols, params) == (
      f"trainable params: {n:,} / total {n + lora_lib.count(params):,} "
      f"({100 * n / (n + lora_lib.count(params)):.4f}%)")


def test_missing_lora_variables_is_a_clear_error():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=2)
  with pytest.raises(ValueError, match="layer_0/attn/q.*lora.init"):
    _logits(cfg, {"params": helpers.tiny_params(cfg)})


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="targets.*qq"):
    lora_lib.LoraConfig(targets=("qq",))
  with pytest.raises(ValueError, match="variant"):
    lora_lib.LoraConfig(variant="qlora")


def test_dropout_is_active_only_when_not_deterministic():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, dropout=0.5)
  params = helpers.tiny_params(cfg)
  cols = helpers.perturbed_lora(cfg, params)
  m = model_lib.Transformer(cfg)
  det = m.apply({"params": params, **cols}, TOKENS)[0]
  np.testing.assert_array_equal(det, m.apply({"params": params, **cols}, TOKENS)[0])
  drop = m.apply({"params": params, **cols}, TOKENS, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})[0]
  assert float(jnp.abs(drop - det).max()) > 1e-4


@pytest.mark.parametrize("variant,rslora,dropout", [("lora", False, 0.0), ("lora", False, 0.1), ("lora", True, 0.1),
                                                    ("dora", False, 0.1), ("pissa", False, 0.0), ("pissa", False, 0.1),
                                                    ("vera", False, 0.1)])
def test_model_gradients_equal_autodiff_of_the_plain_product(variant, rslora, dropout, monkeypatch):
  """All variants, with and without dropout on x: the LoRA (and base) gradients do not depend on the hand-written
  VJPs of lora_dense and low_rank. In float64, so that only a wrong gradient, not float32's summation order (which
  the one-matmul lora_dense changes, ~1e-5 relative), can exceed the tolerance."""
  with jax.enable_x64(True):
    _model_gradients_equal_autodiff(variant, rslora, dropout, monkeypatch)


def _model_gradients_equal_autodiff(variant, rslora, dropout, monkeypatch):
  cfg = helpers.with_lora(model_lib.tiny_config(tie_embeddings=False, dtype="float64", param_dtype="float64"),
                          rank=4, variant=variant, rslora=rslora, dropout=dropout,
                          targets=lora_lib.DENSE_TARGETS + ("unembed",))
  f64 = lambda tree: jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), tree)
  params = f64(helpers.tiny_params(cfg))
  cols = f64(helpers.perturbed_lora(cfg, params))
  m = model_lib.Transformer(cfg)

  def grads(trainable):
    def loss(trainable, frozen):
      out = m.apply({**frozen, **trainable}, TOKENS, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})[0]
      return jnp.sum(jnp.sin(out))
    frozen = {"params": params, **{k: v for k, v in cols.items() if k not in trainable}}
    return jax.grad(loss)({k: v for k, v in {"params": params, **cols}.items() if k in trainable}, frozen)

  got, got_all = grads({"lora"}), grads({"lora", "params"})
  monkeypatch.setattr(lora_lib, "low_rank", ops.low_rank_reference)
  monkeypatch.setattr(lora_lib, "lora_dense", ops.lora_dense_reference)
  want, want_all = grads({"lora"}), grads({"lora", "params"})
  assert set(got) == {"lora"}  # a frozen base gets no gradient
  for g, w in zip(jax.tree_util.tree_leaves((got, got_all)), jax.tree_util.tree_leaves((want, want_all))):
    assert g.dtype == jnp.float64
    assert float(jnp.abs(g - w).max()) <= 1e-12 * float(jnp.abs(w).max())


def _train_step(cfg, params, cols, **optim_kw):
  """One jitted train.train_step from (params, cols): (trainable before, trainable after, frozen)."""
  trainable, frozen = train.split_variables("peft", params, cols)
  tcfg = train.TrainConfig(batch_size=2, optim=optim.OptimConfig(learning_rate=1e-2, clip_norm=None, **optim_kw))
  tx = optim.make(tcfg.optim, 10, trainable, cfg.lora)
  batch = dict(decoder_input_tokens=TOKENS, decoder_target_tokens=np.roll(TOKENS, -1, 1),
               decoder_loss_weights=np.ones_like(TOKENS))
  step = jax.jit(functools.partial(train.train_step, model=model_lib.Transformer(cfg), tcfg=tcfg, tx=tx,
                                   lr_fn=optim.schedule(tcfg.optim, 10)))
  state = dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
               rng=jax.random.PRNGKey(0))
  return trainable, step(state, frozen, batch)[0]["trainable"], frozen


def test_vera_shares_one_frozen_pair_starts_at_the_base_and_trains_only_d_and_b():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, variant="vera", targets=("q", "v", "up", "down"))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(3))
  q, down = cols["lora_init"]["layer_1"]["attn"]["q"], cols["lora_init"]["layer_0"]["mlp"]["down"]
  assert {k: v.shape for k, v in q.items()} == {"a": (32, 4), "b": (4, 32)}
  assert {k: v.shape for k, v in cols["lora"]["layer_0"]["attn"]["v"].items()} == {"d": (4,), "b": (16,)}
  np.testing.assert_array_equal(q["a"], down["a"][:32])  # one A [64, R] (up's input is 32, down's 64) ...
  np.testing.assert_array_equal(cols["lora_init"]["layer_0"]["mlp"]["up"]["b"][:, :32], q["b"])  # ... one B [R, 64]
  assert float(jnp.abs(down["a"]).max()) <= 64 ** -0.5 and float(jnp.abs(down["a"]).max()) > 0.1
  np.testing.assert_array_equal(cols["lora"]["layer_0"]["attn"]["q"]["d"], np.full(4, 0.1, np.float32))
  base = _logits(dataclasses.replace(cfg, lora=None), {"params": params})
  np.testing.assert_array_equal(_logits(cfg, {"params": params, **cols}), base)  # b = 0: the base exactly

  cols = helpers.perturbed_lora(cfg, params, scale=0.5)  # d and b moved, as after training
  before, after, frozen = _train_step(cfg, params, cols)
  assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(after)} == {"d", "b"}  # only d, b train
  assert frozen["lora_init"] is cols["lora_init"]  # A and B are inputs of the step, never outputs
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree_util.tree_leaves(before)):
    np.testing.assert_allclose(jnp.abs(a - b).max(), 1e-2, rtol=1e-3, err_msg=jax.tree_util.keystr(path))  # Adam
  assert lora_lib.count(after) == 2 * (4 * 4 + 32 + 16 + 64 + 32)  # R + out per target, 4 targets, 2 layers


def _lora_fa_init(cfg, w, key, shared):
  t, f = lora_lib.LORA.init(cfg, w, key, shared)
  return {"b": t["b"]}, {"a": t["a"]}


LORA_FA = lora_lib.Variant(  # LoRA-FA: A frozen at its random init, only B trains; no PEFT layout here.
    trainable={"b": ("lora_rank", "out")}, frozen={"a": ("in", "lora_rank")}, init=_lora_fa_init,
    forward=lambda cfg, x, xd, w, t, f: jnp.dot(x, w) + jnp.dot(jnp.dot(xd, f["a"]), t["b"]) * cfg.scale,
    merge=lambda cfg, w, t, f: w + cfg.scale * f["a"] @ t["b"],
    unmerge=lambda cfg, w, t, f: w - cfg.scale * f["a"] @ t["b"], loraplus=("b",))


def test_a_variant_registered_from_a_test_inits_trains_shards_and_merges(monkeypatch):
  monkeypatch.setitem(lora_lib.VARIANTS, "lora_fa", LORA_FA)
  cfg = helpers.with_lora(model_lib.tiny_config(vocab_size=264), rank=4, variant="lora_fa", targets=("q", "down"))
  params = helpers.tiny_params(cfg)
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_map(lambda x: x.shape, cols["lora_init"]["layer_0"]) == {
      "attn": {"q": {"a": (32, 4)}}, "mlp": {"down": {"a": (64, 4)}}}
  np.testing.assert_array_equal(_logits(cfg, {"params": params, **cols}),
                                _logits(dataclasses.replace(cfg, lora=None), {"params": params}))
  before, after, frozen = _train_step(cfg, params, cols, loraplus_ratio=4.0)
  assert set(after["lora"]["layer_0"]["attn"]["q"]) == {"b"} and set(frozen) == {"params", "lora_init"}
  np.testing.assert_allclose(jnp.abs(after["lora"]["layer_1"]["mlp"]["down"]["b"]).max(), 4e-2, rtol=1e-3)  # LoRA+
  mesh = sharding.make_mesh(data=2, model=4)
  specs = sharding.lora_shardings(cfg, mesh)
  assert specs["lora_init"]["layer_0"]["mlp"]["down"]["a"].spec == jax.sharding.PartitionSpec("model", None)
  assert specs["lora"]["layer_0"]["mlp"]["down"]["b"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  trained = {"params": params, "lora": after["lora"], "lora_init": frozen["lora_init"]}
  merged, merged_cfg = lora_lib.merge(cfg, params, trained)
  tuned = _logits(cfg, trained)
  assert float(jnp.abs(tuned - _logits(merged_cfg, {"params": params})).max()) > 1e-3
  np.testing.assert_allclose(_logits(merged_cfg, {"params": merged}), tuned, atol=1e-5)
  restored = lora_lib.unmerge(cfg, merged, trained)
  np.testing.assert_allclose(restored["layer_1"]["mlp"]["down"]["kernel"], params["layer_1"]["mlp"]["down"]["kernel"],
                             atol=1e-6)


def test_an_entry_whose_init_disagrees_with_its_declaration_is_named(monkeypatch):
  monkeypatch.setitem(lora_lib.VARIANTS, "lora_fa", dataclasses.replace(LORA_FA, frozen={}))
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=2, variant="lora_fa", targets=("q",))
  with pytest.raises(ValueError, match=r"VARIANTS\['lora_fa'\]: init returned trainable \['b'\] and frozen \['a'\], "
                                       r"its entry declares \['b'\] and \[\]"):
    lora_lib.init(cfg.lora, helpers.tiny_params(cfg), jax.random.PRNGKey(0))


def test_lora_config_is_gin_configurable_and_round_trips_through_json():
  gin.clear_config()
  try:
    gin.parse_config("LoraConfig.rank = 16\nLoraConfig.variant = 'vera'\nLoraConfig.targets = ['q', 'down']")
    cfg = lora_lib.LoraConfig()
  finally:
    gin.clear_config()
  assert (cfg.rank, cfg.variant, cfg.targets, cfg.alpha) == (16, "vera", ("q", "down"), 16.0)
  assert lora_lib.LoraConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # tau.json's round trip
  with pytest.raises(TypeError, match="LoraConfig.rank"):
    lora_lib.LoraConfig(rank="8")
