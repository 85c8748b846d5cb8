"""Hugging Face checkpoints in: config.json -> model.Config, safetensors -> params loaded one file at a time straight
into their mesh shardings (Llama, Mistral, Qwen2, Gemma 1/2/3 text). Export lives in hf_export.py."""
import dataclasses
import json
import os

import flax.linen as nn
import gin
import jax
import ml_dtypes
import numpy as np

from fiat_jax.model import sharding as sharding_lib
from fiat_jax.model import stacking
from fiat_jax.model import transformer as model_lib

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
             "Gemma3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_GEMMA = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}
_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# safetensors dtype names <-> numpy (bfloat16 / float8 through ml_dtypes, as jax uses them).
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# Tensors some checkpoints carry that are recomputed here, never weights.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
# Fields of model.Config that describe the architecture (the rest is how it is run).
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(model_lib.Config)
                    if f.name not in ("dtype", "param_dtype", "remat_policy", "scan_layers", "lora", "kernels"))


# ---- config.json -> Config -------------------------------------------------------------------------------------

def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def architecture(hf: dict, where: str = "config.json") -> str:
  """The single supported `architectures` entry (else the one `model_type` names), or an error listing the
  supported ones."""
  archs = hf.get("architectures") or ([_MODEL_TYPES[hf["model_type"]]] if hf.get("model_type") in _MODEL_TYPES else [])
  if len(archs) != 1 or archs[0] not in SUPPORTED:
    raise ValueError(f"{where}: field 'architectures' is {archs!r}; supported (text decoders, one per "
                     f"checkpoint): {', '.join(SUPPORTED)}")
  return archs[0]


def _rope_spec(params: dict | None, where: str, field: str):
  """(theta or None, scaling tuple or None) from one rope dict, old (`type`) or new (`rope_type`) style."""
  if not params:
    return None, None
  kind = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, (("type", "linear"), ("factor", float(params["factor"])))
  if kind == "llama3":
    return theta, (("type", "llama3"), ("factor", float(params["factor"])),
                   ("low_freq_factor", float(params["low_freq_factor"])),
                   ("high_freq_factor", float(params["high_freq_factor"])),
                   ("original_max_position", float(params["original_max_position_embeddings"])))
  raise ValueError(f"{where}: {field} rope type {kind!r} is not supported (default, linear, llama3)")


def _rope(hf: dict, arch: str, where: str):
  """(theta, local theta, scaling): reads transformers 5's `rope_parameters` and the older `rope_theta` /
  `rope_scaling` / `rope_local_base_freq` fields."""
  default_theta = 1_000_000.0 if arch == "Gemma3ForCausalLM" else 10_000.0
  rp = hf.get("rope_parameters")
  local_theta = None
  if isinstance(rp, dict) and "full_attention" in rp:  # per layer type (Gemma 3)
    theta, scaling = _rope_spec(rp["full_attention"], where, "rope_parameters.full_attention")
    local_theta, local_scaling = _rope_spec(rp.get("sliding_attention"), where, "rope_parameters.sliding_attention")
    if local_scaling:
      raise ValueError(f"{where}: rope scaling on sliding-window layers is not supported")
  elif isinstance(rp, dict):
    theta, scaling = _rope_spec(rp, where, "rope_parameters")
  else:
    theta, scaling = _rope_spec(hf.get("rope_scaling"), where, "rope_scaling")
  theta = theta or hf.get("rope_theta") or default_theta
  if arch == "Gemma3ForCausalLM":
    local_theta = local_theta or hf.get("rope_local_base_freq") or 10_000.0
  return float(theta), (float(local_theta) if local_theta else None), scaling


def _window(hf: dict, arch: str) -> int | None:
  """The sliding window, with transformers' default (4096) for the families that have one when the field is absent."""
  has = arch in ("MistralForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
  return hf.get("sliding_window", 4096) if has else None


def _layer_types(hf: dict, arch: str, n: int) -> list[str]:
  """'local' / 'global' per layer, following each family's transformers defaults when `layer_types` is absent."""
  window = _window(hf, arch)
  if arch == "MistralForCausalLM":  # one window for every layer (none in v0.2+)
    return ["local" if window else "global"] * n
  if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
    return ["global"] * n
  types = hf.get("layer_types")
  if types is None:
    if arch == "Gemma2ForCausalLM":
      types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif arch == "Gemma3ForCausalLM":
      every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    elif arch == "Qwen2ForCausalLM":
      types = ["sliding_attention" if window and i >= hf.get("max_window_layers", 28) else "full_attention"
               for i in range(n)]
    else:
      types = ["full_attention"] * n
  return ["local" if t == "sliding_attention" and window else "global" for t in types]


def _pattern(kinds: list[str]) -> tuple[str, ...]:
  """The shortest cycle that reproduces the per-layer kinds (model.Config cycles attention_pattern)."""
  for p in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
      return tuple(kinds[:p])
  return ("global",)


def config_from_hf(hf: dict, dtype: str = "float32", where: str = "config.json") -> model_lib.Config:
  """A transformers config.json (dict) -> model.Config; an error names any field this model cannot express."""
  arch = architecture(hf, where)
  gemma = _GEMMA.get(arch, 0)

  def need(field):
    if hf.get(field) is None:
      raise ValueError(f"{where}: required field {field!r} is missing")
    return hf[field]

  for field in ("mlp_bias", "attention_bias", "use_bidirectional_attention"):
    if hf.get(field) and not (field == "attention_bias" and arch == "Qwen2ForCausalLM"):
      raise ValueError(f"{where}: field {field!r}=true is not supported for {arch}")
  n_layers, heads = int(need("num_hidden_layers")), int(need("num_attention_heads"))
  act_field = "hidden_activation" if gemma in (2, 3) else "hidden_act"
  act_name = hf.get(act_field) or ("gelu_pytorch_tanh" if gemma else "silu")
  if act_name not in _ACT:
    raise ValueError(f"{where}: field {act_field!r}={act_name!r} is not supported ({', '.join(_ACT)})")
  act = "gelu_tanh" if gemma == 1 and act_name == "gelu" else _ACT[act_name]  # Gemma 1's "gelu" means tanh
  theta, local_theta, scaling = _rope(hf, arch, where)
  kinds = _layer_types(hf, arch, n_layers)
  if len(kinds) != n_layers:
    raise ValueError(f"{where}: field 'layer_types' has {len(kinds)} entries for {n_layers} layers")
  softcap = lambda f: float(hf[f]) if gemma == 2 and hf.get(f) else None
  return model_lib.Config(
      vocab_size=int(need("vocab_size")), num_layers=n_layers, embed_dim=int(need("hidden_size")),
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or need("hidden_size") // heads), mlp_dim=int(need("intermediate_size")),
      activation=act, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_plus_one=bool(gemma),
      qkv_bias=arch == "Qwen2ForCausalLM", rope_theta=theta, rope_local_theta=local_theta, rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", bool(gemma))), scale_embeddings=bool(gemma),
      attn_logit_softcap=softcap("attn_logit_softcapping"), final_logit_softcap=softcap("final_logit_softcapping"),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma in (2, 3) else None,
      qk_norm=gemma == 3, attention_pattern=_pattern(kinds),
      sliding_window=int(_window(hf, arch)) if "local" in kinds else None,
      post_attn_norm=gemma in (2, 3), post_mlp_norm=gemma in (2, 3), dtype=dtype, param_dtype=dtype)


def checkpoint_dtype(hf: dict) -> str:
  return {"bfloat16": "bfloat16", "float16": "float16"}.get(hf.get("dtype") or hf.get("torch_dtype"), "float32")


@gin.configurable
def model_config(name_or_dir: str | None = None, hf_config: dict | None = None, dtype: str = "float32"):
  """The architecture without loading weights (eval_shape, planning): from the published config.json fields bound
  in a gin_configs/models/*.gin file, or from a checkpoint directory's config.json."""
  if hf_config is not None:
    return config_from_hf(dict(hf_config), dtype, where=f"gin hf_config of {name_or_dir or 'model'}")
  if name_or_dir is None:
    raise ValueError("hf.model_config: give a checkpoint directory or bind hf_config in a model gin file")
  path = os.path.join(name_or_dir, "config.json")
  return config_from_hf(read_json(path), dtype, where=path)


def check_same_architecture(cfg: model_lib.Config, expected: model_lib.Config, where: str):
  """Raises naming every architecture field where the checkpoint differs from what the run configured."""
  diff = [f"{f}: checkpoint {getattr(cfg, f)!r} vs configured {getattr(expected, f)!r}" for f in ARCH_FIELDS
          if getattr(cfg, f) != getattr(expected, f)]
  if diff:
    raise ValueError(f"{where} is not the configured model: " + "; ".join(diff))


# ---- tensor names ----------------------------------------------------------------------------------------------

def tensor_map(cfg: model_lib.Config) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (path in our params tree, whether the HF tensor is the transpose of ours)."""
  m = {"model.embed_tokens.weight": (("embedder", "embedding"), False),
       "model.norm.weight": (("final_norm", "scale"), False)}
  if not cfg.tie_embeddings:
    m["lm_head.weight"] = (("embedder", "unembed"), True)
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", f"layer_{i}"
    m[hf + "input_layernorm.weight"] = ((ours, "pre_attn_norm", "scale"), False)
    if cfg.post_attn_norm:  # Gemma 2/3 naming: four norms per layer
      m[hf + "post_attention_layernorm.weight"] = ((ours, "post_attn_norm", "scale"), False)
      m[hf + "pre_feedforward_layernorm.weight"] = ((ours, "pre_mlp_norm", "scale"), False)
    else:
      m[hf + "post_attention_layernorm.weight"] = ((ours, "pre_mlp_norm", "scale"), False)
    if cfg.post_mlp_norm:
      m[hf + "post_feedforward_layernorm.weight"] = ((ours, "post_mlp_norm", "scale"), False)
    for x in "qkvo":
      m[hf + f"self_attn.{x}_proj.weight"] = ((ours, "attn", x, "kernel"), True)
      if cfg.qkv_bias and x != "o":
        m[hf + f"self_attn.{x}_proj.bias"] = ((ours, "attn", x, "bias"), False)
    if cfg.qk_norm:
      for x in "qk":
        m[hf + f"self_attn.{x}_norm.weight"] = ((ours, "attn", f"{x}_norm", "scale"), False)
    for x in ("gate", "up", "down") if cfg.gated_mlp else ("up", "down"):
      m[hf + f"mlp.{x}_proj.weight"] = ((ours, "mlp", x, "kernel"), True)
  return m


def hf_module(path: tuple[str, ...]) -> str:
  """Our module path (e.g. ('layer_3', 'attn', 'q')) -> the HF module name (model.layers.3.self_attn.q_proj)."""
  layer, block, name = path
  return f"model.layers.{layer.removeprefix('layer_')}.{'self_attn' if block == 'attn' else 'mlp'}.{name}_proj"


# ---- safetensors (read through a memory map: a process touches only the bytes of its own shards) -------------

def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> read-only memory-mapped array for every tensor of one .safetensors file."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(head, "little")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{path}: not a safetensors file (unreadable JSON header)") from None
  header.pop("__metadata__", None)
  size = os.path.getsize(path)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype, shape = np.dtype(ST_DTYPES[info["dtype"]]), tuple(info["shape"])
    if end - start != dtype.itemsize * int(np.prod(shape)) or 8 + n + end > size:
      raise ValueError(f"{path}: tensor {name}: data_offsets {start}..{end} do not fit shape {shape} {info['dtype']}")
    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes numpy arrays (bfloat16 included) as one .safetensors file (header padded to 8 bytes)."""
  names = {np.dtype(v): k for k, v in ST_DTYPES.items()}
  header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  for name, arr in arrays.items():
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.tobytes())


def weight_files(checkpoint_dir: str) -> dict[str, list[str]]:
  """file -> tensor names, from model.safetensors.index.json or the single model.safetensors."""
  index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: field 'weight_map' is missing")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(os.path.join(checkpoint_dir, file), []).append(name)
    return files
  single = os.path.join(checkpoint_dir, "model.safetensors")
  if os.path.exists(single):
    return {single: None}
  pickled = [f for f in sorted(os.listdir(checkpoint_dir)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickled:
    raise ValueError(f"{checkpoint_dir}: only pickle weights ({', '.join(pickled)}); safetensors only, pickle is "
                     "never loaded. Convert once, e.g. transformers' save_pretrained(..., safe_serialization=True)")
  raise FileNotFoundError(f"{checkpoint_dir}: neither model.safetensors nor model.safetensors.index.json")


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _place(arr: np.ndarray, transpose: bool, dtype, sharding):
  """One jax.Array built shard by shard from a memory-mapped tensor (dtype conversion per shard)."""
  view = arr.T if transpose else arr
  return jax.make_array_from_callback(view.shape, sharding, lambda idx: np.asarray(view[idx], dtype=dtype))


def _place_stacked(views: list, transpose: bool, dtype, sharding):
  """One [layers, ...] jax.Array from the layers' memory-mapped tensors, built shard by shard."""
  views = [v.T if transpose else v for v in views]
  shape = (len(views), *views[0].shape)
  return jax.make_array_from_callback(
      shape, sharding, lambda idx: np.stack([np.asarray(views[i][idx[1:]], dtype=dtype)
                                             for i in range(len(views))[idx[0]]]))


def load(checkpoint_dir: str, mesh=None, dtype: str | None = None, rules=None, expected=None,
         scan_layers: bool = False):
  """(cfg, params) from a Hugging Face checkpoint directory; params are read through memory maps straight into
  their shardings on `mesh` (the first device when None) and converted to `dtype` (default: the checkpoint's).
  `expected` (a Config, e.g. from the model's gin file) is checked against config.json. `scan_layers`: the
  scanned layout (Config.scan_layers), each layer's tensors stacked into their [layers, ...] shards."""
  config_path = os.path.join(checkpoint_dir, "config.json")
  hf = read_json(config_path)
  cfg = dataclasses.replace(config_from_hf(hf, dtype or checkpoint_dtype(hf), where=config_path),
                            scan_layers=scan_layers)
  if expected is not None:
    check_same_architecture(cfg, expected, checkpoint_dir)
  names = tensor_map(cfg)
  if mesh is not None:
    shardings = sharding_lib.param_shardings(cfg, mesh, rules)
    sharding_of = lambda path: _get(shardings, path)
  else:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding_of = lambda path: single
  np_dtype = np.dtype(ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else cfg.param_dtype)
  unrolled = dataclasses.replace(cfg, scan_layers=False)  # HF names each layer's tensors: check them per layer
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(unrolled, jax.random.PRNGKey(0))))
  found, seen = {}, set()  # our (unrolled) path -> (memory-mapped tensor, transposed)
  for file, listed in sorted(weight_files(checkpoint_dir).items()):
    tensors = read_safetensors(file)
    for name in listed or sorted(tensors):
      if name not in tensors:
        raise ValueError(f"{file}: tensor {name} is listed in model.safetensors.index.json but not in the file")
      if name not in names:
        if name.endswith(_DERIVED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
          continue  # recomputed (rotary tables) or tied to the embedding
        raise ValueError(f"{file}: unexpected tensor {name} for {architecture(hf)} with this config.json")
      path, transpose = names[name]
      want = tuple(_get(shapes, path).shape)
      got = tensors[name].shape[::-1] if transpose else tensors[name].shape
      if tuple(got) != want:
        raise ValueError(f"{file}: tensor {name} has shape {tensors[name].shape}; config.json implies "
                         f"{want[::-1] if transpose else want}")
      found[path] = (tensors[name], transpose)
      seen.add(name)
  missing = sorted(set(names) - seen)
  if missing:
    raise ValueError(f"{checkpoint_dir}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}")
  params = {}
  for path, (tensor, transpose) in found.items():
    if not path[0].startswith("layer_"):
      _set(params, path, _place(tensor, transpose, np_dtype, sharding_of(path)))
    elif not cfg.scan_layers:
      _set(params, path, _place(tensor, transpose, np_dtype, sharding_of(path)))
    elif path[0] == "layer_0":
      stacked = (stacking.SCANNED, *path[1:])
      views = [found[(f"layer_{i}", *path[1:])][0] for i in range(cfg.num_layers)]
      _set(params, stacked, _place_stacked(views, transpose, np_dtype, sharding_of(stacked)))
  return cfg, params
