"""Every gin_configs/models/*.gin file parses, names its role's macros, and its architecture (jax.eval_shape, nothing
allocated) has exactly the family's published parameter count."""
import dataclasses
import math
import os

import flax.linen as nn
import gin
import jax
import pytest

from fiat_jax import configurables  # noqa: F401  (every configurable the gin files name, as `fiat` has them)
from fiat_jax.model import hf
from fiat_jax.model import transformer as model_lib

MODELS_DIR = os.path.join(os.path.dirname(__file__), "..", "gin_configs", "models")

# Total parameters of each released checkpoint, embeddings included, tied ones counted once. Source: the
# safetensors parameter total ("Model size") on each model's Hugging Face Hub page, huggingface.co/<repo>; the
# rounded sizes in the model cards / reports agree (Gemma 2: 2.6B and 27B; Gemma 3: 1B; Gemma: 2B; Qwen2.5 report:
# 1.54B and 72.7B; Llama 3.2 card: 1.23B; Llama 3.1: 70B; Mistral: 7.25B).
PUBLISHED = {
    "gemma-2-2b-it": ("google/gemma-2-2b-it", 2_614_341_888),
    "gemma-2-2b": ("google/gemma-2-2b", 2_614_341_888),
    "gemma-2-27b-it": ("google/gemma-2-27b-it", 27_227_128_320),
    "gemma-3-1b-it": ("google/gemma-3-1b-it", 999_885_952),
    "gemma-3-1b-pt": ("google/gemma-3-1b-pt", 999_885_952),
    "gemma-2b-it": ("google/gemma-2b-it", 2_506_172_416),
    "qwen2.5-1.5b-instruct": ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", 1_543_714_304),
    "qwen2.5-72b-instruct": ("Qwen/Qwen2.5-72B-Instruct", 72_706_203_648),
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    "llama-3.1-70b-instruct": ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
    "mistral-7b-instruct-v0.3": ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552),
}
ROLES = {"tau": ("gemma-2-2b-it", "gemma-2-2b", "gemma-3-1b-it", "gemma-3-1b-pt", "gemma-2b-it", "qwen2.5-1.5b-instruct",
                 "qwen2.5-1.5b", "llama-3.2-1b-instruct", "llama-3.2-1b"),
         "beta": ("gemma-2-27b-it", "qwen2.5-72b-instruct", "llama-3.1-70b-instruct", "mistral-7b-instruct-v0.3")}


def test_every_model_file_is_checked():
  files = sorted(f.removesuffix(".gin") for f in os.listdir(MODELS_DIR) if f.endswith(".gin"))
  assert files == sorted(PUBLISHED)
  assert sorted(ROLES["tau"] + ROLES["beta"]) == sorted(PUBLISHED)


def load_model_file(name: str, role: str) -> model_lib.Config:
  """Parses one model gin file (checkpoint macro bound to a placeholder) and evaluates its architecture."""
  path = os.path.join(MODELS_DIR, name + ".gin")
  text = open(path, encoding="utf-8").read()
  assert text.startswith("# Model: ") and "# Required macro:" in text and "# Commands:" in text
  macro = role.upper()
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([path], [f"{macro}_CHECKPOINT = '/checkpoints/{name}'"])
    assert gin.query_parameter(f"{role}/hf.model_config.name_or_dir") == PUBLISHED[name][0]
    assert gin.query_parameter(f"{macro}_CHECKPOINT/gin.macro.value") == f"/checkpoints/{name}"
    assert str(gin.query_parameter("plan.model")) == f"%{macro}_CONFIG"  # `fiat plan` plans this architecture
    if role == "beta":  # the local β's checkpoint, tokenizer and architecture check
      assert str(gin.query_parameter("local_beta.checkpoint_dir")) == "%BETA_CHECKPOINT"
      assert str(gin.query_parameter("beta/vocab.vocabulary.tokenizer_dir")) == "%BETA_CHECKPOINT"
      assert str(gin.query_parameter("local_beta.expected")) == "%BETA_CONFIG"
    else:  # the run's τ (the instruction-tuned or the plain one) and its architecture check
      which = "base" if "non-instruction-tuned" in text else "instruction_tuned"
      assert str(gin.query_parameter(f"tau_model.{which}")) == "%TAU_CHECKPOINT"
      assert str(gin.query_parameter("tau_model.expected")) == "%TAU_CONFIG"
    with gin.config_scope(role):
      return hf.model_config()
  finally:
    gin.clear_config()


def count(cfg: model_lib.Config) -> int:
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def count_by_layers(cfg: model_lib.Config) -> int:
  """The count of the full model from abstract 1- and 2-layer inits (every layer has the same shapes): tracing
  an 80-layer init would cost seconds per model for the same number."""
  one, two = (count(dataclasses.replace(cfg, num_layers=n)) for n in (1, 2))
  return one + (cfg.num_layers - 1) * (two - one)


def test_layer_extrapolation_equals_full_eval_shape():
  cfg = load_model_file("gemma-3-1b-it", "tau")
  assert count(cfg) == count_by_layers(cfg) == PUBLISHED["gemma-3-1b-it"][1]


@pytest.mark.parametrize("name,role", [(n, r) for r, names in ROLES.items() for n in names])
def test_parameter_count_equals_published(name, role):
  cfg = load_model_file(name, role)
  assert count_by_layers(cfg) == PUBLISHED[name][1]
  assert cfg.param_dtype == "bfloat16"
  assert set(hf.tensor_map(cfg)) >= {"model.embed_tokens.weight", f"model.layers.{cfg.num_layers - 1}.mlp.down_proj.weight"}


def test_family_features_of_the_published_configs():
  g2, g3 = load_model_file("gemma-2-2b-it", "tau"), load_model_file("gemma-3-1b-it", "tau")
  assert (g2.attention_pattern, g2.sliding_window, g2.final_logit_softcap) == (("local", "global"), 4096, 30.0)
  assert g3.attention_pattern == ("local",) * 5 + ("global",) and (g3.rope_theta, g3.rope_local_theta) == (1e6, 1e4)
  llama = load_model_file("llama-3.1-70b-instruct", "beta")
  assert dict(llama.rope_scaling) == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position": 8192.0}
  qwen = load_model_file("qwen2.5-1.5b-instruct", "tau")
  assert qwen.qkv_bias and qwen.tie_embeddings and qwen.attention_pattern == ("global",)
