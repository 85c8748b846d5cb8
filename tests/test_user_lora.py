"""A LoRA variant from a user's own module (tests/user_lora/gated_lora.py, outside the package) through
lora.register alone: trained with checkpoints on a sharded mesh in the scanned layout, merged and unmerged exactly,
exported to PEFT, counted by `fiat plan`; and what register refuses."""
import dataclasses
import importlib
import json
import os
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from fiat_jax import cli
from fiat_jax.model import hf
from fiat_jax.model import hf_export
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import sharding
from fiat_jax.model import stacking
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import optim
from fiat_jax.training import plan
from fiat_jax.training import train

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from hf_tiny import VOCAB, make_hf_model, hf_logits, our_logits, padded_batch  # noqa: E402

USER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_lora")


@pytest.fixture
def user_modules(monkeypatch):
  """tests/user_lora importable and gated_lora not yet imported; VARIANTS is a copy for the test, so no other test
  sees what it registers."""
  monkeypatch.setattr(lora_lib, "VARIANTS", dict(lora_lib.VARIANTS))
  monkeypatch.syspath_prepend(USER_DIR)
  monkeypatch.delitem(sys.modules, "gated_lora", raising=False)


@pytest.fixture
def gated(user_modules):
  """gated_lora imported as a gin file's `import gated_lora` imports it."""
  module = importlib.import_module("gated_lora")
  assert lora_lib.VARIANTS["gated"] is module.GATED
  return module


@pytest.fixture
def clean_gin():
  gin.clear_config()  # also forgets the imports gin recorded
  yield
  gin.clear_config()


def test_a_users_variant_trains_merges_and_exports_to_peft(gated, tmp_path):
  model = make_hf_model("llama")  # tied embeddings, GQA
  model.save_pretrained(tmp_path / "base")
  cfg, params = hf.load(str(tmp_path / "base"), dtype="float32", scan_layers=True)
  cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(rank=4, alpha=8.0, variant="gated"))
  tokens = np.random.default_rng(0).integers(3, VOCAB, size=(8, 12)).astype(np.int32)
  batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=np.roll(tokens, -1, 1),
               decoder_loss_weights=np.ones_like(tokens))
  tcfg = train.TrainConfig(num_steps=8, batch_size=8, log_every=1, save_every=4, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=3e-2, clip_norm=None, warmup_steps=0,
                                                   loraplus_ratio=2.0))
  mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
  res = train.train(tcfg, cfg, params, lambda start: iter(lambda: batch, None), "one batch", str(tmp_path / "run"),
                    mesh=mesh)
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert len(losses) == 8 and losses[-1] < losses[0] - 3.0, losses  # one batch, 8 steps: 5.49 -> 1.57 nats
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "8"]
  again = train.train(tcfg, cfg, params, lambda start: iter(lambda: batch, None), "one batch",
                      str(tmp_path / "run"), mesh=mesh)  # resumes from checkpoint 8, with nothing left to train
  assert again.step == 8
  for a, b in zip(jax.tree_util.tree_leaves(again.trainable), jax.tree_util.tree_leaves(res.trainable)):
    np.testing.assert_array_equal(a, b)  # the variant's tensors restored from the checkpoint exactly

  q = res.trainable["lora"][stacking.SCANNED]["attn"]["q"]
  assert {k: v.shape for k, v in q.items()} == {"a": (2, 32, 4), "g": (2, 4), "b": (2, 4, 32)}
  assert float(np.abs(np.asarray(q["g"]) - gated.GATE_INIT).max()) > 1e-2  # the gates trained
  assert set(res.frozen) == {"params"}  # no frozen tensors: gated declares none

  collections = jax.tree_util.tree_map(np.asarray, res.trainable)
  padded, mask = padded_batch(seed=6)
  tuned = our_logits(cfg, {"params": params, **collections}, padded, mask)
  real = mask.astype(bool)
  merged, merged_cfg = lora_lib.merge(cfg, params, collections)
  assert merged_cfg.lora is None and stacking.is_scanned(merged)
  base_gap = np.abs(our_logits(merged_cfg, {"params": params}, padded, mask) - tuned)[real].max()
  assert base_gap > 1e-1  # the adapter changed the model ...
  np.testing.assert_allclose(our_logits(merged_cfg, {"params": merged}, padded, mask)[real], tuned[real],
                             atol=1e-5, rtol=0)  # ... and merges exactly, in float32
  restored = lora_lib.unmerge(cfg, merged, collections)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

  adapter_cfg = hf_export.save_peft(str(tmp_path / "adapter"), cfg, params, collections, str(tmp_path / "base"))
  assert (adapter_cfg["peft_type"], adapter_cfg["r"], adapter_cfg["lora_alpha"]) == ("LORA", 4, 8.0)
  exported = hf.read_safetensors(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  layer1 = {k: v[1] for k, v in q.items()}
  np.testing.assert_allclose(exported["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                             (layer1["a"] * layer1["g"]).T, rtol=1e-6)  # the gate folded into A
  assert len(exported) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
  peft_model = peft.PeftModel.from_pretrained(make_hf_model("llama"), str(tmp_path / "adapter")).eval()
  assert np.abs(hf_logits(peft_model, padded, mask) - tuned)[real].max() < 1e-4


def test_plan_counts_and_shards_a_users_variant(gated):
  tiny = lambda variant: plan.plan(model=model_lib.tiny_config(vocab_size=256), lora={"rank": 4, "variant": variant},
                                   train=train.TrainConfig(batch_size=8), seq_len=16, decode_batch=8, decode_len=64,
                                   compile=False, num_devices=8, data=2, fsdp=2, model_axis=2)
  lora, mine = tiny("lora"), tiny("gated")
  assert lora["counts"]["trainable"] == 4096  # tests/test_plan.py's hand count
  assert mine["counts"]["trainable"] == 4096 + 2 * 7 * 4  # plus a gate [R] per target and layer
  assert mine["per_device"]["lora"] == lora["per_device"]["lora"] + 4 * 2 * 7 * 4  # the gates replicated


def test_register_refuses_a_taken_name_and_a_malformed_variant(gated):
  with pytest.raises(ValueError, match=r"lora.register\('gated'\): the name 'gated' is taken \(registered by "
                                       r"gated_lora\); choose another name, or pass replace=True"):
    lora_lib.register("gated", gated.GATED)
  with pytest.raises(ValueError, match=r"lora.register\('dora'\): the name 'dora' is taken \(registered by "
                                       r"fiat_jax.model.lora\)"):
    lora_lib.register("dora", gated.GATED)
  assert lora_lib.register("gated", lora_lib.LORA, replace=True) is lora_lib.VARIANTS["gated"] is lora_lib.LORA
  bad = dataclasses.replace(gated.GATED, trainable={"g": ["lora_rank"], "a/b": ("in",)}, loraplus=("b",),
                            forward=lambda cfg, x, w: x, peft=gated.GATED.peft.config)
  with pytest.raises(ValueError) as e:
    lora_lib.register("gated2", bad)
  assert str(e.value) == (
      "lora.register('gated2'): malformed Variant: trainable['g']: the logical axes ['lora_rank'] are not a tuple "
      "of names ('in', 'out', 'lora_rank'); trainable: the tensor name 'a/b' is not a non-empty string without '/'; "
      "forward is not a function of (cfg, x, xd, w, t, f); loraplus ('b',) is not a tuple of trainable tensor "
      "names; peft is function, not a PeftLayout of functions (or None: no PEFT export)")
  for name, variant, message in [("gated 2", gated.GATED, "a variant's name is letters"),
                                 ("gated2", {"trainable": {}}, "dict is not a lora.Variant"),
                                 ("gated2", dataclasses.replace(gated.GATED, trainable={}, loraplus=()),
                                  "trainable is empty")]:
    with pytest.raises(ValueError, match=message):
      lora_lib.register(name, variant)
  assert "gated2" not in lora_lib.VARIANTS and "gated 2" not in lora_lib.VARIANTS


def test_an_unregistered_variant_names_the_gin_import():
  with pytest.raises(ValueError, match=r"LoraConfig.variant: 'gated' is not registered in lora.VARIANTS \(lora, "
                                       r"dora, pissa, vera\); .* put `import my_module` at the top of a gin file"):
    lora_lib.LoraConfig(variant="gated")


def test_init_returning_other_ranks_than_declared_is_named(gated):
  wrong = dataclasses.replace(gated.GATED, trainable=dict(gated.GATED.trainable, g=("lora_rank", "out")))
  lora_lib.register("gated", wrong, replace=True)
  cfg = model_lib.tiny_config(lora=lora_lib.LoraConfig(rank=2, variant="gated", targets=("q",)))
  params = jax.eval_shape(lambda: nn.meta.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  with pytest.raises(ValueError, match=r"lora.VARIANTS\['gated'\]: init returned lora 'g' of shape \(2,\), its "
                                       r"entry declares the axes \('lora_rank', 'out'\)"):
    jax.eval_shape(lambda p: lora_lib.init(cfg.lora, p, jax.random.PRNGKey(0)), params)


def test_a_gin_file_imports_the_users_module_before_its_bindings(user_modules, clean_gin):
  cli.parse_gin([f"--gin_file={os.path.join(USER_DIR, 'gated.gin')}"], "train")
  assert lora_lib.LoraConfig() == lora_lib.LoraConfig(rank=4, variant="gated")
  assert "gated" in lora_lib.VARIANTS
  assert gin.config_str().startswith("import gated_lora\n")  # what a run's config.gin keeps


def test_a_gin_import_that_fails_is_one_line_naming_the_file(user_modules, clean_gin, tmp_path, monkeypatch):
  missing = tmp_path / "missing.gin"
  missing.write_text("LoraConfig.rank = 4\nimport no_such_lora\n")
  with pytest.raises(cli.UsageError) as e:
    cli.parse_gin([f"--gin_file={missing}"], "train")
  assert str(e.value) == (f"No module named 'no_such_lora' (In file \"{missing}\", line 2; import no_such_lora): a "
                          f"gin file imports from the working directory, PYTHONPATH and the installed packages")
  (tmp_path / "clashing_lora.py").write_text("from fiat_jax.model import lora\nlora.register('dora', lora.LORA)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  clash = tmp_path / "clash.gin"
  clash.write_text("import clashing_lora\n")
  with pytest.raises(cli.UsageError, match=rf"^lora.register\('dora'\): the name 'dora' is taken \(registered by "
                                           rf"fiat_jax.model.lora\); .* \(In file \"{clash}\", line 1; "):
    cli.parse_gin([f"--gin_file={clash}"], "train")
