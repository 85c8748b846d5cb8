"""Optimizers and learning-rate schedules (optax): AdamW or Adafactor, warm-up then constant / cosine / linear decay,
global-norm clipping and LoRA+ (a larger learning rate for the B matrices)."""
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import optax

from fiat_jax import config_check
from fiat_jax.model import lora as lora_lib


@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class OptimConfig:
  """The UPDATE of Algorithm 1: optimizer, schedule, clipping, LoRA+."""
  optimizer: str = "adamw"  # adamw | adafactor
  learning_rate: float = 1e-4  # peak, reached after warm-up
  schedule: str = "constant"  # after warm-up: constant | cosine | linear
  warmup_steps: int = 0
  decay_steps: int | None = None  # warm-up + decay length; None: the run's num_steps
  end_lr_fraction: float = 0.0  # cosine / linear decay ends at learning_rate * this
  weight_decay: float = 0.0  # decoupled; matrices only (not norms, biases, DoRA magnitudes)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0  # global gradient norm; None: no clipping
  loraplus_ratio: float | None = None  # LoRA+: B matrices learn at learning_rate * ratio (its paper: 16)

  def __post_init__(self):
    if self.optimizer not in ("adamw", "adafactor"):
      raise ValueError(f"OptimConfig.optimizer: {self.optimizer!r} is not one of adamw, adafactor")
    if self.schedule not in ("constant", "cosine", "linear"):
      raise ValueError(f"OptimConfig.schedule: {self.schedule!r} is not one of constant, cosine, linear")
    if self.warmup_steps < 0 or self.learning_rate < 0:
      raise ValueError(f"OptimConfig: warmup_steps ({self.warmup_steps}) and learning_rate "
                       f"({self.learning_rate}) must be >= 0")


def schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate of update `step` (0-based): linear warm-up to the peak, then the configured decay."""
  peak, warm = cfg.learning_rate, cfg.warmup_steps
  decay = max((cfg.decay_steps or num_steps) - warm, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm_lr = peak * jnp.minimum(1.0, (step + 1.0) / max(warm, 1))  # the first update already moves
    t = jnp.clip((step - warm) / decay, 0.0, 1.0)
    if cfg.schedule == "cosine":
      frac = cfg.end_lr_fraction + (1 - cfg.end_lr_fraction) * 0.5 * (1 + jnp.cos(math.pi * t))
    elif cfg.schedule == "linear":
      frac = 1.0 - (1 - cfg.end_lr_fraction) * t
    else:
      frac = jnp.ones_like(t)
    return jnp.where(step < warm, warm_lr, peak * frac)
  return fn


def _scale_leaves(factors) -> optax.GradientTransformation:
  """Multiplies each update leaf by a constant (LoRA+ per-matrix learning-rate ratios)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates,
                                  factors), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make(cfg: OptimConfig, num_steps: int, trainable, lora: lora_lib.LoraConfig | None = None
         ) -> optax.GradientTransformation:
  """The optax transformation for a trainable tree ({'lora': ...} of the variant `lora`, or {'params': ...})."""
  lr = schedule(cfg, num_steps)
  decay_mask = jax.tree_util.tree_map(lambda x: x.ndim >= 2, trainable)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  if cfg.optimizer == "adamw":
    parts.append(optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  else:  # Adafactor's own update clipping stays on; the relative (parameter-scaled) step suits no zero-init B.
    parts.append(optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_rate=cfg.weight_decay or None,
                                 weight_decay_mask=decay_mask))
  if cfg.loraplus_ratio:
    mask = lora_lib.loraplus_mask(lora, trainable) if lora is not None else None
    if mask is None or not any(jax.tree_util.tree_leaves(mask)):
      raise ValueError(f"OptimConfig.loraplus_ratio is set but the trainable tree has no LoRA B matrices (LoRA+ "
                       f"needs mode 'peft' with a variant whose lora.VARIANTS entry names them; variant: "
                       f"{lora.variant if lora else None!r})")
    factors = jax.tree_util.tree_map(lambda b: cfg.loraplus_ratio if b else 1.0, mask)
    parts.append(_scale_leaves(factors))
  return optax.chain(*parts)
