"""LoRA (and the rsLoRA, DoRA and PiSSA variants) as the projection modules of model.py, plus init, merge
(θ'_τ = θ_τ ⊕ θ_PEFT), unmerge and parameter counts.

The base tree (`params`) is never touched: LoRA weights live in the `lora` collection (trainable) and, for
PiSSA, the initial factors in `lora_init` (frozen). A target module with rank R holds
  a [in, R] (random), b [R, out] (zeros, so the model starts as the base model), and for DoRA m [out].
This is the file to edit to try a LoRA variant: `Dense.project` (the forward), `_init_target` and `_merge_kernel`.
`lora_dense` (x W plus the LoRA product, as one matmul) and `low_rank` (the product x A B alone) have hand-written
gradients, for speed and memory; a variant's own terms can be plain jnp code, which autodiff differentiates.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DENSE_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
EMBED_TARGETS = ("embed", "unembed")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get LoRA, and how. `embed`/`unembed` always use plain LoRA."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DENSE_TARGETS
  dropout: float = 0.0
  rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank.
  variant: str = "lora"  # lora | dora | pissa

  def __post_init__(self):
    unknown = set(self.targets) - set(DENSE_TARGETS + EMBED_TARGETS)
    if unknown:
      raise ValueError(f"LoraConfig.targets: unknown {sorted(unknown)}; choose from {DENSE_TARGETS + EMBED_TARGETS}")
    if self.variant not in ("lora", "dora", "pissa"):
      raise ValueError(f"LoraConfig.variant: {self.variant!r} is not one of lora, dora, pissa")

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(x, a_IR, b_RO, scale: float):
  """(x a) b * scale, the LoRA product, with the scale applied to the small rank-R intermediate.

  Its VJP is written out so that each gradient is one matmul against a rank-R factor or intermediate: autodiff of
  the nested dots made XLA (CPU) write the input gradients of wide projections (gate, up) in transposed form, a
  [F, B*L] copy per layer, and the LoRA backward pass cost more than the frozen matmuls beside it."""
  return _low_rank_fwd(x, a_IR, b_RO, scale)[0]


def _low_rank_fwd(x, a_IR, b_RO, scale):
  h_R = jnp.dot(x, a_IR) * scale
  return jnp.dot(h_R, b_RO), (x, a_IR, b_RO, h_R)


def _low_rank_bwd(scale, res, g_O):
  x, a_IR, b_RO, h_R = res
  g_R = jnp.dot(g_O, b_RO.T) * scale
  rows = tuple(range(x.ndim - 1))  # contract over every leading (batch, length) axis
  return (jnp.dot(g_R, a_IR.T), jnp.tensordot(g_R, x, (rows, rows)).T, jnp.tensordot(h_R, g_O, (rows, rows)))


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_dense(x, xd, w_IO, a_IR, b_RO, scale: float):
  """x W + (xd A) B · scale (xd: x after LoRA dropout, or x itself) as one matmul: [x, s xd A] @ [W; B].

  One product writes the sum, so the layer keeps one [.., out] activation for the backward pass instead of the
  base and LoRA outputs side by side (XLA fuses an add into each of its consumers and keeps both addends: for
  the MLP's gate and up that was two extra [B*L, F] buffers per layer). The backward pass is again one product
  over both: g [W; B]^T gives x's gradient and the rank-R intermediate's."""
  return _lora_dense_fwd(x, xd, w_IO, a_IR, b_RO, scale)[0]


def _lora_dense_fwd(x, xd, w_IO, a_IR, b_RO, scale):
  h_R = jnp.dot(xd, a_IR) * scale
  y = jnp.dot(jnp.concatenate([x, h_R], -1), jnp.concatenate([w_IO, b_RO], 0))
  return y, (x, xd, w_IO, a_IR, b_RO, h_R)


def _lora_dense_bwd(scale, res, g_O):
  x, xd, w_IO, a_IR, b_RO, h_R = res
  g_cat = jnp.dot(g_O, jnp.concatenate([w_IO, b_RO], 0).T)
  g_x, g_R = g_cat[..., :x.shape[-1]], g_cat[..., x.shape[-1]:] * scale
  rows = tuple(range(x.ndim - 1))  # contract over every leading (batch, length) axis
  # W's gradient is only computed where W trains (full tuning with LoRA); XLA drops it otherwise.
  return (g_x, jnp.dot(g_R, a_IR.T), jnp.tensordot(x, g_O, (rows, rows)), jnp.tensordot(g_R, xd, (rows, rows)).T,
          jnp.tensordot(h_R, g_O, (rows, rows)))


lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd)


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
      y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def project(self, x, kernel, deterministic):
    """x W' for the configured variant (before the bias), W' = W ⊕ the LoRA factors."""
    cfg = self.lora
    a, b = _get(self, "lora", "a").astype(self.dtype), _get(self, "lora", "b").astype(self.dtype)
    xd = nn.Dropout(cfg.dropout)(x, deterministic=deterministic) if cfg.dropout else x
    if cfg.variant == "pissa":  # the base keeps its principal part: subtract the frozen initial factors (the two
      # products are computed alike, so at init the output is the base output exactly).
      a0, b0 = _get(self, "lora_init", "a").astype(self.dtype), _get(self, "lora_init", "b").astype(self.dtype)
      return jnp.dot(x, kernel.astype(self.dtype)) + (low_rank(xd, a, b, cfg.scale) - low_rank(xd, a0, b0, cfg.scale))
    y = lora_dense(x, xd, kernel.astype(self.dtype), a, b, cfg.scale)
    if cfg.variant == "lora":
      return y
    # DoRA: magnitude m times the unit-norm direction of W + s A B; the norm is not differentiated (DoRA §4.3).
    w = kernel.astype(jnp.float32) + cfg.scale * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    ratio = _get(self, "lora", "m").astype(jnp.float32) / jax.lax.stop_gradient(_column_norm(w))
    return (y * ratio).astype(y.dtype)


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
    logits = jnp.dot(h_BLD, kernel_DV.astype(self.dtype))
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


def _init_target(cfg: LoraConfig, kind: str, w, key):
  """LoRA variables of one target from its base weight w ([in, out]; the embedding is [V, D])."""
  if kind == "embed":
    return {"lora": {"embed_a": jax.random.normal(key, (w.shape[0], cfg.rank), w.dtype),
                     "embed_b": jnp.zeros((cfg.rank, w.shape[1]), w.dtype)}}
  if kind.startswith("unembed"):  # tied: w is the embedding [V, D]; untied: unembed [D, V].
    d, v = (w.shape[1], w.shape[0]) if kind == "unembed_tied" else w.shape
    bound = 1.0 / math.sqrt(d)
    return {"lora": {"unembed_a": jax.random.uniform(key, (d, cfg.rank), w.dtype, -bound, bound),
                     "unembed_b": jnp.zeros((cfg.rank, v), w.dtype)}}
  n_in, n_out = w.shape
  if cfg.variant == "pissa":  # principal singular directions of W, split evenly between A and B.
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[: cfg.rank] / cfg.scale)
    a, b = (u[:, : cfg.rank] * root).astype(w.dtype), (root[:, None] * vt[: cfg.rank]).astype(w.dtype)
    return {"lora": {"a": a, "b": b}, "lora_init": {"a": a, "b": b}}
  bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming-uniform(a=sqrt(5)) for A.
  cols = {"lora": {"a": jax.random.uniform(key, (n_in, cfg.rank), w.dtype, -bound, bound),
                   "b": jnp.zeros((cfg.rank, n_out), w.dtype)}}
  if cfg.variant == "dora":
    cols["lora"]["m"] = _column_norm(w).astype(w.dtype)
  return cols


def init(cfg: LoraConfig, params, key, tied: bool = True) -> dict:
  """LoRA collections for a base params tree (unboxed arrays): {'lora': ..., and 'lora_init' for PiSSA}."""
  params = nn.meta.unbox(params)
  counter = iter(range(1 << 30))
  return _walk(params, cfg, lambda kind, _, w: _init_target(cfg, kind, w, jax.random.fold_in(key, next(counter))),
               tied)


def logical_axes(cfg: LoraConfig, param_axes, tied: bool = True) -> dict:
  """Logical axis names (PartitionSpec-like tuples) of the trees `init` returns, from the params' axes."""
  def fn(kind, _, axes):
    axes = tuple(axes)
    if kind == "embed":
      return {"lora": {"embed_a": (axes[0], "lora_rank"), "embed_b": ("lora_rank", axes[1])}}
    if kind.startswith("unembed"):
      return {"lora": {"unembed_a": ("embed", "lora_rank"), "unembed_b": ("lora_rank", "vocab")}}
    ab = {"a": (axes[0], "lora_rank"), "b": ("lora_rank", axes[1])}
    cols = {"lora": dict(ab, **({"m": (axes[1],)} if cfg.variant == "dora" else {}))}
    if cfg.variant == "pissa":
      cols["lora_init"] = dict(ab)
    return cols
  return _walk(param_axes, cfg, fn, tied)


def _merge_kernel(cfg: LoraConfig, w, a, b, m=None, a0=None, b0=None):
  """W' for one Dense target: what the forward computes, folded into one matrix."""
  f32 = lambda t: t.astype(jnp.float32)
  w32 = f32(w)
  if cfg.variant == "dora":
    v = w32 + cfg.scale * f32(a) @ f32(b)
    return (v * (f32(m) / _column_norm(v))).astype(w.dtype)
  delta = f32(a) @ f32(b)
  if cfg.variant == "pissa":
    delta = delta - f32(a0) @ f32(b0)
  return (w32 + cfg.scale * delta).astype(w.dtype)


def merge(model_cfg, params, collections) -> tuple:
  """θ'_τ = θ_τ ⊕ θ_PEFT: returns (merged params, the config to run them with: no LoRA, untied if needed)."""
  cfg: LoraConfig = model_cfg.lora
  params = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(params))  # a copy we may edit
  lora_t, init_t = collections["lora"], collections.get("lora_init", {})
  untie = model_cfg.tie_embeddings and bool(set(cfg.targets) & set(EMBED_TARGETS))

  def rec(node, lnode, inode):
    for name, child in lnode.items():
      if name == "embedder":
        emb = node["embedder"]
        base_e = emb["embedding"]
        if untie:
          emb["unembed"] = base_e.T
        if "embed_a" in child:
          emb["embedding"] = (base_e + cfg.scale * child["embed_a"] @ child["embed_b"]).astype(base_e.dtype)
        if "unembed_a" in child:
          u = emb["unembed"]
          emb["unembed"] = (u + cfg.scale * child["unembed_a"] @ child["unembed_b"]).astype(u.dtype)
      elif "a" in child and not isinstance(child["a"], dict):
        ini = inode.get(name, {})
        node[name]["kernel"] = _merge_kernel(cfg, node[name]["kernel"], child["a"], child["b"], child.get("m"),
                                             ini.get("a"), ini.get("b"))
      else:
        rec(node[name], child, inode.get(name, {}))

  rec(params, lora_t, init_t)
  merged_cfg = dataclasses.replace(model_cfg, lora=None, tie_embeddings=model_cfg.tie_embeddings and not untie)
  return params, merged_cfg


def unmerge(model_cfg, merged_params, collections):
  """θ_τ from θ'_τ and θ_PEFT (LoRA and PiSSA). DoRA cannot be unmerged: W' keeps only the direction of
  W + sAB rescaled to m, so W itself is not recoverable from W' and the adapter."""
  cfg: LoraConfig = model_cfg.lora
  if cfg.variant == "dora":
    raise ValueError("unmerge: DoRA's merged weight m * V/||V|| does not determine W; keep the base checkpoint")
  negate_b = lambda path, x: -x if path[-1].key in ("b", "embed_b", "unembed_b") else x
  neg = {"lora": jax.tree_util.tree_map_with_path(negate_b, collections["lora"])}
  if "lora_init" in collections:
    neg["lora_init"] = jax.tree_util.tree_map_with_path(negate_b, collections["lora_init"])
  params, _ = merge(dataclasses.replace(model_cfg, tie_embeddings=False), merged_params, neg)
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
