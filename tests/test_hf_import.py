"""Hugging Face import: tiny random transformers models per family, saved with save_pretrained and loaded by
hf.load, give the same logits (padded batches) and the same 20 greedy tokens."""
import json
import os

import jax
import numpy as np
import pytest

from fiat_jax.model import decoding
from fiat_jax.model import hf
from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_tiny import COMMON, FAMILIES, VOCAB, hf_logits, make_hf_model, our_logits, padded_batch  # noqa: E402


def hf_greedy(model, prompts, new_tokens):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
  return out[:, width:].numpy().tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_match_transformers(family, tmp_path):
  model = make_hf_model(family)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load(str(tmp_path), dtype="float32")

  tokens, mask = padded_batch()
  ours, theirs = our_logits(cfg, {"params": params}, tokens, mask), hf_logits(model, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours[real] - theirs[real]).max() < 1e-4
  assert np.abs(theirs[real]).max() > 0.5  # the comparison is not between two near-zero arrays

  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 12, 3)]
  ours_gen = decoding.generate(model_lib.Transformer(cfg), {"params": params}, prompts, max_new_tokens=20,
                               eos_id=None, batch_size=3).tokens
  assert ours_gen == hf_greedy(model, prompts, 20)
  assert all(len(t) == 20 for t in ours_gen)


def test_config_features_per_family(tmp_path):
  """The features each family was built with arrive in model.Config."""
  cfgs = {}
  for family in FAMILIES:
    make_hf_model(family).config.save_pretrained(tmp_path / family)
    cfgs[family] = hf.model_config(str(tmp_path / family))
  assert dict(cfgs["llama"].rope_scaling)["type"] == "llama3" and cfgs["llama"].tie_embeddings
  assert cfgs["llama"].rope_theta == 500_000.0 and cfgs["llama"].num_kv_heads == 2
  assert cfgs["mistral"].attention_pattern == ("local",) and cfgs["mistral"].sliding_window == 5
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].sliding_window is None
  assert cfgs["gemma"].num_kv_heads == 1 and cfgs["gemma"].norm_plus_one and cfgs["gemma"].scale_embeddings
  g2 = cfgs["gemma2"]
  assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (5.0, 3.0, 16.0)
  assert g2.attention_pattern == ("local", "global") and g2.post_attn_norm and g2.post_mlp_norm
  g3 = cfgs["gemma3"]
  assert g3.qk_norm and g3.attention_pattern == ("local", "global")
  assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling) == (100_000.0, 1_000.0, (("type", "linear"),
                                                                                        ("factor", 4.0)))


def test_old_style_config_json_reads_the_same():
  """config.json files on the Hub predate transformers 5 (rope_theta, rope_scaling, sliding_window_pattern)."""
  old = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 1152,
         "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
         "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None, "sliding_window": 512,
         "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None}
  cfg = hf.config_from_hf(old)
  assert cfg.attention_pattern == ("local",) * 5 + ("global",)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling, cfg.sliding_window) == (1e6, 1e4, None, 512)
  new = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "architectures"})
  new_dict = dict(new.to_dict(), architectures=["Gemma3ForCausalLM"])
  assert hf.config_from_hf(new_dict) == cfg
  llama_old = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
               "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "rope_theta": 500000.0, "tie_word_embeddings": True,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
  cfg = hf.config_from_hf(llama_old)
  assert cfg.head_dim == 64 and dict(cfg.rope_scaling)["factor"] == 32.0 and cfg.attention_pattern == ("global",)


def test_sharded_checkpoint_loads_into_mesh_shardings(tmp_path):
  """A multi-file save (model.safetensors.index.json) loads into the mesh's NamedShardings, bf16 on request."""
  model = make_hf_model("qwen2", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 3
  mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
  cfg, params = hf.load(str(tmp_path), mesh=mesh, dtype="float32")
  q = params["layer_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 16)
  np.testing.assert_array_equal(np.asarray(q), model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T)
  tokens, mask = padded_batch(seed=2)
  ours = our_logits(cfg, {"params": params}, tokens, mask)
  assert np.abs(ours - hf_logits(model, tokens, mask))[mask.astype(bool)].max() < 1e-4

  cfg16, params16 = hf.load(str(tmp_path), dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16" and params16["embedder"]["embedding"].dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(np.asarray(params16["layer_1"]["mlp"]["down"]["kernel"], np.float32),
                             np.asarray(params["layer_1"]["mlp"]["down"]["kernel"]), rtol=1e-2, atol=1e-3)


def _write_config(path, **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields, f)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'architectures' is \['PhiForCausalLM'\].*LlamaForCausalLM.*Gemma3ForCausalLM"):
    hf.config_from_hf({"architectures": ["PhiForCausalLM"], "vocab_size": 8})
  with pytest.raises(ValueError, match="required field 'hidden_size' is missing"):
    hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 1, "intermediate_size": 4})
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    hf.config_from_hf(dict(COMMON, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn",
                                                                                     "factor": 2.0}))
  with pytest.raises(ValueError, match="'mlp_bias'=true is not supported"):
    hf.config_from_hf(dict(COMMON, architectures=["LlamaForCausalLM"], mlp_bias=True))

  model = make_hf_model("llama")
  model.save_pretrained(tmp_path / "ok")
  pickled = tmp_path / "pickled"
  _write_config(pickled, **json.loads((tmp_path / "ok" / "config.json").read_text()))
  (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(ValueError, match="only pickle weights \\(pytorch_model.bin\\); safetensors only"):
    hf.load(str(pickled))

  tensors = hf.read_safetensors(str(tmp_path / "ok" / "model.safetensors"))
  short = dict(tensors)
  short.pop("model.layers.1.mlp.up_proj.weight")
  broken = tmp_path / "missing"
  _write_config(broken, **json.loads((tmp_path / "ok" / "config.json").read_text()))
  hf.write_safetensors(str(broken / "model.safetensors"), short)
  with pytest.raises(ValueError, match="1 tensors missing, e.g. model.layers.1.mlp.up_proj.weight"):
    hf.load(str(broken))
  short["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 31), np.float32)
  hf.write_safetensors(str(broken / "model.safetensors"), short)
  with pytest.raises(ValueError, match=r"up_proj.weight has shape \(64, 31\); config.json implies \(64, 32\)"):
    hf.load(str(broken))
  short["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
  short["model.layers.1.mlp.extra.weight"] = np.zeros((2,), np.float32)
  hf.write_safetensors(str(broken / "model.safetensors"), short)
  with pytest.raises(ValueError, match="unexpected tensor model.layers.1.mlp.extra.weight for LlamaForCausalLM"):
    hf.load(str(broken))
  other = hf.model_config(str(tmp_path / "ok"))
  with pytest.raises(ValueError, match="num_layers: checkpoint 2 vs configured 4"):
    hf.load(str(tmp_path / "ok"), expected=model_lib.Config(**{**other.__dict__, "num_layers": 4}))
