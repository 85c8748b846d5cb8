"""Gated LoRA, a research variant kept outside fiat_jax (as a user's fork would): a learned gate g [R] scales each
rank-one component, W' = W + s A diag(g) B, so training can turn ranks down. g starts at 1 and B at 0 (the base
exactly); PEFT holds it as plain LoRA with the gate folded into A. A gin file selects it with `import gated_lora`
and `LoraConfig.variant = 'gated'` (gated.gin)."""
import jax.numpy as jnp

from fiat_jax.model import lora
from fiat_jax.model import ops

GATE_INIT = 1.0


def _init(cfg, w, key, shared):
  t, _ = lora.LORA.init(cfg, w, key, shared)  # A kaiming-uniform and B at zero, as LoRA's
  return dict(t, g=jnp.full((cfg.rank,), GATE_INIT, lora.ADAPTER_DTYPE)), {}


def _gated_a(t):
  """A diag(g) in float32."""
  return t["a"].astype(jnp.float32) * t["g"].astype(jnp.float32)


def _forward(cfg, x, xd, w, t, f):
  c = lambda v: v.astype(x.dtype)
  return ops.lora_dense(x, xd, c(w), c(_gated_a(t)), c(t["b"]), cfg.scale)


def _delta(cfg, t):
  return cfg.scale * (_gated_a(t) @ t["b"].astype(jnp.float32))


def _peft_module(cfg, kind, t, f, w):
  # The embed / unembed targets are plain LoRA under every variant: no gate to fold there.
  return lora.peft_lora_module(kind, _gated_a(t) if "g" in t else t["a"], t["b"])


GATED = lora.register("gated", lora.Variant(
    trainable={"a": ("in", "lora_rank"), "g": ("lora_rank",), "b": ("lora_rank", "out")}, frozen={}, init=_init,
    forward=_forward,
    merge=lambda cfg, w, t, f: (w.astype(jnp.float32) + _delta(cfg, t)).astype(w.dtype),
    unmerge=lambda cfg, w, t, f: (w.astype(jnp.float32) - _delta(cfg, t)).astype(w.dtype),
    loraplus=("b",), peft=lora.PeftLayout(config=lora.peft_lora_config, module=_peft_module)))
