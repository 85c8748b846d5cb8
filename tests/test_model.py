"""The decoder: causality, the prefix-LM mask, family features, padding, and full-size parameter counts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib
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


@pytest.mark.parametrize("policy", sorted(model_lib.REMAT_POLICIES))
def test_remat_policies_give_identical_logits_and_grads(policy):
  cfg = model_lib.tiny_config()
  params = helpers.tiny_params(cfg)
  tokens = jnp.arange(1, 9)[None]
  loss = lambda c: (lambda p: model_lib.Transformer(c).apply({"params": p}, tokens)[0].sum())
  g1 = jax.grad(loss(cfg))(params)
  g2 = jax.grad(loss(dataclasses.replace(cfg, remat_policy=policy)))(params)
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match=r"remat_policy: 'some' is not one of none, full, minimal"):
    model_lib.tiny_config(remat_policy="some")


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
