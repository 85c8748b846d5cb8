"""attention.py: each backend's kernel against the plain reference through the model, the `auto` choice per
backend, and the kernels a configuration cannot use refused at Config time."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from fiat_jax.model import attention
from fiat_jax.model import transformer as model_lib
import helpers
from test_model import VARIANTS

L = 128  # splash tiles lengths by 128


def _close(got, want, rel):
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert float(jnp.abs(g - w).max()) <= rel * float(jnp.abs(w).max())


def _logits_and_grads(cfg, params, tokens, **kw):
  logits = lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens, **kw)[0]
  return jax.jit(lambda p: (logits(p), jax.grad(lambda p: jnp.sum(jnp.sin(logits(p))))(p)))(params)


PACKED = dict(segment_ids_BL=jnp.array([[1] * 50 + [2] * 70 + [0] * 8, [1] * L]),
              bidirectional_BL=jnp.array([[1] * 9 + [0] * (L - 9), [1] * 20 + [0] * (L - 20)]))


@pytest.mark.parametrize("kernels,name,prefix_lm", [
    ("xla_chunked", "llama_gqa", True), ("xla_chunked", "gemma2", False), ("auto", "gemma3", True),
    ("splash", "gemma2", False), ("splash", "mqa", False), ("xla_attention", "gemma3", False)])
def test_kernel_equals_reference_through_the_model(kernels, name, prefix_lm):
  """Logits and every parameter's gradient against 'reference' (float32, within 1e-5 of each leaf's largest
  magnitude): packed segments and padding, GQA / MQA, soft-capping, sliding windows, a prefix LM. splash runs in
  Pallas' interpret mode here (its TPU kernel code, executed on the CPU)."""
  cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=prefix_lm, kernels=kernels)
  params = helpers.tiny_params(cfg)
  tokens = jnp.arange(1, 2 * L + 1).reshape(2, L) * 7 % cfg.vocab_size
  kw = PACKED if prefix_lm else dict(segment_ids_BL=PACKED["segment_ids_BL"])
  want = _logits_and_grads(dataclasses.replace(cfg, kernels="reference"), params, tokens, **kw)
  _close(_logits_and_grads(cfg, params, tokens, **kw), want, 1e-5)


def test_auto_prefill_and_cached_decoding_equal_reference():
  """`auto` with a KV cache: a 24-token prefill then three single-token steps, against 'reference'."""
  cfg = model_lib.tiny_config(**VARIANTS["gemma3"])
  params = helpers.tiny_params(cfg)
  tokens = jnp.arange(1, 55).reshape(2, 27) * 7 % cfg.vocab_size

  def decode(c):
    m, cache = model_lib.Transformer(c), model_lib.init_cache(c, 2, 32)
    out, cache = jax.jit(lambda cache: m.apply({"params": params}, tokens[:, :24], cache=cache))(cache)
    step = jax.jit(lambda t, i, cache: m.apply({"params": params}, t, positions_BL=jnp.full((2, 1), i), cache=cache))
    outs = [out]
    for i in range(24, 27):
      out, cache = step(tokens[:, i:i + 1], i, cache)
      outs.append(out)
    return outs

  _close(decode(cfg), decode(dataclasses.replace(cfg, kernels="reference")), 1e-5)


def test_auto_picks_the_backends_kernel():
  assert attention.resolve("auto", None, False, jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve("auto", None, True, jnp.bfloat16, "tpu") == "xla_chunked"  # a per-example prefix
  assert attention.resolve("auto", None, False, jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", 50.0, False, jnp.bfloat16, "gpu") == "triton"  # cuDNN has no soft-capping
  assert attention.resolve("auto", None, False, jnp.float32, "gpu") == "triton"  # cuDNN flash: bf16 / fp16
  assert attention.resolve("auto", 50.0, True, jnp.float32, "cpu") == "fused"
  assert attention.resolve("fused", None, False, jnp.float32, "tpu") == "fused"  # an explicit choice stands


def test_config_refuses_what_a_kernel_cannot_express():
  with pytest.raises(ValueError, match=r"Config.kernels: 'flash' is not one of auto, splash, cudnn"):
    model_lib.tiny_config(kernels="flash")
  for kernels in ("xla_attention", "cudnn"):
    with pytest.raises(ValueError, match=rf"Config.kernels='{kernels}': .* no logit soft-capping "
                                         r"\(Config.attn_logit_softcap=50.0\)"):
      model_lib.tiny_config(**VARIANTS["gemma2"], kernels=kernels)
  with pytest.raises(ValueError, match=r"Config.kernels='splash': .* cannot express the prefix-LM mask"):
    model_lib.tiny_config(prefix_lm=True, kernels="splash")
  with pytest.raises(ValueError, match=r"Config.kernels='splash': lengths 16 x 16 are not multiples of 128"):
    cfg = model_lib.tiny_config(kernels="splash")
    model_lib.Transformer(cfg).apply({"params": helpers.tiny_params(cfg)}, jnp.ones((1, 16), jnp.int32))


def _step_temp_bytes(length: int) -> int:
  """Compiled temporaries of the LoRA loss-and-gradient step of a 2-layer Llama-3.2-1B shape (bf16, batch 1) with
  the default kernels (nothing is allocated: abstract inputs, compile only)."""
  import flax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train  # pylint: disable=g-import-not-at-top
  cfg = model_lib.Config(vocab_size=128256, num_layers=2, embed_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                         mlp_dim=8192, rope_theta=500000.0, dtype="bfloat16", param_dtype="bfloat16",
                         lora=lora_lib.LoraConfig(rank=8, alpha=16.0))
  params = flax.linen.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  cols = jax.eval_shape(lambda p: lora_lib.init(cfg.lora, p, jax.random.PRNGKey(1)), params)
  trainable, frozen = train.split_variables("peft", params, cols)
  batch = {k: jax.ShapeDtypeStruct((1, length), jnp.int32) for k in ("decoder_input_tokens", "decoder_target_tokens")}
  batch["decoder_loss_weights"] = jax.ShapeDtypeStruct((1, length), jnp.float32)
  step = jax.jit(lambda t, f, b: train.loss_and_grads(t, f, b, None, model=model_lib.Transformer(cfg),
                                                      tcfg=train.TrainConfig(loss_chunk=512)))
  return step.lower(trainable, frozen, batch).compile().memory_analysis().temp_size_in_bytes


def test_default_kernels_memory_grows_linearly_with_length():
  """Doubling the length from 2048 to 4096 at most 2.2x the step's temporaries (XLA's attention materialises the
  [B, H, L, S] scores: 5.49 -> 17.05 GiB, 3.1x; measured: fused 2.75 -> 4.59 GiB, xla_chunked 2.88 -> 3.58)."""
  assert _step_temp_bytes(4096) <= 2.2 * _step_temp_bytes(2048)
