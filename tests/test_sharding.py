"""On 8 fake CPU devices: logits and LoRA gradients on several meshes equal the single-device result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib
import helpers

MESHES = [dict(data=8), dict(data=2, model=4), dict(data=1, fsdp=8), dict(data=2, fsdp=2, model=2)]


def _loss(model):
  def loss(lora, params, tokens):
    logits, _ = model.apply({"params": params, "lora": lora}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1]), logits
  return jax.value_and_grad(loss, has_aux=True)


def test_eight_fake_devices_are_there():
  assert jax.device_count() == 8


@pytest.mark.parametrize("axes", MESHES)
def test_sharded_logits_and_lora_grads_equal_single_device(axes):
  cfg = helpers.with_lora(model_lib.tiny_config(vocab_size=264), rank=4)
  params = helpers.tiny_params(cfg, gain=1.0)
  lora = helpers.perturbed_lora(cfg, params)["lora"]
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 16), 0, cfg.vocab_size))
  (ref_loss, ref_logits), ref_grads = jax.jit(_loss(model_lib.Transformer(cfg)))(lora, params, tokens)

  mesh = sharding.make_mesh(**axes)
  p = jax.device_put(params, sharding.param_shardings(cfg, mesh))
  l = jax.device_put(lora, sharding.lora_shardings(cfg, mesh)["lora"])
  t = sharding.global_batch({"t": tokens}, mesh)["t"]
  with sharding.activation_rules(mesh):
    (loss, logits), grads = jax.jit(_loss(model_lib.Transformer(cfg)))(l, p, t)
  assert len(t.sharding.device_set) == 8
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)  # a mean over 8x16 positions: ulps of float32 sums
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_vera_frozen_projections_shard_by_their_entry_and_match_single_device():
  cfg = helpers.with_lora(model_lib.tiny_config(vocab_size=264), rank=4, variant="vera")
  params = helpers.tiny_params(cfg, gain=1.0)
  cols = helpers.perturbed_lora(cfg, params, scale=0.5)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 16), 0, cfg.vocab_size))

  def loss(lora, frozen, tokens):
    logits, _ = model_lib.Transformer(cfg).apply({**frozen, "lora": lora}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1])
  frozen = {"params": params, "lora_init": cols["lora_init"]}
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(cols["lora"], frozen, tokens)

  mesh = sharding.make_mesh(data=2, model=4)
  sh = sharding.lora_shardings(cfg, mesh)
  assert sh["lora_init"]["layer_0"]["mlp"]["up"]["b"].spec == jax.sharding.PartitionSpec(None, "model")
  assert sh["lora"]["layer_0"]["mlp"]["up"]["b"].spec == jax.sharding.PartitionSpec("model")
  frozen_sh = {"params": sharding.param_shardings(cfg, mesh), "lora_init": sh["lora_init"]}
  with sharding.activation_rules(mesh):
    got_loss, grads = jax.jit(jax.value_and_grad(loss))(jax.device_put(cols["lora"], sh["lora"]),
                                                        jax.device_put(frozen, frozen_sh),
                                                        sharding.global_batch({"t": tokens}, mesh)["t"])
  np.testing.assert_allclose(got_loss, ref_loss, atol=1e-5)
  assert float(jnp.abs(ref_grads["layer_0"]["attn"]["q"]["d"]).max()) > 1e-4
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_params_initialised_straight_into_shards():
  cfg = model_lib.tiny_config(vocab_size=264)
  mesh = sharding.make_mesh(data=2, model=4)
  params = sharding.init_params_sharded(cfg, jax.random.PRNGKey(0), mesh)
  kernel = params["layer_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert kernel.addressable_shards[0].data.shape == (32, 16)
  ref = helpers.tiny_params(cfg, gain=1.0)
  np.testing.assert_array_equal(kernel, ref["layer_0"]["mlp"]["up"]["kernel"])


def test_indivisible_dims_are_replicated_and_mesh_errors_are_clear():
  cfg = model_lib.tiny_config(vocab_size=259)
  mesh = sharding.make_mesh(data=2, model=4)
  emb = sharding.param_shardings(cfg, mesh)["embedder"]["embedding"]
  assert emb.spec == jax.sharding.PartitionSpec(None, "fsdp")
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(data=-1, model=-1)
  with pytest.raises(ValueError, match="8 devices"):
    sharding.make_mesh(data=3, model=2)
