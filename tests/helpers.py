"""Small shared helpers for the tests: random tiny models with non-degenerate weights."""
import dataclasses

import flax.linen as nn
import jax

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib


def tiny_params(cfg, seed=0, gain=3.0):
  """Random params whose 2-D kernels are scaled up, so a random model does not just echo its input."""
  params = nn.meta.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(seed)))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * gain if path[-1].key == "kernel" else x, params)


def perturbed_lora(cfg, params, seed=1, scale=0.05):
  """LoRA collections with a random non-zero B (and A), as after some training."""
  cols = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(seed), cfg.tie_embeddings)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 1000))
  cols["lora"] = jax.tree_util.tree_map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), cols["lora"])
  return cols


def with_lora(cfg, **kw):
  return dataclasses.replace(cfg, lora=lora_lib.LoraConfig(**kw))
