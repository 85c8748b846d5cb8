"""The decoder: causality, the prefix-LM mask, family features, padding, and full-size parameter counts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax import lora as lora_lib
from fiat_jax import model as model_lib
import helpers

GEMMA2_LIKE = dict(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, query_pre_attn_scalar=16.0, attention_pattern=("local", "global"),
                   sliding_window=4, post_attn_norm=True, post_mlp_norm=True)
GEMMA3_LIKE = dict(GEMMA2_LIKE, attn_logit_softcap=None, final_logit_softcap=None, qk_norm=True,
                   attention_pattern=("local", "local", "global"), rope_local_theta=10_000.0, rope_theta=1e6,
                   rope_scaling=(("type", "linear"), ("factor", 8.0)), num_layers=3)
VARIANTS = {
    "llama_gqa": {},
    "mha": dict(num_kv_heads=4),
    "mqa": dict(num_kv_heads=1),
    "qwen2_bias_untied": dict(qkv_bias=True, tie_embeddings=False),
    "gemma2": GEMMA2_LIKE,
    "gemma3": GEMMA3_LIKE,
    "palm_parallel": dict(parallel_block=True, gated_mlp=False, activation="gelu"),
    "llama3_rope": dict(rope_scaling=(("type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                                      ("high_freq_factor", 4.0), ("original_max_position", 8))),
}


def _logits(cfg, params, tokens, **kw):
  return model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)[0]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_later_token_does_not_reach_earlier_logits(name):
  cfg = model_lib.tiny_config(**VARIANTS[name])
  params = helpers.tiny_params(cfg)
  tokens = np.arange(1, 13)[None] * 7 % cfg.vocab_size
  changed = tokens.copy()
  changed[0, 8] = 200
  a, b = _logits(cfg, params, tokens), _logits(cfg, params, changed)
  assert a.shape == (1, 12, cfg.vocab_size)
  np.testing.assert_array_equal(a[0, :8], b[0, :8])
  assert float(jnp.abs(a[0, 8:] - b[0, 8:]).max()) > 1e-3


def test_prefix_lm_is_bidirectional_inside_the_prefix_only():
  cfg = model_lib.tiny_config(prefix_lm=True)
  params = helpers.tiny_params(cfg)
  tokens = np.arange(1, 11)[None]
  bidir = np.array([[1] * 5 + [0] * 5])
  changed = tokens.copy()
  changed[0, 3] = 100  # inside the prefix: reaches earlier prefix positions
  a, b = _logits(cfg, params, tokens, bidirectional_BL=bidir), _logits(cfg, params, changed, bidirectional_BL=bidir)
  assert float(jnp.abs(a[0, :3] - b[0, :3]).max()) > 1e-3
  changed = tokens.copy()
  changed[0, 7] = 100  # a target token: stays causal
  b = _logits(cfg, params, changed, bidirectional_BL=bidir)
  np.testing.assert_array_equal(a[0, :7], b[0, :7])
  # Without prefix_lm in the config the same mask argument is ignored: plain causal.
  causal_cfg = dataclasses.replace(cfg, prefix_lm=False)
  c1 = _logits(causal_cfg, params, tokens, bidirectional_BL=bidir)
  c2 = _logits(causal_cfg, params, np.where(np.arange(10) == 3, 100, tokens), bidirectional_BL=bidir)
  np.testing.assert_array_equal(c1[0, :3], c2[0, :3])


def test_sliding_window_limits_the_receptive_field():
  cfg = model_lib.tiny_config(attention_pattern=("local",), sliding_window=3)
  params = helpers.tiny_params(cfg)
  tokens = np.arange(1, 13)[None]
  changed = tokens.copy()
  changed[0, 0] = 100
  a, b = _logits(cfg, params, tokens), _logits(cfg, params, changed)
  # Two local layers of window 3: token 0 reaches positions 0..4 and no further.
  assert float(jnp.abs(a[0, 4] - b[0, 4]).max()) > 1e-4
  np.testing.assert_array_equal(a[0, 5:], b[0, 5:])


def test_padding_segments_do_not_change_real_tokens():
  cfg = model_lib.tiny_config()
  params = helpers.tiny_params(cfg)
  tokens = np.array([[5, 6, 7, 8]])
  padded = np.array([[0, 0, 5, 6, 7, 8]])
  a = _logits(cfg, params, tokens)
  b = _logits(cfg, params, padded, positions_BL=np.array([[0, 0, 0, 1, 2, 3]]),
              segment_ids_BL=np.array([[0, 0, 1, 1, 1, 1]]))
  np.testing.assert_allclose(a[0], b[0, 2:], atol=1e-5)


def test_softcap_bounds_final_logits():
  cfg = model_lib.tiny_config(final_logit_softcap=2.0)
  logits = _logits(cfg, helpers.tiny_params(cfg, gain=10.0), np.arange(1, 9)[None])
  assert float(jnp.abs(logits).max()) <= 2.0
  assert float(jnp.abs(logits).max()) > 1.5


def test_bf16_compute_with_f32_params():
  cfg = model_lib.tiny_config(dtype="bfloat16")
  params = helpers.tiny_params(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  ref = _logits(model_lib.tiny_config(), params, np.arange(1, 9)[None])
  low = _logits(cfg, params, np.arange(1, 9)[None])
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=0.25)


def test_remat_gives_identical_logits_and_grads():
  cfg = model_lib.tiny_config()
  params = helpers.tiny_params(cfg)
  tokens = jnp.arange(1, 9)[None]
  loss = lambda c: (lambda p: model_lib.Transformer(c).apply({"params": p}, tokens)[0].sum())
  g1 = jax.grad(loss(cfg))(params)
  g2 = jax.grad(loss(dataclasses.replace(cfg, remat=True)))(params)
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _plain_attend(q, k, v, mask_BLS, softcap):
  logits = jnp.where(mask_BLS[:, None, None], model_lib._capped_logits(q, k, softcap), model_lib.NEG_INF)
  return jnp.einsum("BKGLS,BKSE->BKGLE", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("name", ["llama_gqa", "mqa", "gemma2"])
def test_attention_gradient_equals_autodiff(name, monkeypatch):
  """The attention's hand-written VJP (probabilities recomputed from the rows' max and sum), through GQA/MQA,
  soft-capping, sliding windows, a prefix and padding, equals autodiff of plain softmax attention: in float64,
  where only a wrong gradient can exceed 1e-12."""
  with jax.enable_x64(True):
    cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=True, dtype="float64", param_dtype="float64")
    params = jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), helpers.tiny_params(cfg))
    tokens = jnp.arange(1, 11)[None] * 7 % cfg.vocab_size
    kw = dict(segment_ids_BL=jnp.array([[1] * 8 + [0] * 2]), bidirectional_BL=jnp.array([[1] * 3 + [0] * 7]))
    loss = lambda p: jnp.sum(jnp.sin(model_lib.Transformer(cfg).apply({"params": p}, tokens, **kw)[0]))
    got = jax.grad(loss)(params)
    monkeypatch.setattr(model_lib, "_attend", _plain_attend)
    want = jax.grad(loss)(params)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      assert g.dtype == jnp.float64
      assert float(jnp.abs(g - w).max()) <= 1e-12 * float(jnp.abs(w).max())


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attend_vjp_equals_autodiff_with_fully_masked_rows(softcap):
  """_attend alone, on a random mask with a fully masked query row (whose probabilities are uniform, 1/S, in both
  passes): values and gradients of q, k and v equal plain softmax attention in float64."""
  rng = np.random.default_rng(0)
  B, L, S, K, G, E = 2, 5, 7, 2, 3, 4
  with jax.enable_x64(True):
    q, w = (jnp.asarray(rng.normal(size=(B, K, G, L, E))) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, K, S, E))) for _ in range(2))
    mask = jnp.asarray(rng.random((B, L, S)) > 0.3).at[0, 1].set(False)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask, softcap)) * w)
    np.testing.assert_allclose(model_lib._attend(q, k, v, mask, softcap), _plain_attend(q, k, v, mask, softcap),
                               rtol=1e-13, atol=1e-13)
    got = jax.grad(loss(model_lib._attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_plain_attend), argnums=(0, 1, 2))(q, k, v)
    for g, x in zip(got, want):
      assert g.dtype == jnp.float64
      assert float(jnp.abs(g - x).max()) <= 1e-12 * float(jnp.abs(x).max())


@pytest.mark.parametrize("activation", sorted(model_lib.ACTIVATIONS))
def test_gated_vjp_equals_autodiff(activation):
  """The gated unit's hand-written VJP (gate and up kept; act and act' recomputed by formulas that share no
  operation with the forward's) equals autodiff of act(gate) * up, in float64."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    gate, up, w = (jnp.asarray(rng.normal(size=(2, 5, 6)) * 3) for _ in range(3))
    plain = lambda gate, up: model_lib.ACTIVATIONS[activation](gate) * up
    loss = lambda fn: lambda gate, up: jnp.sum(jnp.sin(fn(gate, up)) * w)
    np.testing.assert_array_equal(model_lib.gated(gate, up, activation), plain(gate, up))
    got = jax.grad(loss(lambda g, u: model_lib.gated(g, u, activation)), argnums=(0, 1))(gate, up)
    want = jax.grad(loss(plain), argnums=(0, 1))(gate, up)
    for g, x in zip(got, want):
      assert g.dtype == jnp.float64
      assert float(jnp.abs(g - x).max()) <= 1e-12 * float(jnp.abs(x).max())


@pytest.mark.parametrize("name,prefix_lm", [("llama_gqa", False), ("mqa", False), ("gemma2", False),
                                             ("llama_gqa", True)])
def test_causal_query_blocks_equal_full_attention(name, prefix_lm, monkeypatch):
  """Query blocks that skip the all-masked keys give the full attention's logits and gradients, through packing
  and padding, soft-capping and sliding windows; a prefix LM (keys past the row are visible) keeps full attention."""
  cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=prefix_lm)
  params = helpers.tiny_params(cfg)
  tokens = jnp.arange(1, 33).reshape(2, 16) * 7 % cfg.vocab_size
  kw = dict(segment_ids_BL=jnp.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16]),
            bidirectional_BL=jnp.array([[1] * 3 + [0] * 13, [1] * 5 + [0] * 11]))

  def run():  # a new function each time: make_jaxpr caches traces by function
    logits = lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens, **kw)[0]
    return (logits(params), jax.grad(lambda p: jnp.sum(jnp.sin(logits(p))))(params),
            str(jax.make_jaxpr(logits)(params)).count("dot_general"))

  monkeypatch.setattr(model_lib, "QUERY_BLOCK", 4)
  got, got_grads, got_dots = run()
  monkeypatch.setattr(model_lib, "QUERY_BLOCK", 16)
  want, want_grads, want_dots = run()
  # 4 blocks of 4 rows: two attention products per block instead of two per layer.
  assert got_dots - want_dots == (0 if prefix_lm else 2 * 3 * cfg.num_layers)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max()) + 1e-7  # float32 summation order only


# Published parameter counts: google/gemma-2-2b and meta-llama/Llama-2-7b-hf.
GEMMA2_2B = model_lib.Config(vocab_size=256_000, num_layers=26, embed_dim=2304, num_heads=8, num_kv_heads=4,
                             head_dim=256, mlp_dim=9216, **GEMMA2_LIKE | dict(sliding_window=4096,
                                                                               query_pre_attn_scalar=256.0))
LLAMA2_7B = model_lib.Config(vocab_size=32_000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32,
                             head_dim=128, mlp_dim=11008, tie_embeddings=False, norm_eps=1e-5)


@pytest.mark.parametrize("cfg,expected", [(GEMMA2_2B, 2_614_341_888), (LLAMA2_7B, 6_738_415_616)])
def test_eval_shape_of_full_size_configs(cfg, expected):
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  assert lora_lib.count(shapes) == expected
  # LoRA rank 8 on the seven projections, also without allocating anything.
  lcfg = lora_lib.LoraConfig(rank=8)
  lora_shapes = jax.eval_shape(lambda p: lora_lib.init(lcfg, p, jax.random.PRNGKey(0)), nn.meta.unbox(shapes))
  D, Hq, Kv, F = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
  per_layer = 8 * ((D + Hq) * 2 + (D + Kv) * 2 + 3 * (D + F))
  assert lora_lib.count(lora_shapes) == cfg.num_layers * per_layer
