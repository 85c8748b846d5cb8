"""Export: the merged θ'_τ loads in transformers with our logits; θ_PEFT alone loads in peft onto the base with our
logits (LoRA, rsLoRA, DoRA, PiSSA, VeRA); a variant without a PEFT layout is refused by name."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from fiat_jax.model import hf
from fiat_jax.model import hf_export
from fiat_jax.model import lora as lora_lib
import helpers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_tiny import FAMILIES, hf_logits, make_hf_model, our_logits, padded_batch  # noqa: E402

ALL_TARGETS = lora_lib.DENSE_TARGETS + lora_lib.EMBED_TARGETS


def imported(family, tmp_path):
  """A tiny transformers model saved to tmp_path/base and loaded back: (torch model, dir, cfg, params)."""
  model = make_hf_model(family)
  model.save_pretrained(tmp_path / "base")
  cfg, params = hf.load(str(tmp_path / "base"), dtype="float32")
  return model, str(tmp_path / "base"), cfg, params


def with_trained_lora(cfg, params, scale=0.2, **lora_kw):
  lcfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(rank=4, alpha=8.0, **lora_kw))
  return lcfg, {"params": params, **helpers.perturbed_lora(lcfg, params, scale=scale)}


@pytest.mark.parametrize("family,targets,shard_bytes", [("llama", ALL_TARGETS, 1 << 30),
                                                         ("gemma3", lora_lib.DENSE_TARGETS, 20_000)])
def test_merged_export_loads_in_transformers_with_equal_logits(family, targets, shard_bytes, tmp_path):
  model, base_dir, cfg, params = imported(family, tmp_path)
  lcfg, variables = with_trained_lora(cfg, params, targets=targets)
  tokens, mask = padded_batch(seed=4)
  ours = our_logits(lcfg, variables, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours - hf_logits(model, tokens, mask))[real].max() > 1e-2  # the adapter changes the model

  out = tmp_path / "merged"
  arch = FAMILIES[family][1]
  written = hf_export.save_merged(str(out), lcfg, params, {"lora": variables["lora"]}, arch, base_dir=base_dir,
                                  max_shard_bytes=shard_bytes)
  # Tuning the embeddings unties them: the export has its own lm_head.
  assert written["tie_word_embeddings"] == (family != "llama")
  assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 1 << 30)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                             attn_implementation="eager").eval()
  assert np.abs(hf_logits(loaded, tokens, mask) - ours)[real].max() < 1e-4

  merged, merged_cfg = lora_lib.merge(lcfg, params, {"lora": variables["lora"]})
  back_cfg, back = hf.load(str(out))
  assert back_cfg == merged_cfg
  np.testing.assert_array_equal(np.asarray(back["layer_1"]["mlp"]["down"]["kernel"]),
                                np.asarray(merged["layer_1"]["mlp"]["down"]["kernel"]))


def export_and_load(family, lcfg, variables, params, base_dir, tmp_path):
  """Our adapter (it must change the base's logits) exported in PEFT's layout and loaded by peft onto the
  transformers base: (adapter config, the PEFT model, max |PEFT logits - ours| over real tokens)."""
  tokens, mask = padded_batch(seed=6)
  ours = our_logits(lcfg, variables, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours - hf_logits(make_hf_model(family), tokens, mask))[real].max() > 1e-2
  collections = {k: v for k, v in variables.items() if k != "params"}
  adapter_cfg = hf_export.save_peft(str(tmp_path / "adapter"), lcfg, params, collections, base_dir)
  peft_model = peft.PeftModel.from_pretrained(make_hf_model(family), str(tmp_path / "adapter")).eval()
  return adapter_cfg, peft_model, float(np.abs(hf_logits(peft_model, tokens, mask) - ours)[real].max())


@pytest.mark.parametrize("family,variant,rslora,targets", [
    ("qwen2", "lora", False, lora_lib.DENSE_TARGETS),
    ("llama", "lora", True, ALL_TARGETS),  # tied embeddings: lm_head's adapter on the shared matrix
    ("qwen2", "dora", False, ALL_TARGETS),
    ("gemma2", "pissa", False, ("q", "v", "down")),
])
def test_peft_adapter_loads_onto_base_with_equal_logits(family, variant, rslora, targets, tmp_path):
  _, base_dir, cfg, params = imported(family, tmp_path)
  lcfg, variables = with_trained_lora(cfg, params, targets=targets, variant=variant, rslora=rslora)
  adapter_cfg, peft_model, gap = export_and_load(family, lcfg, variables, params, base_dir, tmp_path)
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved == adapter_cfg and saved["use_rslora"] == rslora and saved["use_dora"] == (variant == "dora")
  assert (saved["r"], saved["lora_alpha"]) == ((8, 16.0) if variant == "pissa" else (4, 8.0))
  assert gap < 1e-4


def test_vera_adapter_loads_into_peft_as_vera_with_equal_logits(tmp_path):
  _, base_dir, cfg, params = imported("qwen2", tmp_path)
  lcfg, variables = with_trained_lora(cfg, params, scale=2.0, targets=("q", "v", "up", "down"), variant="vera")
  saved, peft_model, gap = export_and_load("qwen2", lcfg, variables, params, base_dir, tmp_path)
  assert (saved["peft_type"], saved["r"], saved["save_projection"]) == ("VERA", 4, True)
  assert isinstance(peft_model.peft_config["default"], peft.VeraConfig)
  assert tuple(peft_model.base_model.vera_A["default"].shape) == (4, 64)  # one shared [R, max in] ...
  assert tuple(peft_model.base_model.vera_B["default"].shape) == (64, 4)  # ... and [max out, R]
  assert gap < 1e-4
  lcfg, variables = with_trained_lora(cfg, params, targets=("q", "embed"), variant="vera")
  with pytest.raises(ValueError, match="VeRA adapter in PEFT's layout covers the Dense targets only.*'embed'"):
    hf_export.save_peft(str(tmp_path / "no"), lcfg, params, {"lora": variables["lora"],
                                                              "lora_init": variables["lora_init"]})


def test_adapter_export_refuses_a_variant_without_a_peft_layout_by_name(tmp_path, monkeypatch):
  cfg = hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 8,
                           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
  monkeypatch.setitem(lora_lib.VARIANTS, "lora_fa", dataclasses.replace(lora_lib.LORA, peft=None))
  lcfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(rank=2, variant="lora_fa"))
  params = helpers.tiny_params(lcfg)
  cols = lora_lib.init(lcfg.lora, params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="variant 'lora_fa' has no Hugging Face PEFT adapter layout"):
    hf_export.save_peft(str(tmp_path / "a"), lcfg, params, cols)
  monkeypatch.delitem(lora_lib.VARIANTS, "lora_fa")  # a config whose variant is no longer registered
  with pytest.raises(ValueError, match="LoRA variant 'lora_fa' is not registered in lora.VARIANTS"):
    hf_export.save_peft(str(tmp_path / "a"), lcfg, params, cols)
  assert not (tmp_path / "a").exists()


def test_export_refuses_what_the_architecture_cannot_express():
  cfg = hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 8,
                           "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2})
  with pytest.raises(ValueError, match="cannot be expressed as LlamaForCausalLM: fields qkv_bias differ"):
    hf_export.config_to_hf(dataclasses.replace(cfg, qkv_bias=True), "LlamaForCausalLM")
  with pytest.raises(ValueError, match="cannot be expressed as MistralForCausalLM: fields attention_pattern"):
    hf_export.config_to_hf(dataclasses.replace(cfg, attention_pattern=("local", "global"), sliding_window=4),
                           "MistralForCausalLM")
  with pytest.raises(ValueError, match="architecture 'T5ForConditionalGeneration' is not supported"):
    hf_export.config_to_hf(cfg, "T5ForConditionalGeneration")
  as_qwen = hf_export.config_to_hf(dataclasses.replace(cfg, qkv_bias=True), "Qwen2ForCausalLM")
  assert (as_qwen["model_type"], as_qwen["use_sliding_window"], as_qwen["hidden_act"]) == ("qwen2", False, "silu")
