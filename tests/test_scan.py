"""Config.scan_layers: the scanned model (params stacked on "layers") against the unrolled one, through HF import
and export, every LoRA variant, merge / unmerge, the PEFT adapter, KV-cache decoding and a resumed training run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import hf
from fiat_jax.model import hf_export
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import stacking
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import train
import helpers
from test_model import VARIANTS

TOKENS = jnp.arange(1, 33).reshape(2, 16) * 7
PACKED = dict(segment_ids_BL=jnp.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16]),
              bidirectional_BL=jnp.array([[1] * 3 + [0] * 13, [1] * 5 + [0] * 11]))


def _close(got, want, rel=1e-5):
  """Every leaf within rel of its reference's largest magnitude."""
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype
    assert float(jnp.abs(g - w).max()) <= rel * float(jnp.abs(w).max()), (g.shape, float(jnp.abs(g - w).max()))


def _logits_and_grads(cfg, variables, train_collection, **kw):
  """The logits and the gradients of sum(sin(logits)) w.r.t. one collection."""
  def logits(t):
    return model_lib.Transformer(cfg).apply({**variables, train_collection: t}, TOKENS % cfg.vocab_size, **kw)[0]
  return jax.jit(lambda t: (logits(t), jax.grad(lambda t: jnp.sum(jnp.sin(logits(t))))(t)))(
      variables[train_collection])


@pytest.mark.parametrize("name,prefix_lm,policy", [("llama_gqa", True, "none"), ("gemma2", False, "full"),
                                                   ("gemma3", False, "minimal")])
def test_scanned_equals_unrolled(name, prefix_lm, policy):
  """Logits and every parameter's gradient (float32, 1e-5): packing, a prefix, GQA, soft caps, Gemma 3's local
  and global layers (their windows and rope bases as a per-layer flag inside the scan), with a remat policy."""
  cfg = model_lib.tiny_config(**VARIANTS[name], prefix_lm=prefix_lm, remat_policy=policy)
  params = helpers.tiny_params(cfg)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  kw = PACKED if prefix_lm else dict(segment_ids_BL=PACKED["segment_ids_BL"])
  want = _logits_and_grads(cfg, {"params": params}, "params", **kw)
  got = _logits_and_grads(scanned, {"params": stacking.stack(params)}, "params", **kw)
  _close(got, (want[0], stacking.stack(want[1])))
  # The scanned init is the stacked layout of the same tree structure, with "layers" as its leading logical axis.
  boxed = model_lib.init_params(scanned, jax.random.PRNGKey(0))
  assert boxed["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "q_heads")
  assert jax.tree_util.tree_structure(stacking.stack(params)) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(lambda x: x, __import__("flax").linen.meta.unbox(boxed)))


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa", "vera"])
def test_lora_variants_init_merge_unmerge_on_the_stacked_layout(variant):
  """Every variant: scanned collections are the stacked unrolled ones (same keys per layer); the adapted model's
  logits and LoRA gradients agree within 1e-6 of each leaf's largest, in float64; merge and unmerge give exactly
  the stacked unrolled results.

  Float64, because the layouts order operations differently and this gain-3 model amplifies rounding: in float32
  the gradients differ by up to 1.1e-4 of a leaf's largest (PiSSA's q adapter; up to 1.8e-5 for the others), in
  float64 (RMSNorm and apply_rope included) by at most 1e-13. The logits stay float32 (Transformer.logits): moving
  every logit by one float32 ulp moves the gradients by at most 2.6e-7, so a logit that rounds differently in one
  layout stays within 1e-6. Swapped layers, a reversed leaf or one layer's adapter left at its init move a gradient
  leaf by 0.12 to 4.3 of its largest."""
  cfg = helpers.with_lora(model_lib.tiny_config(), rank=4, alpha=8.0, variant=variant, rslora=variant == "lora")
  params = helpers.tiny_params(cfg)
  s_params = stacking.stack(params)
  s_cols = lora_lib.init(cfg.lora, s_params, jax.random.PRNGKey(1), cfg.tie_embeddings)
  _close(s_cols, stacking.stack(lora_lib.init(cfg.lora, params, jax.random.PRNGKey(1), cfg.tie_embeddings)), 0.0)
  cols = helpers.perturbed_lora(cfg, params)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  s_cols = stacking.stack(cols)
  with jax.enable_x64(True):
    f64 = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree)
    cfg64 = dataclasses.replace(cfg, dtype="float64", param_dtype="float64")
    want = _logits_and_grads(cfg64, f64({"params": params, **cols}), "lora")
    got = _logits_and_grads(dataclasses.replace(cfg64, scan_layers=True), f64({"params": s_params, **s_cols}), "lora")
    assert all(g.dtype == jnp.float64 for g in jax.tree_util.tree_leaves(got[1]))
    _close(got, (want[0], stacking.stack(want[1])), 1e-6)
  merged, merged_cfg = lora_lib.merge(cfg, params, cols)
  s_merged, s_merged_cfg = lora_lib.merge(scanned, s_params, s_cols)
  assert s_merged_cfg == dataclasses.replace(merged_cfg, scan_layers=True)
  _close(s_merged, stacking.stack(merged), 0.0)
  if variant != "dora":  # DoRA's merged weight does not determine the base (lora.VARIANTS)
    _close(lora_lib.unmerge(scanned, s_merged, s_cols), stacking.stack(lora_lib.unmerge(cfg, merged, cols)), 0.0)


def test_scanned_cache_decoding_equals_unrolled():
  """Prefill and three cached steps, Gemma 3's mixed layers: the stacked [layers, ...] cache gives the logits of
  the per-layer one."""
  cfg = model_lib.tiny_config(**VARIANTS["gemma3"])
  params = helpers.tiny_params(cfg)

  def decode(c, p):
    m, cache = model_lib.Transformer(c), model_lib.init_cache(c, 2, 20)
    out, cache = m.apply({"params": p}, TOKENS[:, :12] % c.vocab_size, cache=cache)
    outs = [out]
    for i in range(12, 15):
      out, cache = m.apply({"params": p}, TOKENS[:, i:i + 1] % c.vocab_size, positions_BL=jnp.full((2, 1), i),
                           cache=cache)
      outs.append(out)
    return outs

  _close(decode(dataclasses.replace(cfg, scan_layers=True), stacking.stack(params)), decode(cfg, params))


def test_hf_import_and_export_in_the_scanned_layout(tmp_path):
  """A transformers checkpoint loads stacked (equal to stacking the unrolled load); the merged export and the
  PEFT adapter written from the scanned layout equal those written from the unrolled one, tensor by tensor."""
  hf_tiny = pytest.importorskip("hf_tiny")
  model = hf_tiny.make_hf_model("gemma3")
  model.save_pretrained(tmp_path / "base")
  cfg, params = hf.load(str(tmp_path / "base"), dtype="float32")
  s_cfg, s_params = hf.load(str(tmp_path / "base"), dtype="float32", scan_layers=True)
  assert s_cfg == dataclasses.replace(cfg, scan_layers=True)
  _close(s_params, stacking.stack(params), 0.0)
  lcfg = helpers.with_lora(cfg, rank=4, alpha=8.0)
  cols = helpers.perturbed_lora(lcfg, params)
  s_lcfg = dataclasses.replace(lcfg, scan_layers=True)
  for out, c, p, cl in (("u", lcfg, params, cols), ("s", s_lcfg, s_params, stacking.stack(cols))):
    hf_export.save_merged(str(tmp_path / out / "merged"), c, p, cl, "Gemma3ForCausalLM", base_dir=str(tmp_path / "base"))
    hf_export.save_peft(str(tmp_path / out / "adapter"), c, p, cl, str(tmp_path / "base"))
  for sub, file in (("merged", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
    want = hf.read_safetensors(str(tmp_path / "u" / sub / file))
    got = hf.read_safetensors(str(tmp_path / "s" / sub / file))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_scanned_run_resumes_to_the_uninterrupted_result(tmp_path):
  """train.train with scan_layers: 6 steps straight, and 3 + a resume from the Orbax checkpoint to 6, give the same
  trained LoRA tensors; the stored tree is the stacked layout."""
  cfg = dataclasses.replace(helpers.with_lora(model_lib.tiny_config(), rank=4, alpha=8.0), scan_layers=True)
  params = stacking.stack(helpers.tiny_params(cfg))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (16, 8, 17))
  batches = [dict(decoder_input_tokens=t[:, :-1], decoder_target_tokens=t[:, 1:],
                  decoder_loss_weights=np.ones((8, 16), np.float32)) for t in tokens]
  run = lambda steps, d, **kw: train.train(train.TrainConfig(num_steps=steps, batch_size=8, save_every=3,
                                                             log_every=1, tensorboard=False, remat_policy="full"),
                                           cfg, params, batches, "fp", str(d), **kw)
  straight = run(6, tmp_path / "a")
  run(3, tmp_path / "b")
  resumed = run(6, tmp_path / "b", allow_changed_settings=True)  # num_steps 3 -> 6, recorded
  assert resumed.step == 6 and stacking.is_scanned(resumed.trainable)
  _close(resumed.trainable, straight.trainable, 0.0)
