"""`fiat plan`: bytes per device against sizes computed by hand, the compiled memory analysis, fit verdicts."""
import json

import gin
import pytest

from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import plan
from fiat_jax.training import train

# tiny_config(vocab 256): D=32, 2 layers, H=4, K=2, E=8, F=64, tied embeddings.
#   embedding 256*32 = 8192; per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072, mlp 3*32*64 = 6144,
#   2 norms of 32; final norm 32  ->  8192 + 2*(3072 + 6144 + 64) + 32 = 26784 params.
TINY_PARAMS = 26784
MESH = dict(num_devices=8, data=2, fsdp=2, model_axis=2)


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  """The plan reads gin (TrainConfig, make_mesh): start and end every test with none bound."""
  gin.clear_config()
  yield
  gin.clear_config()


def _tiny(**kw):
  return model_lib.tiny_config(vocab_size=256, **kw)


def test_tiny_sizes_per_device_equal_hand_computed():
  r = plan.plan(model=_tiny(), lora={"rank": 4}, train=train.TrainConfig(batch_size=8), seq_len=16,
                decode_batch=8, decode_len=64, compile=False, **MESH)
  assert r["counts"] == {"params": TINY_PARAMS, "trainable": 4096}
  assert r["global_bytes"]["params"] == 4 * TINY_PARAMS
  s = r["per_device"]
  # Every matrix is split over fsdp (embed) and model (vocab / heads / mlp): 1/4 of it; the 5 norms over fsdp.
  assert s["params"] == 4 * ((8192 + 2 * (3072 + 6144)) // 4 + 5 * 32 // 2) == 26944
  # LoRA rank 4 on q,k,v,o,gate,up,down: per layer 256+192+192+256+3*384 = 2048, two layers = 4096 params;
  # A [in,R] splits its input dim over fsdp, B [R,out] its output dim over model: 1/2 of each.
  assert s["lora"] == 4 * 4096 // 2 == 8192
  # AdamW: mu and nu sharded like LoRA, plus two int32 step counts (Adam's and the schedule's), replicated.
  assert s["optimizer"] == 2 * 8192 + 2 * 4 == 16392
  # 4 int32 features [8, 16], rows over data*fsdp = 4.
  assert s["batch"] == 4 * (8 // 4) * 16 * 4 == 512
  # k and v [B=8, S=64, K=2, E=8] per layer, B over 4, K over model=2; positions, segments [8, 64]; the index.
  assert s["kv_cache"] == 2 * 2 * (2 * 64 * 1 * 8 * 4) + 2 * (2 * 64 * 4) + 4 == 17412
  assert r["train"]["activations"] is None and r["train"]["total"] == 26944 + 8192 + 16392 + 512
  assert r["decode"]["total"] == 26944 + 8192 + 17412
  assert r["train"]["fits"] and r["decode"]["fits"]


def test_full_mode_trains_every_parameter():
  r = plan.plan(model=_tiny(), train=train.TrainConfig(mode="full", batch_size=8), seq_len=16, decode_batch=8,
                decode_len=64, compile=False, **MESH)
  assert r["counts"] == {"params": TINY_PARAMS, "trainable": TINY_PARAMS}
  assert r["per_device"]["lora"] == 0
  assert r["per_device"]["optimizer"] == 2 * 26944 + 8


def test_compiled_memory_analysis_agrees_with_eval_shape():
  # prefix_lm: every batch feature is an input of the step (none is pruned from the arguments).
  r = plan.plan(model=_tiny(prefix_lm=True), lora={"rank": 4}, train=train.TrainConfig(batch_size=8), seq_len=16,
                decode_batch=8, decode_len=64, **MESH)
  s, c = r["per_device"], r["compiled"]
  step_and_rng = 4 + 8  # int32 step, uint32[2] key
  assert c["train"]["argument"] == s["params"] + s["lora"] + s["optimizer"] + s["batch"] + step_and_rng
  assert c["train"]["alias"] == s["lora"] + s["optimizer"] + step_and_rng  # the donated state is updated in place
  assert c["decode"]["argument"] == s["params"] + s["lora"] + s["kv_cache"] + 2 * (8 // 4) * 4
  assert c["decode"]["alias"] == s["kv_cache"]
  assert c["train"]["temp"] > 0 and r["train"]["activations"] == c["train"]["temp"]
  assert r["train"]["total"] == s["params"] + s["lora"] + s["optimizer"] + s["batch"] + c["train"]["temp"]
  assert r["backend"] == "cpu"


def _llama2_7b(**kw):
  return model_lib.Config(vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32,
                          head_dim=128, mlp_dim=11008, tie_embeddings=False, **kw)


def test_llama2_7b_full_finetuning_fits_v5e_only_with_enough_fsdp():
  # 2*32000*4096 + 32*(4*4096^2 + 3*4096*11008 + 2*4096) + 4096 = 6,738,415,616 (Llama-2-7B's count).
  n = 6_738_415_616
  tc = train.TrainConfig(mode="full", batch_size=8)
  eight = plan.plan(model=_llama2_7b(), train=tc, seq_len=512, device="v5e", num_devices=8, data=1, fsdp=8,
                    compile=False)
  assert eight["counts"]["params"] == n
  assert eight["per_device"]["params"] == 4 * n // 8  # every dimension here divides by 8
  assert eight["per_device"]["optimizer"] == 2 * 4 * n // 8 + 8
  assert eight["train"]["total"] == 3 * 4 * n // 8 + 8 + 4 * 8 * 512 * 4 // 8  # 10.1e9 < 16 GiB
  assert eight["train"]["fits"]
  four = plan.plan(model=_llama2_7b(), train=tc, seq_len=512, device="v5e", num_devices=4, data=1, fsdp=4,
                   compile=False)
  assert four["train"]["total"] == 3 * 4 * n // 4 + 8 + 4 * 8 * 512 * 4 // 4  # 20.2e9 > 16 GiB
  assert not four["train"]["fits"]


def test_llama2_7b_bf16_decoding_on_one_h100_counts_the_kv_cache():
  r = plan.plan(model=_llama2_7b(dtype="bfloat16", param_dtype="bfloat16"), lora={"rank": 8},
                train=train.TrainConfig(batch_size=1), decode_batch=8, decode_len=4096, device="h100", num_devices=1,
                compile=False)
  kv = 32 * 2 * 8 * 4096 * 32 * 128 * 2  # layers * (k, v) * B * S * K * E * bf16
  assert r["per_device"]["kv_cache"] == kv + 2 * 8 * 4096 * 4 + 4
  assert r["decode"]["total"] == 2 * 6_738_415_616 + r["per_device"]["lora"] + r["per_device"]["kv_cache"]
  assert r["usable_bytes"] == int(0.75 * 81559 * 2 ** 20)  # JAX preallocates 75% of GPU memory
  assert r["decode"]["fits"]  # 30.6e9 of 64.1e9 usable
  assert round(r["decode"]["fraction"], 3) == round(r["decode"]["total"] / r["usable_bytes"], 3)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="plan.device: 'v9'"):
    plan.plan(model=_tiny(), lora={"rank": 4}, train=train.TrainConfig(), device="v9", compile=False, **MESH)
  with pytest.raises(ValueError, match="TrainConfig.batch_size=6 is not divisible by data\\*fsdp=4"):
    plan.plan(model=_tiny(), lora={"rank": 4}, train=train.TrainConfig(batch_size=6), compile=False, **MESH)
  with pytest.raises(ValueError, match="data\\*fsdp\\*model = 12 but num_devices = 8"):
    plan.plan(model=_tiny(), train=train.TrainConfig(), num_devices=8, data=3, fsdp=2, model_axis=2,
              compile=False)


def test_cli_reads_the_model_gin_file_and_writes_json(tmp_path, capsys):
  gin_file = tmp_path / "tiny_llama.gin"
  gin_file.write_text(
      "plan.model = @model_config()\n"
      "model_config.hf_config = {'architectures': ['LlamaForCausalLM'], 'vocab_size': 256, 'hidden_size': 32,\n"
      "    'intermediate_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,\n"
      "    'tie_word_embeddings': True}\n"
      "TrainConfig.batch_size = 8\n"
      "make_mesh.fsdp = 2\n"
      "make_mesh.model = 2\n")
  out = tmp_path / "plan.json"
  code = plan.main([f"--gin_file={gin_file}", "--gin.plan.num_devices=8", "--gin.plan.seq_len=16",
                    "--gin.plan.decode_len=64", "--gin.plan.compile=False", "--gin.plan.device='v6e'",
                    f"--json={out}"])
  assert code == 0
  r = json.loads(out.read_text())
  assert r["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
  assert r["per_device"]["params"] == 26944 and r["hbm_bytes"] == 32 * 2 ** 30
  printed = capsys.readouterr().out
  assert "8 x TPU v6e" in printed and "26.31 KiB" in printed and "fits" in printed


def test_plan_reads_the_runs_sequence_length():
  """Without plan.seq_len the planned rows are the run's: Experiment.inputs_length + targets_length from gin."""
  gin.clear_config()
  try:
    gin.parse_config(["import fiat_jax.experiment", "Experiment.inputs_length = 96", "Experiment.targets_length = 8"])
    r = plan.plan(model=_tiny(), lora={"rank": 4}, train=train.TrainConfig(batch_size=8), num_devices=1,
                  compile=False)
    assert r["seq_len"] == 104
  finally:
    gin.clear_config()
  assert plan.run_seq_len() == 1024 + 32  # Experiment's defaults
