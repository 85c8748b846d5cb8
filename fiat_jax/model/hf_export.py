"""Export for other stacks: θ'_τ = θ_τ ⊕ θ_PEFT as a Hugging Face checkpoint (config.json + safetensors), and θ_PEFT
alone in PEFT's adapter layout (adapter_config.json + adapter_model.safetensors; the variant's lora.VARIANTS entry
maps its tensors) for the unchanged base."""
import json
import math
import os
import shutil

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from fiat_jax.model import hf
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import stacking
from fiat_jax.model import transformer as model_lib

_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
_ACT_NAME = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
# Files a checkpoint directory carries besides the weights; copied from the base so the export is usable as is.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
_OLD_ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern",
                    "_sliding_window_pattern")
_PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj", "embed": "embed_tokens", "unembed": "lm_head"}


def _rope_params(theta: float, scaling) -> dict:
  out = {"rope_type": "default", "rope_theta": theta}
  if scaling:
    s = dict(scaling)
    out["rope_type"] = s.pop("type")
    if "original_max_position" in s:
      s["original_max_position_embeddings"] = int(s.pop("original_max_position"))
    out.update(s)
  return out


def _int_if_whole(x):
  return int(x) if x is not None and float(x).is_integer() else x


def config_to_hf(cfg: model_lib.Config, arch: str, base: dict | None = None) -> dict:
  """model.Config -> a transformers 5 config.json dict for `arch` (fields of `base` kept where not architectural);
  raises when the config has a feature the architecture cannot express."""
  if arch not in _MODEL_TYPE:
    raise ValueError(f"export: architecture {arch!r} is not supported; supported: {', '.join(hf.SUPPORTED)}")
  out = {k: v for k, v in (base or {}).items() if k not in _OLD_ROPE_FIELDS}
  kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
  types = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
  out.update(architectures=[arch], model_type=_MODEL_TYPE[arch], vocab_size=cfg.vocab_size,
             hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
             rope_parameters=_rope_params(cfg.rope_theta, cfg.rope_scaling))
  out["hidden_activation" if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM") else "hidden_act"] = (
      _ACT_NAME[cfg.activation])
  if arch in ("LlamaForCausalLM", "GemmaForCausalLM"):
    out.update(attention_bias=False)
  if arch == "LlamaForCausalLM":
    out.update(mlp_bias=False)
  if arch == "MistralForCausalLM":
    out.update(sliding_window=cfg.sliding_window if "local" in kinds else None)
  if arch == "Qwen2ForCausalLM":
    out.update(use_sliding_window="local" in kinds, sliding_window=cfg.sliding_window, layer_types=types,
               max_window_layers=kinds.index("local") if "local" in kinds else cfg.num_layers)
  if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    out.update(layer_types=types, sliding_window=cfg.sliding_window, query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
               attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap)
  if arch == "Gemma3ForCausalLM":
    out["rope_parameters"] = {"full_attention": out["rope_parameters"],
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
  back = hf.config_from_hf(out, cfg.dtype, where=f"export as {arch}")
  diff = [f for f in hf.ARCH_FIELDS if getattr(back, f) != getattr(cfg, f)]
  if diff:
    raise ValueError(f"export: the model cannot be expressed as {arch}: fields {', '.join(diff)} differ "
                     f"({', '.join(f'{f}={getattr(cfg, f)!r}' for f in diff)})")
  return out


def _host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as one numpy array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _np_dtype(name: str):
  return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def save_checkpoint(out_dir: str, cfg: model_lib.Config, params, arch: str, base_dir: str | None = None,
                    dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
  """Writes config.json and the weights (model.safetensors, or shards + model.safetensors.index.json above
  `max_shard_bytes`) that transformers' from_pretrained loads; returns the config dict. Multi-host: every process
  calls it (the gathers are collective), process 0 writes."""
  base = hf.read_json(os.path.join(base_dir, "config.json")) if base_dir else None
  dtype = dtype or cfg.param_dtype
  params = stacking.unstack(params)  # HF names every layer's tensors
  hf_cfg = config_to_hf(cfg, arch, base)
  hf_cfg["dtype"] = dtype
  names = hf.tensor_map(cfg)
  itemsize = _np_dtype(dtype).itemsize
  shards, size = [[]], 0
  for name, (path, _) in names.items():
    nbytes = itemsize * math.prod(hf._get(params, path).shape)
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for name in shard:
      path, transpose = names[name]
      arr = _host(hf._get(params, path))
      tensors[name] = (arr.T if transpose else arr).astype(_np_dtype(dtype))
      weight_map[name] = file
      total += tensors[name].nbytes
    if writer:
      hf.write_safetensors(os.path.join(out_dir, file), tensors)
  if writer:
    if len(shards) > 1:
      with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    for name in TOKENIZER_FILES if base_dir else ():
      if os.path.exists(os.path.join(base_dir, name)):
        shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))
  return hf_cfg


def save_merged(out_dir: str, cfg: model_lib.Config, params, collections, arch: str, base_dir: str | None = None,
                dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
  """θ'_τ = θ_τ ⊕ θ_PEFT (lora.merge) written as a Hugging Face checkpoint."""
  merged, merged_cfg = lora_lib.merge(cfg, params, collections)
  return save_checkpoint(out_dir, merged_cfg, merged, arch, base_dir, dtype, max_shard_bytes)


def peft_tensors(cfg: model_lib.Config, params, collections) -> tuple[dict, dict]:
  """(PEFT state dict, the adapter_config fields of the variant's layout): every target's tensors as its
  lora.VARIANTS entry maps them; raises for a variant without a PEFT layout."""
  lcfg: lora_lib.LoraConfig = cfg.lora
  layout = lora_lib.variant(lcfg).peft
  if layout is None:
    raise ValueError(f"export: the LoRA variant {lcfg.variant!r} has no Hugging Face PEFT adapter layout "
                     f"(lora.VARIANTS[{lcfg.variant!r}].peft is None); export the merged checkpoint instead")
  params, collections = stacking.unstack(params), stacking.unstack(collections)  # PEFT names every layer's
  lora, init = _host_tree(collections[lora_lib.TRAINABLE]), _host_tree(collections.get(lora_lib.FROZEN, {}))
  out, prefix, frozen = {}, "base_model.model.", []

  def put(module, tensors):
    out.update({f"{prefix}{module}.{name}": x for name, x in tensors.items()})

  for i in range(cfg.num_layers):
    for block, targets in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for t in targets:
        node = lora.get(f"layer_{i}", {}).get(block, {}).get(t)
        if node is None:
          continue
        f = init.get(f"layer_{i}", {}).get(block, {}).get(t, {})
        frozen.append(f)
        put(hf.hf_module((f"layer_{i}", block, t)), layout.module(lcfg, "dense", node, f, None))
  emb = lora.get("embedder", {})
  if emb:
    base_emb = _host(params["embedder"]["embedding"]).astype(np.float32)
  if "embed_a" in emb:
    put("model.embed_tokens", layout.module(lcfg, "embed", {"a": emb["embed_a"], "b": emb["embed_b"]}, {}, base_emb))
  if "unembed_a" in emb:
    w_dv = base_emb.T if cfg.tie_embeddings else _host(params["embedder"]["unembed"]).astype(np.float32)
    put("lm_head", layout.module(lcfg, "unembed", {"a": emb["unembed_a"], "b": emb["unembed_b"]}, {}, w_dv))
  out.update({f"base_model.{name}": x for name, x in layout.shared(lcfg, frozen).items()})
  return out, layout.config(lcfg)


def _host_tree(tree):
  return jax.tree_util.tree_map(lambda x: _host(x).astype(np.float32), tree)


def save_peft(out_dir: str, cfg: model_lib.Config, params, collections, base_model_name_or_path: str | None = None,
              dtype: str = "float32") -> dict:
  """θ_PEFT alone as a PEFT adapter (peft.PeftModel.from_pretrained(base, out_dir)) in its variant's layout;
  returns its config."""
  lcfg: lora_lib.LoraConfig = cfg.lora
  if lcfg is None:
    raise ValueError("export: the model config has no LoRA (cfg.lora is None); nothing to save as an adapter")
  tensors, fields = peft_tensors(cfg, params, collections)
  adapter_cfg = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                 "target_modules": sorted(_PEFT_NAMES[t] for t in lcfg.targets), "inference_mode": True, **fields}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    hf.write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                         {k: v.astype(_np_dtype(dtype)) for k, v in tensors.items()})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
      json.dump(adapter_cfg, f, indent=2, sort_keys=True)
  return adapter_cfg
