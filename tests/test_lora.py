"""LoRA: the base at init, exact merges for every variant, unmerge, tree shapes and counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax import lora as lora_lib
from fiat_jax import model as model_lib
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


@pytest.mark.parametrize("variant,rslora", [("lora", False), ("lora", True), ("dora", False), ("pissa", False)])
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
    lora_lib.LoraConfig(variant="vera")


def test_dropout_is_active_only_when_not_deterministic():
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, dropout=0.5)
  params = helpers.tiny_params(cfg)
  cols = helpers.perturbed_lora(cfg, params)
  m = model_lib.Transformer(cfg)
  det = m.apply({"params": params, **cols}, TOKENS)[0]
  np.testing.assert_array_equal(det, m.apply({"params": params, **cols}, TOKENS)[0])
  drop = m.apply({"params": params, **cols}, TOKENS, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})[0]
  assert float(jnp.abs(drop - det).max()) > 1e-4


def test_low_rank_gradients_equal_autodiff_of_the_plain_product():
  kx, ka, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
  x, a, b = jax.random.normal(kx, (2, 5, 6)), jax.random.normal(ka, (6, 3)), jax.random.normal(kb, (3, 7))
  g = jax.random.normal(kg, (2, 5, 7))
  y, vjp = jax.vjp(lambda *t: lora_lib.low_rank(*t, 1.7), x, a, b)
  y_ref, vjp_ref = jax.vjp(lambda x, a, b: jnp.dot(jnp.dot(x, a), b) * 1.7, x, a, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_dense_gradients_equal_autodiff_of_the_plain_sum():
  kx, kd, kw, ka, kb, kg = jax.random.split(jax.random.PRNGKey(1), 6)
  x, xd = jax.random.normal(kx, (2, 5, 6)), jax.random.normal(kd, (2, 5, 6))
  w, a, b = jax.random.normal(kw, (6, 7)), jax.random.normal(ka, (6, 3)), jax.random.normal(kb, (3, 7))
  g = jax.random.normal(kg, (2, 5, 7))
  y, vjp = jax.vjp(lambda *t: lora_lib.lora_dense(*t, 1.7), x, xd, w, a, b)
  y_ref, vjp_ref = jax.vjp(lambda x, xd, w, a, b: jnp.dot(x, w) + jnp.dot(jnp.dot(xd, a), b) * 1.7, x, xd, w, a, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,rslora,dropout", [("lora", False, 0.0), ("lora", False, 0.1), ("lora", True, 0.1),
                                                    ("dora", False, 0.1), ("pissa", False, 0.0), ("pissa", False, 0.1)])
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
  monkeypatch.setattr(lora_lib, "low_rank", lambda x, a, b, scale: jnp.dot(jnp.dot(x, a), b) * scale)
  monkeypatch.setattr(lora_lib, "lora_dense",
                      lambda x, xd, w, a, b, scale: jnp.dot(x, w) + jnp.dot(jnp.dot(xd, a), b) * scale)
  want, want_all = grads({"lora"}), grads({"lora", "params"})
  assert set(got) == {"lora"}  # a frozen base gets no gradient
  for g, w in zip(jax.tree_util.tree_leaves((got, got_all)), jax.tree_util.tree_leaves((want, want_all))):
    assert g.dtype == jnp.float64
    assert float(jnp.abs(g - w).max()) <= 1e-12 * float(jnp.abs(w).max())
