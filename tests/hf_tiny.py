"""Tiny random transformers models per family and padded-batch logits, shared by the Hugging Face tests."""
import jax
import numpy as np
import pytest

from fiat_jax.model import transformer as model_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
# Each family with the features it has: GQA / MQA, tied or not, rope scaling, soft-caps, sliding windows.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500_000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1_000_000.0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=5, query_pre_attn_scalar=8, sliding_window_pattern=2, rope_theta=100_000.0,
        rope_local_base_freq=1_000.0, rope_scaling=dict(rope_type="linear", factor=4.0))),
}


def make_hf_model(family, seed=0):
  """A float32 transformers model with random weights large enough that greedy decoding has clear winners."""
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**COMMON, **extra})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # Gemma stores the scale as (1 + weight): centre its weights on 0, the others on 1
        p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.25 * torch.randn_like(p))
  model.generation_config.eos_token_id = None
  return model


def padded_batch(seed=0, length=14):
  """Token ids and mask: row 0 right-padded, row 1 left-padded, row 2 full."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(3, length)).astype(np.int64)
  mask = np.ones((3, length), np.int64)
  mask[0, 9:] = 0
  mask[1, :5] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def hf_logits(model, tokens, mask):
  """transformers' logits with the attention mask and the matching position ids."""
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.numpy()


def our_logits(cfg, variables, tokens, mask):
  """Logits of model.Transformer(cfg) with `variables` ({'params': ..., ['lora': ...]}) on the same batch."""
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  apply = jax.jit(model_lib.Transformer(cfg).apply)
  logits, _ = apply(variables, tokens.astype(np.int32), positions, mask.astype(np.int32))
  return np.asarray(logits)
