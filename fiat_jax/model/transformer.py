"""The decoder-only Transformer (Flax linen): one config expresses Llama, Qwen2, Mistral, Gemma 1/2/3 and T5X's
decoder-only prefix LM.

Axis legend, used in einsum strings and variable suffixes:
  B batch, L query length, S key/cache length, D model dim, H query heads, K kv heads, G query heads per kv
  head (H = K*G), E head dim, F mlp dim, V vocab, R LoRA rank.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiat_jax.model import attention
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import ops
from fiat_jax.model import stacking

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture of one decoder-only model; `hf.py` maps each Hugging Face family onto it."""
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU) | gelu | relu
  gated_mlp: bool = True
  norm_eps: float = 1e-6
  norm_plus_one: bool = False  # Gemma's RMSNorm: x * (1 + scale).
  qkv_bias: bool = False  # Qwen2.
  rope_theta: float = 10_000.0
  rope_local_theta: float | None = None  # Gemma 3: local layers use their own base.
  rope_scaling: tuple[tuple[str, float], ...] | None = None  # (("type","linear"|"llama3"), ("factor",8.0), ...)
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # Gemma: multiply embeddings by sqrt(D).
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # default head_dim: queries scaled by its -1/2 power.
  qk_norm: bool = False  # Gemma 3: RMSNorm over E of queries and keys.
  attention_pattern: tuple[str, ...] = ("global",)  # cycled over layers: "global" | "local"
  sliding_window: int | None = None  # key window of "local" layers.
  post_attn_norm: bool = False  # Gemma 2/3 post-norms.
  post_mlp_norm: bool = False
  parallel_block: bool = False  # PaLM: x + attn(norm(x)) + mlp(norm(x)).
  prefix_lm: bool = False  # T5X decoder-only: bidirectional attention over the inputs.
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"
  remat_policy: str = "none"  # what each block keeps for the backward pass: a key of REMAT_POLICIES
  scan_layers: bool = False  # one scanned block (params stacked on the "layers" axis) instead of a Python loop
  lora: lora_lib.LoraConfig | None = None
  kernels: str = "auto"  # attention (and the gated unit) by backend: attention.KERNELS

  def __post_init__(self):
    attention.check(self.kernels, self.attn_logit_softcap, self.prefix_lm)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy: {self.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)} "
                       f"(bind TrainConfig.remat_policy)")

  def layer_kind(self, i: int) -> str:
    return self.attention_pattern[i % len(self.attention_pattern)]


# Projections are named for jax.checkpoint_policies (checkpoint_name) as "<q|k|v|o|gate|up|down>_proj".
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: XLA keeps what autodiff needs
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each block's input only, recompute the rest
    "minimal": jax.checkpoint_policies.save_only_these_names(*_ATTN_PROJ, *_MLP_PROJ),  # the projections' outputs
    "save_dots_except_mlp": jax.checkpoint_policies.save_only_these_names(*_ATTN_PROJ),
    "save_qkv": jax.checkpoint_policies.save_only_these_names(*_ATTN_PROJ[:3]),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every weight product
}


def tiny_config(vocab_size: int = 259, **overrides) -> Config:
  """A few-thousand-parameter model for tests and the demo."""
  base = dict(vocab_size=vocab_size, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=64)
  base.update(overrides)
  return Config(**base)


def _logical(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """RMS normalisation in float32 (float64 for float64 inputs), optionally Gemma's (1 + scale) form."""
  cfg: Config
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", _logical(init, (self.axis_name,)), (x.shape[-1],), self.cfg.param_dtype)
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 and float32 inputs: float32
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.norm_eps)
    scale = scale.astype(acc)
    return (y * (1.0 + scale if self.cfg.norm_plus_one else scale)).astype(x.dtype)


def rope_inv_freq(cfg: Config, local: bool) -> Array:
  """Inverse frequencies [E/2] of rotary embeddings, with the configured scaling on global layers."""
  theta = cfg.rope_local_theta if (local and cfg.rope_local_theta) else cfg.rope_theta
  inv = 1.0 / theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim)
  if cfg.rope_scaling is None or (local and cfg.rope_local_theta):
    return inv
  s = dict(cfg.rope_scaling)
  if s["type"] == "linear":
    return inv / s["factor"]
  if s["type"] == "llama3":
    # Llama 3.1+: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
    low_wl = s["original_max_position"] / s["low_freq_factor"]
    high_wl = s["original_max_position"] / s["high_freq_factor"]
    wl = 2 * math.pi / inv
    smooth = (s["original_max_position"] / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    ramp = (1 - smooth) * inv / s["factor"] + smooth * inv
    return jnp.where(wl > low_wl, inv / s["factor"], jnp.where(wl < high_wl, inv, ramp))
  raise ValueError(f"rope_scaling type {s['type']!r} is not supported (linear, llama3)")


def apply_rope(x_BLNE, positions_BL, inv_freq):
  """Rotates (first half, second half) pairs of the head dim: the Hugging Face weight layout. In float32 (x in
  float64 for float64 inputs; the angles stay float32)."""
  angles_BLE2 = positions_BL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_BLE2)[:, :, None], jnp.cos(angles_BLE2)[:, :, None]
  x1, x2 = jnp.split(x_BLNE.astype(jnp.promote_types(x_BLNE.dtype, jnp.float32)), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNE.dtype)


def attention_mask(q_slot_L, k_slot_S, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS, q_bidir_BL, k_bidir_BS, window,
                   local=True):
  """[B, L, S] bool: same segment, and causal in slot order (or both inside the bidirectional prefix), and
  within the sliding window (in position space) when one is given and `local` (a traced flag under scan) holds."""
  causal = k_slot_S[None, None, :] <= q_slot_L[None, :, None]
  bidir = q_bidir_BL[:, :, None] & k_bidir_BS[:, None, :]
  mask = (q_seg_BL[:, :, None] == k_seg_BS[:, None, :]) & (causal | bidir)
  if window is not None:
    mask &= ((q_pos_BL[:, :, None] - k_pos_BS[:, None, :]) < window) | jnp.logical_not(local)
  return mask


def _select(local, f):
  """f(True) on local layers, f(False) on global ones; `local` is a Python bool, or a traced one under scan."""
  if isinstance(local, bool):
    return f(local)
  return jnp.where(local, f(True), f(False))


class Attention(nn.Module):
  """Multi-head / grouped-query attention with RoPE, optional q/k norm, soft-capping and a KV cache."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_BL, bidir_BL, local, cache, deterministic):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = functools.partial(_projection, cfg)
    B, L, _ = x_BLD.shape
    q_BLHE = dense(H * E, ("embed", "q_heads"), "q", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, H, E)
    k_BLKE = dense(K * E, ("embed", "kv_heads"), "k", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, K, E)
    v_BLKE = dense(K * E, ("embed", "kv_heads"), "v", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, K, E)
    if cfg.qk_norm:
      q_BLHE = RMSNorm(cfg, "head_dim", name="q_norm")(q_BLHE)
      k_BLKE = RMSNorm(cfg, "head_dim", name="k_norm")(k_BLKE)
    inv_freq = _select(local, lambda loc: rope_inv_freq(cfg, loc))
    q_BLHE = apply_rope(q_BLHE, positions_BL, inv_freq)
    k_BLKE = apply_rope(k_BLKE, positions_BL, inv_freq)
    q_BLHE = q_BLHE * jnp.asarray((cfg.query_pre_attn_scalar or E) ** -0.5, q_BLHE.dtype)

    q_slot_L = jnp.arange(L)
    k_BKSE, v_BKSE = k_BLKE.transpose(0, 2, 1, 3), v_BLKE.transpose(0, 2, 1, 3)  # head-major, as the cache is
    if cache is None:
      k_slot_S = q_slot_L
      k_pos, k_seg, k_bidir = positions_BL, segment_BL, bidir_BL
      new_cache = None
    else:  # Write this chunk at cache["index"]; attend over every slot written so far.
      idx = cache["index"]
      upd = lambda buf, new, axis=1: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), idx, axis=axis)
      k_BKSE, v_BKSE = upd(cache["k"], k_BKSE, axis=2), upd(cache["v"], v_BKSE, axis=2)
      k_pos, k_seg = upd(cache["positions"], positions_BL), upd(cache["segments"], segment_BL)
      k_bidir = upd(jnp.zeros_like(cache["segments"], bool), bidir_BL)  # the prefix is only this chunk
      k_slot_S, q_slot_L = jnp.arange(k_BKSE.shape[2]), q_slot_L + idx
      new_cache = dict(k=k_BKSE, v=v_BKSE)
    window = cfg.sliding_window if local is not False else None  # a traced `local` keeps the window's mask
    mask_BLS = attention_mask(q_slot_L, k_slot_S, positions_BL, k_pos, segment_BL, k_seg, bidir_BL, k_bidir, window,
                              local)
    out_BLHE = attention.attend(q_BLHE, k_BKSE, v_BKSE, mask_BLS, segments=(segment_BL, k_seg),
                                window=window, local=local, softcap=cfg.attn_logit_softcap,
                                kernels=cfg.kernels, causal=cache is None and not cfg.prefix_lm,
                                prefix_lm=cfg.prefix_lm)
    out_BLD = dense(cfg.embed_dim, ("q_heads", "embed"), "o")(out_BLHE.reshape(B, L, H * E), deterministic)
    return out_BLD, new_cache


def _projection(cfg: Config, features: int, axes, name: str, bias: bool = False):
  """lora.Dense whose output is tagged "<name>_proj" for the remat policies (jax.checkpoint_policies)."""
  module = lora_lib.Dense(features, axes=axes, use_bias=bias, lora=cfg.lora, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name=name)
  return lambda x, deterministic: jax.ad_checkpoint.checkpoint_name(module(x, deterministic), f"{name}_proj")


class Mlp(nn.Module):
  """Gated (SwiGLU / GeGLU) or plain feed-forward block."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BLD, deterministic):
    cfg = self.cfg
    dense = functools.partial(_projection, cfg)
    first = dense(cfg.mlp_dim, ("embed", "mlp"), "gate" if cfg.gated_mlp else "up")(x_BLD, deterministic)
    if cfg.gated_mlp:
      h_BLF = ops.gated_mlp(first, dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x_BLD, deterministic),
                            cfg.activation, cfg.kernels)
    else:
      h_BLF = ops.ACTIVATIONS[cfg.activation](first)
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
    return dense(cfg.embed_dim, ("mlp", "embed"), "down")(h_BLF, deterministic)


class Block(nn.Module):
  """One decoder layer: pre-norms, optional post-norms, sequential or parallel attention + MLP.

  `local`: a sliding-window layer (a Python bool, or a traced one when scanned); `layer_kv` this layer's cache
  (k, v) and `shared` the cache's index, positions and segments, both None without a cache."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_BL, bidir_BL, local, layer_kv, shared, deterministic):
    cfg = self.cfg
    cache = None if layer_kv is None else dict(layer_kv, **shared)
    h = RMSNorm(cfg, name="pre_attn_norm")(x_BLD)
    attn, new_cache = Attention(cfg, name="attn")(h, positions_BL, segment_BL, bidir_BL, local, cache, deterministic)
    if cfg.post_attn_norm:
      attn = RMSNorm(cfg, name="post_attn_norm")(attn)
    if cfg.parallel_block:
      x_BLD = x_BLD + attn + Mlp(cfg, name="mlp")(h, deterministic)
    else:
      x_BLD = x_BLD + attn
      m = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x_BLD), deterministic)
      if cfg.post_mlp_norm:
        m = RMSNorm(cfg, name="post_mlp_norm")(m)
      x_BLD = x_BLD + m
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), new_cache


class Transformer(nn.Module):
  """Token ids [B, L] -> logits [B, L, V] (float32), and the updated KV cache when one is given."""
  cfg: Config

  def setup(self):
    cfg = self.cfg
    self.embedder = lora_lib.Embed(cfg.vocab_size, cfg.embed_dim, lora=cfg.lora, param_dtype=cfg.param_dtype,
                                   dtype=cfg.dtype, tied=cfg.tie_embeddings)
    policy = REMAT_POLICIES[cfg.remat_policy]
    block = Block
    if cfg.remat_policy != "none":  # self is argument 0: deterministic is 8, an unrolled layer's `local` 5
      block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers,
                       static_argnums=(8,) if cfg.scan_layers else (5, 8))
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: stacking.AXIS})
      self.layers = scanned(cfg, name=stacking.SCANNED)
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, bidirectional_BL=None, cache=None,
               deterministic=True, return_hidden=False):
    """Args: positions default to 0..L-1; segment ids (0 = padding) default to ones; `bidirectional_BL` marks the
    prefix-LM inputs (seqio's decoder_causal_attention); `cache` comes from `init_cache`."""
    cfg = self.cfg
    B, L = tokens_BL.shape
    positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BL is None else positions_BL
    segment_BL = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    bidir_BL = (jnp.zeros((B, L), bool) if bidirectional_BL is None or not cfg.prefix_lm
                else bidirectional_BL.astype(bool))
    x_BLD = self.embedder(tokens_BL, deterministic)
    if cfg.scale_embeddings:
      x_BLD = x_BLD * jnp.asarray(math.sqrt(cfg.embed_dim), x_BLD.dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
    shared = None if cache is None else {k: cache[k] for k in ("index", "positions", "segments")}
    kinds = [cfg.layer_kind(i) == "local" for i in range(cfg.num_layers)]
    if cfg.scan_layers:  # one traced block; the cache's k and v are stacked [layers, ...] like the params
      kv = None if cache is None else cache["layers"]
      x_BLD, new_layers = self.layers(x_BLD, positions_BL, segment_BL, bidir_BL, jnp.asarray(kinds), kv, shared,
                                      deterministic)
    else:
      new_layers = []
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else cache["layers"][i]
        x_BLD, c = layer(x_BLD, positions_BL, segment_BL, bidir_BL, kinds[i], kv, shared, deterministic)
        new_layers.append(c)
    h_BLD = self.final_norm(x_BLD)
    new_cache = None
    if cache is not None:
      upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), cache["index"], axis=1)
      new_cache = dict(layers=new_layers, index=cache["index"] + L, positions=upd(cache["positions"], positions_BL),
                       segments=upd(cache["segments"], segment_BL))
    return (h_BLD if return_hidden else self.logits(h_BLD, deterministic)), new_cache

  def logits(self, h_BLD, deterministic=True):
    """Final hidden states -> float32 logits, soft-capped when configured (exposed for chunked losses)."""
    logits_BLV = self.embedder.attend(h_BLD, deterministic).astype(jnp.float32)
    if self.cfg.final_logit_softcap:
      logits_BLV = jnp.tanh(logits_BLV / self.cfg.final_logit_softcap) * self.cfg.final_logit_softcap
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache: segment 0 marks unwritten slots, which no real token attends to."""
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # head-major, as attention reads it
  dtype = dtype or cfg.dtype
  if cfg.scan_layers:
    layers = dict(k=jnp.zeros((cfg.num_layers, *shape), dtype), v=jnp.zeros((cfg.num_layers, *shape), dtype))
  else:
    layers = [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
  return dict(layers=layers,
              index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch, max_len), jnp.int32),
              segments=jnp.zeros((batch, max_len), jnp.int32))


def init_params(cfg: Config, key, batch: int = 1, length: int = 8):
  """Random base parameters (the 'params' collection, with logical-axis metadata boxes)."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  # The parameters do not depend on the kernels; the plain form initialises at any length.
  return Transformer(dataclasses.replace(cfg, lora=None, kernels="reference")).init(key, tokens)["params"]
