"""Export for other stacks: θ'_τ = θ_τ ⊕ θ_PEFT as a Hugging Face checkpoint (config.json + safetensors), and θ_PEFT
alone in PEFT's adapter layout (adapter_config.json + adapter_model.safetensors) for the unchanged base."""
import json
import math
import os
import shutil

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from fiat_jax import hf
from fiat_jax import lora as lora_lib
from fiat_jax import model as model_lib

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


def _column_norm(w: np.ndarray, axis: int) -> np.ndarray:
  return np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=axis))


def peft_tensors(cfg: model_lib.Config, params, collections) -> tuple[dict, int, float]:
  """(PEFT state dict, rank, lora_alpha). PiSSA's s(AB - A0B0) on the original base is the rank-2R adapter
  [A, A0][B; -B0] (alpha doubled, or times sqrt 2 for rsLoRA, keeping the scale); DoRA's magnitudes are exported
  as they are, and embed / unembed targets (plain LoRA here) get the magnitude that makes PEFT's DoRA factor 1."""
  lcfg: lora_lib.LoraConfig = cfg.lora
  lora, init = _host_tree(collections["lora"]), _host_tree(collections.get("lora_init", {}))
  pissa = lcfg.variant == "pissa"
  rank = 2 * lcfg.rank if pissa else lcfg.rank
  alpha = lcfg.alpha * (math.sqrt(2) if lcfg.rslora else 2) if pissa else lcfg.alpha
  pad = lambda a, axis: np.concatenate([a, np.zeros_like(a)], axis=axis) if pissa else a
  out, prefix = {}, "base_model.model."
  for i in range(cfg.num_layers):
    for block, targets in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for t in targets:
        node = lora.get(f"layer_{i}", {}).get(block, {}).get(t)
        if node is None:
          continue
        a, b = node["a"], node["b"]
        if pissa:
          a0, b0 = init[f"layer_{i}"][block][t]["a"], init[f"layer_{i}"][block][t]["b"]
          a, b = np.concatenate([a, a0], axis=1), np.concatenate([b, -b0], axis=0)
        name = prefix + hf.hf_module((f"layer_{i}", block, t))
        out[name + ".lora_A.weight"], out[name + ".lora_B.weight"] = a.T, b.T
        if lcfg.variant == "dora":
          out[name + ".lora_magnitude_vector"] = node["m"]
  emb = lora.get("embedder", {})
  base_emb = _host(params["embedder"]["embedding"]).astype(np.float32)
  if "embed_a" in emb:
    a, b = pad(emb["embed_a"], 1), pad(emb["embed_b"], 0)
    out[prefix + "model.embed_tokens.lora_embedding_A"], out[prefix + "model.embed_tokens.lora_embedding_B"] = a.T, b.T
    if lcfg.variant == "dora":  # PEFT scales each embedding dimension by m / ||W + s dW|| over the vocab
      out[prefix + "model.embed_tokens.lora_magnitude_vector"] = _column_norm(
          base_emb + lcfg.scale * emb["embed_a"] @ emb["embed_b"], 0)
  if "unembed_a" in emb:
    a, b = pad(emb["unembed_a"], 1), pad(emb["unembed_b"], 0)
    out[prefix + "lm_head.lora_A.weight"], out[prefix + "lm_head.lora_B.weight"] = a.T, b.T
    if lcfg.variant == "dora":
      w_dv = base_emb.T if cfg.tie_embeddings else _host(params["embedder"]["unembed"]).astype(np.float32)
      out[prefix + "lm_head.lora_magnitude_vector"] = _column_norm(
          w_dv + lcfg.scale * emb["unembed_a"] @ emb["unembed_b"], 0)
  return out, rank, alpha


def _host_tree(tree):
  return jax.tree_util.tree_map(lambda x: _host(x).astype(np.float32), tree)


def save_peft(out_dir: str, cfg: model_lib.Config, params, collections, base_model_name_or_path: str | None = None,
              dtype: str = "float32") -> dict:
  """θ_PEFT alone as a PEFT LoRA adapter (peft.PeftModel.from_pretrained(base, out_dir)); returns its config."""
  lcfg: lora_lib.LoraConfig = cfg.lora
  if lcfg is None:
    raise ValueError("export: the model config has no LoRA (cfg.lora is None); nothing to save as an adapter")
  tensors, rank, alpha = peft_tensors(cfg, params, collections)
  adapter_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                 "r": rank, "lora_alpha": alpha, "lora_dropout": lcfg.dropout, "use_rslora": lcfg.rslora,
                 "use_dora": lcfg.variant == "dora", "target_modules": sorted(_PEFT_NAMES[t] for t in lcfg.targets),
                 "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                 "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    hf.write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                         {k: v.astype(_np_dtype(dtype)) for k, v in tensors.items()})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
      json.dump(adapter_cfg, f, indent=2, sort_keys=True)
  return adapter_cfg
