"""LoRA and its variants (rsLoRA, DoRA, PiSSA, VeRA) as the projection modules of transformer.py, plus init, merge
(θ'_τ = θ_τ ⊕ θ_PEFT), unmerge and parameter counts.

The base tree (`params`) is never touched: a variant's trainable tensors live in the `lora` collection and those it
keeps at their initial values (PiSSA's initial factors, VeRA's random projections) in `lora_init` (frozen), both in
float32 (ADAPTER_DTYPE) whatever the base's dtype; the forward casts them to the compute dtype, merge to the base's.
A variant is a `Variant` record: its tensors (with logical axes and init), forward, exact merge and unmerge, LoRA+
matrices and PEFT adapter layout; `register(name, variant)` makes it selectable as `LoraConfig.variant = name`. The
four built-ins register below exactly as a research variant does from its own module (no edit here):

  from fiat_jax.model import lora
  lora.register("gated", lora.Variant(trainable=..., frozen={}, init=..., forward=..., merge=..., unmerge=...))

and a gin file loads that module with gin's `import my_module` (the `fiat` command finds it in the working
directory, on PYTHONPATH or installed). The model, trainer, optimizer, sharding, scanned layers, checkpoints, plan
and export read the record, so nothing else changes. `embed` / `unembed` targets use plain LoRA under every variant.
`lora_dense` (x W plus the LoRA product, as one matmul) and `low_rank` (the product x A B alone) come from ops.py,
with hand-written gradients; `dense` (x W of a projection without LoRA, and the unembedding) also comes from ops.py:
one 2-D product, whose autodiff weight gradient XLA takes without a transposed copy. A variant's own terms can be
plain jnp code, which autodiff differentiates; its init must be traceable (`fiat plan` runs it under eval_shape).
"""
import dataclasses
import inspect
import math
import re
from typing import Callable, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from fiat_jax import config_check
from fiat_jax.model import stacking
from fiat_jax.model.ops import dense, lora_dense, low_rank

DENSE_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
EMBED_TARGETS = ("embed", "unembed")
TRAINABLE, FROZEN = "lora", "lora_init"  # the collections of a variant's trainable and frozen tensors
EMBED_LORAPLUS = ("embed_b", "unembed_b")  # the embeddings' (plain LoRA) B matrices, for LoRA+
# Adapters are created in float32 (as PEFT keeps them): in bf16 an update under 2^-8 of a weight rounds away. The
# frozen ones too: PiSSA's copy must equal the trainable factors' start exactly, and they are LoRA-sized (Llama-2-7B
# at rank 8 on every projection: 80 MB, 40 MB more than in bf16, 0.3% of its 13.5 GB bf16 base).
ADAPTER_DTYPE = jnp.float32


@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class LoraConfig:
  """θ_PEFT's shape: which projections get LoRA, and how. `embed`/`unembed` always use plain LoRA."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DENSE_TARGETS
  dropout: float = 0.0
  rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank.
  variant: str = "lora"  # a registered name (register): lora | dora | pissa | vera, or one a user's module adds

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))  # gin and JSON give lists; the config is hashed
    unknown = set(self.targets) - set(DENSE_TARGETS + EMBED_TARGETS)
    if unknown:
      raise ValueError(f"LoraConfig.targets: unknown {sorted(unknown)}; choose from {DENSE_TARGETS + EMBED_TARGETS}")
    if self.variant not in VARIANTS:
      raise ValueError(f"LoraConfig.variant: {_unregistered(self.variant)}")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank: {self.rank} must be >= 1")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _active(lora: LoraConfig | None, name: str, module: nn.Module) -> bool:
  return lora is not None and name in lora.targets and not module.is_initializing()


def _get(module: nn.Module, collection: str, name: str):
  value = module.get_variable(collection, name)
  if value is None:
    raise ValueError(f"LoRA is configured for {'/'.join(module.path)} but variables[{collection!r}] has no "
                     f"{name!r}: build them with lora.init(cfg.lora, params, key)")
  return value


def _column_norm(w_IO):
  return jnp.sqrt(jnp.sum(jnp.square(w_IO.astype(jnp.float32)), axis=0))


# ---- The variants: one registry entry each ----------------------------------------------------------------------

class Shared(NamedTuple):
  """What a variant's init may share across targets: a key and the largest kernel [in, out] over the targets."""
  key: jax.Array
  max_in: int
  max_out: int


@dataclasses.dataclass(frozen=True)
class PeftLayout:
  """A variant in Hugging Face PEFT's adapter layout (hf_export.save_peft)."""
  config: Callable  # (cfg) -> adapter_config.json fields: peft_type, r, ...
  # (cfg, kind, t, f, w) -> {tensor name after the module's: numpy array} for one target. kind 'dense': a Dense
  # target's tensors, w None; 'embed' / 'unembed': plain LoRA t = {'a', 'b'}, f = {}, w the base [in, out].
  module: Callable
  shared: Callable = lambda cfg, frozen: {}  # (cfg, every dense target's f) -> tensors named after 'base_model.'


@dataclasses.dataclass(frozen=True)
class Variant:
  """A LoRA variant of the Dense targets. t / f: one target's trainable / frozen tensors by name, as stored."""
  trainable: dict  # name -> logical axes ('in' / 'out': the kernel's), in the 'lora' collection
  frozen: dict  # the same, in 'lora_init': kept at their initial values, never trained
  init: Callable  # (cfg, w [in, out], key, shared: Shared) -> (t, f)
  forward: Callable  # (cfg, x, xd, w, t, f) -> x W' (xd: x after LoRA dropout; cast inside to x.dtype)
  merge: Callable  # (cfg, w, t, f) -> W', what forward computes, as one matrix of w's dtype
  unmerge: Callable  # (cfg, W', t, f) -> W; raises where W' does not determine W
  loraplus: tuple = ()  # trainable names LoRA+ gives the larger learning rate (its "B matrices")
  peft: PeftLayout | None = None  # None: PEFT has no layout for it, and save_peft says so


VARIANTS: dict[str, Variant] = {}  # name -> Variant: read it; `register` adds to it
_CALLS = {"init": "cfg, w, key, shared", "forward": "cfg, x, xd, w, t, f", "merge": "cfg, w, t, f",
          "unmerge": "cfg, w, t, f"}  # the positional arguments each of a Variant's functions is called with


def register(name: str, variant: Variant, replace: bool = False) -> Variant:
  """Makes `variant` selectable as LoraConfig.variant = name and returns it; a taken name (unless `replace`) or a
  malformed Variant is refused with a ValueError naming it."""
  where = f"lora.register({name!r})"
  if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):  # a gin string and a tau.json field
    raise ValueError(f"{where}: a variant's name is letters, digits, '_', '.' or '-'")
  if name in VARIANTS and not replace:
    owner = getattr(VARIANTS[name].forward, "__module__", "?")
    raise ValueError(f"{where}: the name {name!r} is taken (registered by {owner}); choose another name, or pass "
                     f"replace=True to override it")
  problems = _problems(variant)
  if problems:
    raise ValueError(f"{where}: malformed Variant: " + "; ".join(problems))
  VARIANTS[name] = variant
  return variant


def _takes(fn, n: int) -> bool:
  try:
    inspect.signature(fn).bind(*range(n))
  except TypeError:
    return False
  except ValueError:  # no signature to inspect (a builtin): left to the first call
    pass
  return True


def _problems(v) -> list[str]:
  """What is wrong with a Variant's fields, one phrase each (caught here rather than deep inside a jitted step)."""
  if not isinstance(v, Variant):
    return [f"{type(v).__name__} is not a lora.Variant"]
  out = []
  for field in ("trainable", "frozen"):
    tensors = getattr(v, field)
    if not isinstance(tensors, dict):
      out.append(f"{field} is a {type(tensors).__name__}, not a dict of tensor name -> logical axes")
      continue
    for n, axes in tensors.items():
      if not isinstance(n, str) or not n or "/" in n:  # checkpoints and tau.json checks join names with '/'
        out.append(f"{field}: the tensor name {n!r} is not a non-empty string without '/'")
      if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
        out.append(f"{field}[{n!r}]: the logical axes {axes!r} are not a tuple of names ('in', 'out', 'lora_rank')")
  if v.trainable == {}:
    out.append("trainable is empty: a variant trains at least one tensor")
  for field, args in _CALLS.items():
    if not callable(getattr(v, field)) or not _takes(getattr(v, field), len(args.split(", "))):
      out.append(f"{field} is not a function of ({args})")
  trainable = v.trainable if isinstance(v.trainable, dict) else {}
  if not isinstance(v.loraplus, tuple) or not set(v.loraplus) <= set(trainable):
    out.append(f"loraplus {v.loraplus!r} is not a tuple of trainable tensor names")
  layout = v.peft
  if layout is not None and not (isinstance(layout, PeftLayout) and callable(layout.config) and
                                 callable(layout.module) and callable(layout.shared)):
    out.append(f"peft is {type(layout).__name__}, not a PeftLayout of functions (or None: no PEFT export)")
  return out


def _unregistered(name: str) -> str:
  return (f"{name!r} is not registered in lora.VARIANTS ({', '.join(VARIANTS)}); a variant of your own registers "
          f"when its module is imported (lora.register): put `import my_module` at the top of a gin file")


def _f32(x):
  return x.astype(jnp.float32)


def _additive(delta) -> dict:
  """merge and unmerge of a variant whose W' = W + delta(cfg, t, f) (float32 math)."""
  return dict(merge=lambda cfg, w, t, f: (_f32(w) + delta(cfg, t, f)).astype(w.dtype),
              unmerge=lambda cfg, w, t, f: (_f32(w) - delta(cfg, t, f)).astype(w.dtype))


def _lora_init(cfg, w, key, shared):
  n_in, n_out = w.shape
  bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming-uniform(a=sqrt(5)) for A; B at zero: the model starts as the base.
  return {"a": jax.random.uniform(key, (n_in, cfg.rank), ADAPTER_DTYPE, -bound, bound),
          "b": jnp.zeros((cfg.rank, n_out), ADAPTER_DTYPE)}, {}


def _lora_forward(cfg, x, xd, w, t, f):
  return lora_dense(x, xd, w.astype(x.dtype), t["a"].astype(x.dtype), t["b"].astype(x.dtype), cfg.scale)


def _lora_delta(cfg, t, f):
  return cfg.scale * (_f32(t["a"]) @ _f32(t["b"]))


def peft_lora_module(kind, a, b, **extra):
  """PEFT LoRA tensors of one module from A [in, R] and B [R, out] (PEFT stores both transposed)."""
  if kind == "embed":
    return {"lora_embedding_A": a.T, "lora_embedding_B": b.T, **extra}
  return {"lora_A.weight": a.T, "lora_B.weight": b.T, **extra}


def peft_lora_config(cfg, rank=None, alpha=None, use_dora=False) -> dict:
  """PEFT's adapter_config.json fields of a LoRA adapter of cfg (rank / alpha: where the layout needs others)."""
  return {"peft_type": "LORA", "r": rank or cfg.rank, "lora_alpha": alpha or cfg.alpha, "lora_dropout": cfg.dropout,
          "use_rslora": cfg.rslora, "use_dora": use_dora, "bias": "none", "fan_in_fan_out": False,
          "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


LORA = register("lora", Variant(
    trainable={"a": ("in", "lora_rank"), "b": ("lora_rank", "out")}, frozen={}, init=_lora_init,
    forward=_lora_forward, **_additive(_lora_delta), loraplus=("b",),
    peft=PeftLayout(config=peft_lora_config,
                    module=lambda cfg, kind, t, f, w: peft_lora_module(kind, t["a"], t["b"]))))


def _dora_init(cfg, w, key, shared):
  t, f = _lora_init(cfg, w, key, shared)
  return dict(t, m=_column_norm(w).astype(ADAPTER_DTYPE)), f


def _dora_forward(cfg, x, xd, w, t, f):
  # Magnitude m times the unit-norm direction of W + s A B; the norm is not differentiated (DoRA §4.3).
  y = _lora_forward(cfg, x, xd, w, t, f)
  v = _f32(w) + cfg.scale * jnp.dot(_f32(t["a"].astype(x.dtype)), _f32(t["b"].astype(x.dtype)))
  return (y * (_f32(t["m"]) / jax.lax.stop_gradient(_column_norm(v)))).astype(y.dtype)


def _dora_merge(cfg, w, t, f):
  v = _f32(w) + cfg.scale * _f32(t["a"]) @ _f32(t["b"])
  return (v * (_f32(t["m"]) / _column_norm(v))).astype(w.dtype)


def _dora_unmerge(cfg, w, t, f):
  raise ValueError("unmerge: DoRA's merged weight m * V/||V|| does not determine W; keep the base checkpoint")


def _peft_dora_module(cfg, kind, t, f, w):
  # embed / unembed (plain LoRA here) get the magnitude that makes PEFT's DoRA factor 1: ||W + s A B|| itself.
  m = t["m"] if "m" in t else np.sqrt(np.sum(np.square((w + cfg.scale * t["a"] @ t["b"]).astype(np.float64)), 0))
  return peft_lora_module(kind, t["a"], t["b"], lora_magnitude_vector=m)


DORA = register("dora", Variant(
    trainable=dict(LORA.trainable, m=("out",)), frozen={}, init=_dora_init, forward=_dora_forward,
    merge=_dora_merge, unmerge=_dora_unmerge, loraplus=("b",),
    peft=PeftLayout(config=lambda cfg: peft_lora_config(cfg, use_dora=True), module=_peft_dora_module)))


def _pissa_init(cfg, w, key, shared):
  # The principal singular directions of W, split evenly between A and B; the frozen copy is subtracted.
  u, s, vt = jnp.linalg.svd(_f32(w), full_matrices=False)
  root = jnp.sqrt(s[: cfg.rank] / cfg.scale)
  a, b = (u[:, : cfg.rank] * root).astype(ADAPTER_DTYPE), (root[:, None] * vt[: cfg.rank]).astype(ADAPTER_DTYPE)
  return {"a": a, "b": b}, {"a": a, "b": b}


def _pissa_forward(cfg, x, xd, w, t, f):
  # The base keeps its principal part: subtract the frozen initial factors (the two products are computed alike,
  # so at init the output is the base output exactly).
  c = lambda v: v.astype(x.dtype)
  return jnp.dot(x, c(w)) + (low_rank(xd, c(t["a"]), c(t["b"]), cfg.scale) -
                             low_rank(xd, c(f["a"]), c(f["b"]), cfg.scale))


def _peft_pissa_module(cfg, kind, t, f, w):
  # s(AB - A0B0) on the original base is the rank-2R adapter [A, A0][B; -B0] (alpha scaled in the config to keep
  # the scale); plain-LoRA embed / unembed targets are padded to rank 2R with zeros.
  a0, b0 = (f["a"], f["b"]) if f else (np.zeros_like(t["a"]), np.zeros_like(t["b"]))
  return peft_lora_module(kind, np.concatenate([t["a"], a0], 1), np.concatenate([t["b"], -b0], 0))


PISSA = register("pissa", Variant(
    trainable=LORA.trainable, frozen=LORA.trainable, init=_pissa_init, forward=_pissa_forward,
    **_additive(lambda cfg, t, f: cfg.scale * (_f32(t["a"]) @ _f32(t["b"]) - _f32(f["a"]) @ _f32(f["b"]))),
    loraplus=("b",),
    peft=PeftLayout(module=_peft_pissa_module, config=lambda cfg: peft_lora_config(
        cfg, rank=2 * cfg.rank, alpha=cfg.alpha * (math.sqrt(2) if cfg.rslora else 2)))))

VERA_D_INITIAL = 0.1  # VeRA's d at init (the paper's d_initial, PEFT's default)


def _vera_init(cfg, w, key, shared):
  # One pair of random projections for the whole model (the paper's sharing, PEFT's layout): a target takes the
  # leading rows of A [max_in, R] and columns of B [R, max_out] (a copy per target: frozen, so they stay equal).
  # Kaiming-uniform as PEFT: bounds 1/sqrt(fan_in), fan_in max_in for A and R for B.
  n_in, n_out = w.shape
  key_a, key_b = jax.random.split(shared.key)
  bound_a, bound_b = 1.0 / math.sqrt(shared.max_in), 1.0 / math.sqrt(cfg.rank)
  a = jax.random.uniform(key_a, (shared.max_in, cfg.rank), ADAPTER_DTYPE, -bound_a, bound_a)[:n_in]
  b = jax.random.uniform(key_b, (cfg.rank, shared.max_out), ADAPTER_DTYPE, -bound_b, bound_b)[:, :n_out]
  # b = 0: VeRA starts as the base exactly.
  return ({"d": jnp.full((cfg.rank,), VERA_D_INITIAL, ADAPTER_DTYPE), "b": jnp.zeros((n_out,), ADAPTER_DTYPE)},
          {"a": a, "b": b})


def _vera_forward(cfg, x, xd, w, t, f):
  # h = W0 x + Λ_b B Λ_d A x (VeRA eq. 1): no alpha / rank scale, d and b carry it.
  c = lambda v: v.astype(x.dtype)
  return jnp.dot(x, c(w)) + jnp.dot(jnp.dot(xd, c(f["a"])) * c(t["d"]), c(f["b"])) * c(t["b"])


def _peft_vera_module(cfg, kind, t, f, w):
  if kind != "dense":
    raise ValueError(f"export: a VeRA adapter in PEFT's layout covers the Dense targets only; LoraConfig.targets "
                     f"has {kind!r} (plain LoRA here): drop it from the targets or export the merged checkpoint")
  return {"vera_lambda_b": t["b"], "vera_lambda_d": t["d"]}


def _peft_vera_shared(cfg, frozen):
  """PEFT's one vera_A [R, max_in] and vera_B [max_out, R], rebuilt from the targets' leading slices."""
  a = max((f["a"] for f in frozen), key=len)
  b = max((f["b"] for f in frozen), key=lambda x: x.shape[1])
  if not all(np.array_equal(f["a"], a[:len(f["a"])]) and np.array_equal(f["b"], b[:, :f["b"].shape[1]])
             for f in frozen):
    raise ValueError("export: the VeRA projections of the targets are not slices of one shared pair; they were "
                     "not built by lora.init (or were trained)")
  return {"vera_A": a.T, "vera_B": b.T}


VERA = register("vera", Variant(
    trainable={"d": ("lora_rank",), "b": ("out",)}, frozen=LORA.trainable, init=_vera_init, forward=_vera_forward,
    **_additive(lambda cfg, t, f: (_f32(f["a"]) * _f32(t["d"])) @ _f32(f["b"]) * _f32(t["b"])),
    peft=PeftLayout(config=lambda cfg: {
        "peft_type": "VERA", "r": cfg.rank, "projection_prng_key": 0, "save_projection": True,
        "vera_dropout": cfg.dropout, "d_initial": VERA_D_INITIAL, "fan_in_fan_out": False, "bias": "none",
        "modules_to_save": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None},
        module=_peft_vera_module, shared=_peft_vera_shared)))


def variant(cfg: LoraConfig) -> Variant:
  """The registered Variant of cfg.variant; a clear error naming it when it is not registered."""
  if cfg.variant not in VARIANTS:
    raise ValueError(f"LoRA variant {_unregistered(cfg.variant)}")
  return VARIANTS[cfg.variant]


def loraplus_mask(cfg: LoraConfig, trainable):
  """True at the trainable leaves LoRA+ gives the larger learning rate: the variant's and the embeddings' B."""
  names = set(variant(cfg).loraplus) | set(EMBED_LORAPLUS)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in names and getattr(path[0], "key", None) == TRAINABLE,
      trainable)


class Dense(nn.Module):
  """A bias-optional projection x @ kernel [in, out], with the configured LoRA variant when targeted."""
  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  lora: LoraConfig | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    if _active(self.lora, self.name, self):
      y = self.project(x, kernel, deterministic)
    else:
      y = dense(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def project(self, x, kernel, deterministic):
    """x W' for the configured variant (before the bias), W' = W ⊕ the variant's tensors."""
    cfg = self.lora
    v = variant(cfg)
    t = {name: _get(self, TRAINABLE, name) for name in v.trainable}
    f = {name: _get(self, FROZEN, name) for name in v.frozen}
    xd = nn.Dropout(cfg.dropout)(x, deterministic=deterministic) if cfg.dropout else x
    return v.forward(cfg, x, xd, kernel, t, f)


class Embed(nn.Module):
  """Token embedding [V, D] and the output projection (tied: its transpose; untied: `unembed` [D, V])."""
  vocab_size: int
  features: int
  lora: LoraConfig | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  tied: bool = True

  def setup(self):
    init = nn.initializers.normal(self.features ** -0.5)  # unit-variance logits when tied
    self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.vocab_size, self.features), self.param_dtype)
    if not self.tied:
      self.unembed = self.param("unembed", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                         ("embed", "vocab")),
                                (self.features, self.vocab_size), self.param_dtype)

  def __call__(self, tokens_BL, deterministic=True):
    x_BLD = jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)
    if _active(self.lora, "embed", self):
      a_VR, b_RD = _get(self, "lora", "embed_a"), _get(self, "lora", "embed_b")
      x_BLD = x_BLD + jnp.dot(jnp.take(a_VR, tokens_BL, axis=0).astype(self.dtype),
                              b_RD.astype(self.dtype)) * self.lora.scale
    return x_BLD

  def attend(self, h_BLD, deterministic=True):
    h_BLD = h_BLD.astype(self.dtype)
    kernel_DV = self.embedding.T if self.tied else self.unembed
    logits = dense(h_BLD, kernel_DV.astype(self.dtype))
    if _active(self.lora, "unembed", self):
      a_DR, b_RV = _get(self, "lora", "unembed_a"), _get(self, "lora", "unembed_b")
      logits = logits + low_rank(h_BLD, a_DR.astype(self.dtype), b_RV.astype(self.dtype), self.lora.scale)
    return logits


# ---- Trees: init, logical axes, merge, unmerge, counts -------------------------------------------------------

def _walk(params, cfg: LoraConfig, fn, tied: bool):
  """Applies fn(kind, name, leaves) at every LoRA target of a params-shaped tree, mirroring its nesting.

  `leaves` is the target's kernel (Dense), or the embedding / unembed leaf; fn returns a dict of collections
  ({'lora': {...}, 'lora_init': {...}}) for that module, which are nested at the module's path.
  """
  out = {}

  def put(path, cols):
    for col, leaves in cols.items():
      node = out.setdefault(col, {})
      for p in path:
        node = node.setdefault(p, {})
      node.update(leaves)

  def rec(node, path):
    for name, child in node.items():
      if not isinstance(child, dict):
        continue
      if name in cfg.targets and name in DENSE_TARGETS and "kernel" in child:
        put(path + (name,), fn("dense", name, child["kernel"]))
      elif name == "embedder":
        if "embed" in cfg.targets:
          put(path + (name,), fn("embed", "embed", child["embedding"]))
        if "unembed" in cfg.targets:
          put(path + (name,), fn("unembed_tied" if tied else "unembed", "unembed",
                                 child["embedding"] if tied else child["unembed"]))
      else:
        rec(child, path + (name,))

  rec(params, ())
  return out


def _collections(t: dict, f: dict) -> dict:
  return {TRAINABLE: t, FROZEN: f} if f else {TRAINABLE: t}


def _init_target(cfg: LoraConfig, kind: str, w, key, shared: Shared):
  """LoRA variables of one target from its base weight w ([in, out]; the embedding is [V, D]), in ADAPTER_DTYPE."""
  if kind == "embed":
    return {"lora": {"embed_a": jax.random.normal(key, (w.shape[0], cfg.rank), ADAPTER_DTYPE),
                     "embed_b": jnp.zeros((cfg.rank, w.shape[1]), ADAPTER_DTYPE)}}
  if kind.startswith("unembed"):  # tied: w is the embedding [V, D]; untied: unembed [D, V].
    d, v = (w.shape[1], w.shape[0]) if kind == "unembed_tied" else w.shape
    bound = 1.0 / math.sqrt(d)
    return {"lora": {"unembed_a": jax.random.uniform(key, (d, cfg.rank), ADAPTER_DTYPE, -bound, bound),
                     "unembed_b": jnp.zeros((cfg.rank, v), ADAPTER_DTYPE)}}
  entry = variant(cfg)
  t, f = entry.init(cfg, w, key, shared)
  if set(t) != set(entry.trainable) or set(f) != set(entry.frozen):
    raise ValueError(f"lora.VARIANTS[{cfg.variant!r}]: init returned trainable {sorted(t)} and frozen {sorted(f)}, "
                     f"its entry declares {sorted(entry.trainable)} and {sorted(entry.frozen)}")
  for col, tensors, declared in ((TRAINABLE, t, entry.trainable), (FROZEN, f, entry.frozen)):
    wrong = [n for n, x in tensors.items() if jnp.ndim(x) != len(declared[n])]  # sharding would fail obscurely
    if wrong:
      raise ValueError(f"lora.VARIANTS[{cfg.variant!r}]: init returned {col} {wrong[0]!r} of shape "
                       f"{jnp.shape(tensors[wrong[0]])}, its entry declares the axes {declared[wrong[0]]}")
  return _collections(t, f)


def init(cfg: LoraConfig, params, key, tied: bool = True) -> dict:
  """LoRA collections for a base params tree (unboxed arrays): {'lora': ...} and, for a variant with frozen
  tensors (PiSSA, VeRA), {'lora_init': ...}. Scanned params get scanned collections, the same tensors as the
  unrolled model's (variants init per [in, out] matrix)."""
  params = nn.meta.unbox(params)
  if stacking.is_scanned(params):
    return stacking.stack(init(cfg, stacking.unstack(params), key, tied))
  shapes = []

  def dense_shape(kind, _, w):
    if kind == "dense":
      shapes.append(w.shape)
    return {}
  _walk(params, cfg, dense_shape, tied)
  shared = Shared(jax.random.fold_in(key, 0x7FFFFFFF), max((s[0] for s in shapes), default=0),
                  max((s[1] for s in shapes), default=0))
  counter = iter(range(1 << 30))
  return _walk(params, cfg, lambda kind, _, w: _init_target(cfg, kind, w, jax.random.fold_in(key, next(counter)),
                                                            shared), tied)


def logical_axes(cfg: LoraConfig, param_axes, tied: bool = True) -> dict:
  """Logical axis names (PartitionSpec-like tuples) of the trees `init` returns, from the params' axes."""
  if stacking.is_scanned(param_axes):
    return stacking.stack(logical_axes(cfg, stacking.unstack(param_axes, axes=True), tied), axes=True)

  def fn(kind, _, axes):
    axes = tuple(axes)
    if kind == "embed":
      return {"lora": {"embed_a": (axes[0], "lora_rank"), "embed_b": ("lora_rank", axes[1])}}
    if kind.startswith("unembed"):
      return {"lora": {"unembed_a": ("embed", "lora_rank"), "unembed_b": ("lora_rank", "vocab")}}
    named = {"in": axes[0], "out": axes[1]}
    spec = lambda names: {n: tuple(named.get(a, a) for a in ax) for n, ax in names.items()}
    entry = variant(cfg)
    return _collections(spec(entry.trainable), spec(entry.frozen))
  return _walk(param_axes, cfg, fn, tied)


def _fold(cfg: LoraConfig, params, collections, dense_fn, sign: float) -> None:
  """Folds the adapter into `params` in place: dense_fn (the variant's merge or unmerge) at every Dense target,
  ± s A B at the embeddings."""
  def rec(node, lnode, inode):
    for name, child in lnode.items():
      if name == "embedder":
        emb = node["embedder"]
        for kind, leaf in (("embed", "embedding"), ("unembed", "unembed")):
          if f"{kind}_a" in child:
            w = emb[leaf]
            delta = cfg.scale * (_f32(child[f"{kind}_a"]) @ _f32(child[f"{kind}_b"]))
            emb[leaf] = (_f32(w) + sign * delta).astype(w.dtype)
      elif not any(isinstance(c, dict) for c in child.values()):  # a Dense target's tensors
        node[name]["kernel"] = dense_fn(cfg, node[name]["kernel"], child, inode.get(name, {}))
      else:
        rec(node[name], child, inode.get(name, {}))

  rec(params, collections[TRAINABLE], collections.get(FROZEN, {}))


def merge(model_cfg, params, collections) -> tuple:
  """θ'_τ = θ_τ ⊕ θ_PEFT: returns (merged params, the config to run them with: no LoRA, untied if needed)."""
  cfg: LoraConfig = model_cfg.lora
  if stacking.is_scanned(params):
    merged, merged_cfg = merge(model_cfg, stacking.unstack(nn.meta.unbox(params)), stacking.unstack(collections))
    return stacking.stack(merged), merged_cfg
  params = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(params))  # a copy we may edit
  untie = model_cfg.tie_embeddings and bool(set(cfg.targets) & set(EMBED_TARGETS))
  if untie:
    params["embedder"]["unembed"] = params["embedder"]["embedding"].T
  _fold(cfg, params, collections, variant(cfg).merge, 1.0)
  merged_cfg = dataclasses.replace(model_cfg, lora=None, tie_embeddings=model_cfg.tie_embeddings and not untie)
  return params, merged_cfg


def unmerge(model_cfg, merged_params, collections):
  """θ_τ from θ'_τ and θ_PEFT, with the variant's unmerge (which raises where W' does not determine W: DoRA)."""
  cfg: LoraConfig = model_cfg.lora
  if stacking.is_scanned(merged_params):
    return stacking.stack(unmerge(model_cfg, stacking.unstack(nn.meta.unbox(merged_params)),
                                  stacking.unstack(collections)))
  params = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(merged_params))
  _fold(cfg, params, collections, variant(cfg).unmerge, -1.0)
  if model_cfg.tie_embeddings and "unembed" in params.get("embedder", {}) and set(cfg.targets) & set(EMBED_TARGETS):
    params["embedder"].pop("unembed")
  return params


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree))))


def summary(trainable, frozen) -> str:
  """The line a run prints: trainable / total parameters (full tuning: `frozen` is empty)."""
  n_train = count(trainable)
  total = n_train + count(frozen)
  return f"trainable params: {n_train:,} / total {total:,} ({100.0 * n_train / total:.4f}%)"
