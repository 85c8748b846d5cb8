"""Each kernel form of ops.py (and the chunked loss's) against its plain reference: values and gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import ops
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import losses
from fiat_jax.training import train
import helpers
from test_model import VARIANTS


def _close(got, want, rel):
  """Every leaf within rel of the largest magnitude of its reference, with the dtype of the reference."""
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert float(jnp.abs(g - w).max()) <= rel * float(jnp.abs(w).max())


def _random_attention(dtype, B=2, L=5, S=7, K=2, G=3, E=4, seed=0):
  """q [B, L, H, E], head-major k and v, a loss weight, and a random mask whose row (0, 1) is fully masked."""
  rng = np.random.default_rng(seed)
  q, w = (jnp.asarray(rng.normal(size=(B, L, K * G, E)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(B, K, S, E)), dtype) for _ in range(2))
  mask = jnp.asarray(rng.random((B, L, S)) > 0.3).at[0, 1].set(False)
  return q, k, v, w, mask


def _attention_and_grads(kernels, q, k, v, w, mask, softcap, causal=False):
  attend = lambda q, k, v: ops.attention(q, k, v, mask, softcap, kernels, causal)
  loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)) * w)
  return jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("K,G", [(2, 3), (1, 4), (3, 1)])  # GQA, MQA, MHA
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fused_attention_equals_reference_with_a_fully_masked_row(K, G, softcap):
  """The recomputed-probabilities VJP equals autodiff of plain softmax attention in float64, where only a wrong
  gradient can exceed 1e-12; a fully masked row is uniform (1/S) in both."""
  with jax.enable_x64(True):
    q, k, v, w, mask = _random_attention(jnp.float64, K=K, G=G)
    got = _attention_and_grads("fused", q, k, v, w, mask, softcap)
    want = _attention_and_grads("reference", q, k, v, w, mask, softcap)
    _close(got, want, 1e-12)
    np.testing.assert_allclose(got[0][0, 1], jnp.mean(v[0], axis=1).repeat(G, axis=0), rtol=1e-12)


def test_xla_attention_equals_reference_with_a_fully_masked_row():
  """jax.nn.dot_product_attention (its XLA form on CPU; softmax in float32) through GQA and a fully masked row."""
  q, k, v, w, mask = _random_attention(jnp.float32)
  got = _attention_and_grads("xla_attention", q, k, v, w, mask, None)
  want = _attention_and_grads("reference", q, k, v, w, mask, None)
  _close(got, want, 2e-6)
  assert bool(jnp.all(jnp.isfinite(got[0])))


def _causal_mask(B, L, window=None):
  """The model's mask for packed rows (two segments, then padding) without a cache."""
  slots = jnp.arange(L)
  seg = jnp.asarray([[1] * 6 + [2] * 7 + [0] * (L - 13)] + [[1] * L] * (B - 1))
  pos = jnp.where(seg[0] == 2, slots - 6, slots)[None].repeat(B, 0)
  no_prefix = jnp.zeros((B, L), bool)
  return model_lib.attention_mask(slots, slots, pos, pos, seg, seg, no_prefix, no_prefix, window)


@pytest.mark.parametrize("softcap,window", [(None, None), (3.0, 5)])
def test_causal_query_blocks_equal_full_attention(softcap, window, monkeypatch):
  """Query blocks that skip the all-masked keys above the diagonal: the reference's values and gradients, through
  packing, padding, soft-capping and a sliding window, with 4 blocks of 4 rows computing 2 products each."""
  with jax.enable_x64(True):
    q, k, v, w, _ = _random_attention(jnp.float64, L=16, S=16)
    mask = _causal_mask(2, 16, window)
    want = _attention_and_grads("reference", q, k, v, w, mask, softcap, causal=True)
    dots = lambda: str(jax.make_jaxpr(lambda q: ops.attention(q, k, v, mask, softcap, "fused", True))(q)).count(
        "dot_general")
    monkeypatch.setattr(ops, "QUERY_BLOCK", 16)  # L = Q: one block
    whole, whole_dots = _attention_and_grads("fused", q, k, v, w, mask, softcap, causal=True), dots()
    monkeypatch.setattr(ops, "QUERY_BLOCK", 4)
    blocks, block_dots = _attention_and_grads("fused", q, k, v, w, mask, softcap, causal=True), dots()
    assert (whole_dots, block_dots) == (2, 8)
    _close(whole, want, 1e-12)
    _close(blocks, want, 1e-12)


@pytest.mark.parametrize("activation", sorted(ops.ACTIVATIONS))
def test_fused_gated_mlp_equals_reference(activation):
  """The gated unit's VJP (gate and up kept; act and act' recomputed by formulas that share no operation with the
  forward's) equals autodiff of act(gate) * up, in float64; the values are the same expression."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    gate, up, w = (jnp.asarray(rng.normal(size=(2, 5, 6)) * 3) for _ in range(3))
    run = lambda kernels: (ops.gated_mlp(gate, up, activation, kernels), jax.jit(jax.grad(
        lambda g, u: jnp.sum(jnp.sin(ops.gated_mlp(g, u, activation, kernels)) * w), argnums=(0, 1)))(gate, up))
    got, want = run("fused"), run("reference")
    np.testing.assert_array_equal(got[0], want[0])
    _close(got, want, 1e-12)


@pytest.mark.parametrize("name", ["low_rank", "lora_dense"])
def test_fused_lora_products_equal_reference(name):
  """x W + (xd A) B · s as one matmul and (x A) B · s alone: values and every input's gradient (x, the dropped-out
  xd, W, A, B) equal autodiff of the plain products, in float64."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x, xd, g = (jnp.asarray(rng.normal(size=(2, 5, s))) for s in (6, 6, 7))
    w, a, b = (jnp.asarray(rng.normal(size=s)) for s in ((6, 7), (6, 3), (3, 7)))
    args = (x, xd, w, a, b) if name == "lora_dense" else (x, a, b)
    got, got_vjp = jax.vjp(lambda *t: getattr(ops, name)(*t, 1.7), *args)
    want, want_vjp = jax.vjp(lambda *t: getattr(ops, name + "_reference")(*t, 1.7), *args)
    _close((got, got_vjp(g)), (want, want_vjp(g)), 1e-13)


def test_dense_equals_reference():
  """A projection as one 2-D product over the flattened rows against jnp.dot on [B, L, in]: the value and the
  gradients of x and W, in float64."""
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x, g = (jnp.asarray(rng.normal(size=(2, 5, s))) for s in (6, 7))
    w = jnp.asarray(rng.normal(size=(6, 7)))
    got, got_vjp = jax.vjp(ops.dense, x, w)
    want, want_vjp = jax.vjp(ops.dense_reference, x, w)
    _close((got, got_vjp(g)), (want, want_vjp(g)), 1e-13)


def _model_logits_and_grads(cfg, params, tokens, **kw):
  logits = lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens, **kw)[0]
  return jax.jit(lambda p: (logits(p), jax.grad(lambda p: jnp.sum(jnp.sin(logits(p))))(p)))(params)


PACKED = dict(segment_ids_BL=jnp.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16]),
              bidirectional_BL=jnp.array([[1] * 3 + [0] * 13, [1] * 5 + [0] * 11]))


@pytest.mark.parametrize("name,prefix_lm", [("llama_gqa", True), ("mqa", False), ("gemma2", True)])
def test_model_fused_kernels_equal_reference(name, prefix_lm, monkeypatch):
  """Config.kernels 'fused' against 'reference' through the whole model (query blocks of 4 rows, packing, padding,
  GQA/MQA, soft-capping, sliding windows, a prefix LM): logits and every parameter's gradient, float64."""
  monkeypatch.setattr(ops, "QUERY_BLOCK", 4)
  with jax.enable_x64(True):
    cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=prefix_lm, dtype="float64", param_dtype="float64",
                                kernels="fused")
    params = jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), helpers.tiny_params(cfg))
    tokens = jnp.arange(1, 33).reshape(2, 16) * 7 % cfg.vocab_size
    got = _model_logits_and_grads(cfg, params, tokens, **PACKED)
    want = _model_logits_and_grads(dataclasses.replace(cfg, kernels="reference"), params, tokens, **PACKED)
    _close(got, want, 1e-12)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias_untied"])
def test_full_fine_tuning_gradients_with_dense_equal_plain_dot(name, monkeypatch):
  """Full fine-tuning's gradients of every projection and of the tied or untied unembedding, with lora.py's
  projections as ops.dense, against jax.grad through jnp.dot on [B, L, in]: the model's logits and gradients in
  float64 (within 1e-12), and train.loss_and_grads with the fused chunked loss in float32 (the loss runs in float32;
  within 1e-6 of each leaf's largest gradient)."""
  tokens = jnp.arange(1, 33).reshape(2, 16) * 7
  batch = dict(decoder_input_tokens=tokens[:, :-1] % 250, decoder_target_tokens=tokens[:, 1:] % 250,
               decoder_loss_weights=jnp.ones((2, 15), jnp.float32).at[0, :4].set(0.0))
  tcfg = train.TrainConfig(mode="full", loss_chunk=5)

  def run():
    cfg32 = model_lib.tiny_config(**VARIANTS[name])
    params32 = helpers.tiny_params(cfg32)
    step = jax.jit(lambda p: train.loss_and_grads({"params": p}, {}, batch, None, model=model_lib.Transformer(cfg32),
                                                   tcfg=tcfg))
    out32 = step(params32)
    with jax.enable_x64(True):
      cfg = dataclasses.replace(cfg32, dtype="float64", param_dtype="float64")
      params = jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), params32)
      return _model_logits_and_grads(cfg, params, tokens % cfg.vocab_size, **PACKED), out32

  got64, got32 = run()
  monkeypatch.setattr(lora_lib, "dense", ops.dense_reference)
  want64, want32 = run()
  with jax.enable_x64(True):
    _close(got64, want64, 1e-12)
  _close(got32[:2], want32[:2], 1e-6)
  _close(got32[3], want32[3], 1e-6)
  assert min(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(got32[3])) > 1e-4


@pytest.mark.parametrize("name,prefix_lm", [("llama_gqa", True), ("gemma3", False)])
def test_model_xla_attention_equals_reference_with_and_without_a_cache(name, prefix_lm):
  """'xla_attention' through the model (a prefix, packing, padding; Gemma 3's windows and q/k norms), then a
  prefill and three single-token steps through the head-major KV cache."""
  cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=prefix_lm)
  params = helpers.tiny_params(cfg)
  xla, ref = dataclasses.replace(cfg, kernels="xla_attention"), dataclasses.replace(cfg, kernels="reference")
  tokens = jnp.arange(1, 33).reshape(2, 16) * 7 % cfg.vocab_size
  _close(_model_logits_and_grads(xla, params, tokens, **PACKED), _model_logits_and_grads(ref, params, tokens, **PACKED),
         1e-5)

  def decode(c):
    m, cache = model_lib.Transformer(c), model_lib.init_cache(c, 2, 12)
    out, cache = jax.jit(lambda cache: m.apply({"params": params}, tokens[:, :8], cache=cache,
                                               bidirectional_BL=PACKED["bidirectional_BL"][:, :8]))(cache)
    step = jax.jit(lambda t, i, cache: m.apply({"params": params}, t, positions_BL=jnp.full((2, 1), i), cache=cache))
    steps = [out]
    for i in range(8, 11):
      out, cache = step(tokens[:, i:i + 1], i, cache)
      steps.append(out)
    return steps

  _close(decode(xla), decode(ref), 1e-5)


@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.2)])
def test_fused_chunked_cross_entropy_equals_reference(z_loss, smoothing):
  """The chunked loss whose gradients come from its forward pass against autodiff through the same scan: both sums
  and their VJPs (cotangents on the loss and on the NLL differ with z-loss or smoothing). The loss runs in
  float32 whatever the inputs, so float32 summation order bounds the difference."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  head, frozen = {"w": jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)}, {"b": jnp.asarray(rng.normal(size=11))}
  targets = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.float32)
  logits_fn = lambda p, f, x: x @ p["w"] + f["b"]
  run = lambda kernels: jax.vjp(lambda x, p: losses.chunked_cross_entropy(
      logits_fn, x, p, frozen, targets, weights, 2, z_loss, smoothing, kernels=kernels), h, head)
  (got, got_vjp), (want, want_vjp) = run("fused"), run("reference")
  _close(got, want, 1e-6)
  for cot in [(1.0, 0.0), (0.0, 1.0), (0.7, -1.3)]:
    cot = tuple(jnp.float32(c) for c in cot)
    _close(got_vjp(cot), want_vjp(cot), 1e-5)


def test_a_run_chooses_its_kernels_through_gin():
  """`--gin.tau_model.kernels='reference'` reaches τ's Config (and the tiny τ's), the same weights either way."""
  import gin  # pylint: disable=g-import-not-at-top
  from fiat_jax import cli, experiment  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  cli.parse_gin(['--gin.tau_model.tiny=True', "--gin.tau_model.kernels='reference'"], 'test')
  cfg, params, _, _ = experiment.tau_model()
  gin.clear_config()
  auto_cfg, auto_params, _, _ = experiment.tau_model(tiny=True)
  assert (cfg.kernels, auto_cfg.kernels) == ('reference', 'auto')
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                  jax.tree_util.tree_leaves(auto_params)))
