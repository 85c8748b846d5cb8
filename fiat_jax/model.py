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

from fiat_jax import lora as lora_lib

Array = jax.Array
NEG_INF = -2.3819763e38  # a finite "minus infinity": fully masked rows stay NaN-free.


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
  remat: bool = False  # rematerialise each block in the backward pass.
  lora: lora_lib.LoraConfig | None = None

  def layer_kind(self, i: int) -> str:
    return self.attention_pattern[i % len(self.attention_pattern)]


def tiny_config(vocab_size: int = 259, **overrides) -> Config:
  """A few-thousand-parameter model for tests and the demo."""
  base = dict(vocab_size=vocab_size, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=64)
  base.update(overrides)
  return Config(**base)


def _logical(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """RMS normalisation in float32, optionally Gemma's (1 + scale) form."""
  cfg: Config
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", _logical(init, (self.axis_name,)), (x.shape[-1],), self.cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    scale = scale.astype(jnp.float32)
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
  """Rotates (first half, second half) pairs of the head dim: the Hugging Face weight layout."""
  angles_BLE2 = positions_BL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_BLE2)[:, :, None], jnp.cos(angles_BLE2)[:, :, None]
  x1, x2 = jnp.split(x_BLNE.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNE.dtype)


def attention_mask(q_slot_L, k_slot_S, q_pos_BL, k_pos_BS, q_seg_BL, k_seg_BS, q_bidir_BL, k_bidir_BS, window):
  """[B, L, S] bool: same segment, and causal in slot order (or both inside the bidirectional prefix), and
  within the sliding window (in position space) when one is given."""
  causal = k_slot_S[None, None, :] <= q_slot_L[None, :, None]
  bidir = q_bidir_BL[:, :, None] & k_bidir_BS[:, None, :]
  mask = (q_seg_BL[:, :, None] == k_seg_BS[:, None, :]) & (causal | bidir)
  if window is not None:
    mask &= (q_pos_BL[:, :, None] - k_pos_BS[:, None, :]) < window
  return mask


QUERY_BLOCK = 128  # causal attention without a cache runs in query blocks of this many rows


def _accumulator(dtype):
  """Products accumulate in float32, or in float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _capped_logits(q_BKGLE, k_BKSE, softcap):
  logits_BKGLS = jnp.einsum("BKGLE,BKSE->BKGLS", q_BKGLE, k_BKSE.astype(q_BKGLE.dtype),
                            preferred_element_type=_accumulator(q_BKGLE.dtype))
  return jnp.tanh(logits_BKGLS / softcap) * softcap if softcap else logits_BKGLS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask_BLS, softcap):
  """softmax(q k^T, masked) v for one set of query rows ([B, K, G, L, E], also the output's shape) against one set
  of key slots (k and v [B, K, S, E]), under mask_BLS.

  The backward pass keeps no [B, K, G, L, S] tensor: it recomputes the probabilities from q, k and the rows' max and
  sum (as FlashAttention does), so a layer keeps only q, k, v, its output and [B, K, G, L] floats."""
  return _attend_fwd(q, k, v, mask_BLS, softcap)[0]


def _attend_fwd(q, k, v, mask_BLS, softcap):
  logits_BKGLS = jnp.where(mask_BLS[:, None, None], _capped_logits(q, k, softcap), NEG_INF)
  max_BKGL1 = jnp.max(logits_BKGLS, axis=-1, keepdims=True)
  exp_BKGLS = jnp.exp(logits_BKGLS - max_BKGL1)
  sum_BKGL1 = jnp.sum(exp_BKGLS, axis=-1, keepdims=True)
  probs_BKGLS = (exp_BKGLS / sum_BKGL1).astype(v.dtype)
  out = jnp.einsum("BKGLS,BKSE->BKGLE", probs_BKGLS, v)
  # The row max and sum rather than their log-sum-exp: a fully masked row's max is NEG_INF, beside which
  # log(S) vanishes in float32.
  return out, (q, k, v, mask_BLS, out, max_BKGL1, sum_BKGL1)


def _attend_bwd(softcap, residuals, g):
  # The scores are recomputed, transposed ([S, L]), in ONE batched product with dP = g v^T: stacking (k, v) against
  # (q, g) makes the recomputation depend on the cotangent, so XLA can neither merge it with the forward's product
  # nor schedule it before the backward pass reaches this layer (either would keep the probabilities alive after
  # all; XLA's CPU pipeline drops optimization barriers, so a barrier would not do).
  q, k, v, mask_BLS, out, max_BKGL1, sum_BKGL1 = residuals
  acc = _accumulator(q.dtype)
  both_2BKGSL = jnp.einsum("TBKSE,TBKGLE->TBKGSL", jnp.stack([k, v]).astype(q.dtype),
                           jnp.stack([q, g.astype(q.dtype)]), preferred_element_type=acc)
  logits_BKGSL, g_probs_BKGSL = both_2BKGSL[0], both_2BKGSL[1]
  mask_BKGSL = jnp.swapaxes(mask_BLS, 1, 2)[:, None, None]
  if softcap:
    logits_BKGSL = jnp.tanh(logits_BKGSL / softcap) * softcap
  probs_BKGSL = (jnp.exp(jnp.where(mask_BKGSL, logits_BKGSL, NEG_INF) - jnp.swapaxes(max_BKGL1, -1, -2))
                 / jnp.swapaxes(sum_BKGL1, -1, -2))
  g_v = jnp.einsum("BKGSL,BKGLE->BKSE", probs_BKGSL.astype(v.dtype), g.astype(v.dtype), preferred_element_type=acc)
  # softmax's VJP, p (g - sum(p g)), with sum_S p g = sum_E out g_out.
  row_BKG1L = jnp.einsum("BKGLE,BKGLE->BKGL", g, out, preferred_element_type=acc)[..., None, :]
  g_logits_BKGSL = jnp.where(mask_BKGSL, probs_BKGSL * (g_probs_BKGSL - row_BKG1L), 0.0)
  if softcap:
    g_logits_BKGSL = g_logits_BKGSL * (1.0 - jnp.square(logits_BKGSL / softcap))
  g_logits_BKGSL = g_logits_BKGSL.astype(q.dtype)
  g_q = jnp.einsum("BKGSL,BKSE->BKGLE", g_logits_BKGSL, k.astype(q.dtype), preferred_element_type=acc)
  g_k = jnp.einsum("BKGSL,BKGLE->BKSE", g_logits_BKGSL, q, preferred_element_type=acc)
  return g_q.astype(q.dtype), g_k.astype(k.dtype), g_v.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nn.Module):
  """Multi-head / grouped-query attention with RoPE, optional q/k norm, soft-capping and a KV cache."""
  cfg: Config
  local: bool

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_BL, bidir_BL, cache, deterministic):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda n, axes, name, bias=False: lora_lib.Dense(n, axes=axes, use_bias=bias, lora=cfg.lora,
                                                             dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    B, L, _ = x_BLD.shape
    q_BLHE = dense(H * E, ("embed", "q_heads"), "q", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, H, E)
    k_BLKE = dense(K * E, ("embed", "kv_heads"), "k", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, K, E)
    v_BLKE = dense(K * E, ("embed", "kv_heads"), "v", cfg.qkv_bias)(x_BLD, deterministic).reshape(B, L, K, E)
    if cfg.qk_norm:
      q_BLHE = RMSNorm(cfg, "head_dim", name="q_norm")(q_BLHE)
      k_BLKE = RMSNorm(cfg, "head_dim", name="k_norm")(k_BLKE)
    inv_freq = rope_inv_freq(cfg, self.local)
    q_BLHE = apply_rope(q_BLHE, positions_BL, inv_freq)
    k_BLKE = apply_rope(k_BLKE, positions_BL, inv_freq)
    q_BLHE = q_BLHE * jnp.asarray((cfg.query_pre_attn_scalar or E) ** -0.5, q_BLHE.dtype)

    q_slot_L = jnp.arange(L)
    k_BKSE, v_BKSE = k_BLKE.transpose(0, 2, 1, 3), v_BLKE.transpose(0, 2, 1, 3)  # head-major, see below
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
    mask_BLS = attention_mask(q_slot_L, k_slot_S, positions_BL, k_pos, segment_BL, k_seg, bidir_BL, k_bidir,
                              cfg.sliding_window if self.local else None)
    # Head-major: G and L adjacent, so every product is one [G*L, E] x [E, S] (or its transpose) per batch row and
    # kv head, with no copy of k or v per query head (the cache is kept in this layout too).
    q_BKGLE = q_BLHE.reshape(B, L, K, H // K, E).transpose(0, 2, 3, 1, 4)
    attend = lambda i, j, keys: _attend(q_BKGLE[:, :, :, i:j], k_BKSE[:, :, :keys], v_BKSE[:, :, :keys],
                                        mask_BLS[:, i:j, :keys], cfg.attn_logit_softcap)
    Q = QUERY_BLOCK
    if cache is None and not cfg.prefix_lm and L % Q == 0 and L > Q:
      # Causal over slots 0..L-1: query block i cannot see keys past its last row, so the blocks above the
      # diagonal (all masked) are never computed: 10 of 16 at L = 4Q.
      out_BKGLE = jnp.concatenate([attend(i, i + Q, i + Q) for i in range(0, L, Q)], axis=3)
    else:
      out_BKGLE = attend(0, L, k_BKSE.shape[2])
    out_BLKGE = out_BKGLE.transpose(0, 3, 1, 2, 4)
    out_BLD = dense(cfg.embed_dim, ("q_heads", "embed"), "o")(out_BLKGE.reshape(B, L, H * E), deterministic)
    return out_BLD, new_cache


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}
_GELU_C = math.sqrt(2 / math.pi)


def _activation_and_derivative(activation, x):
  """(act(x), act'(x)) for the gated unit's backward pass, written so that they share no operation with the
  forward's act(x): XLA would merge a shared one with the forward's and keep it alive until the backward pass (and
  its scheduler runs anything that depends only on forward values as early as it can, so a recomputation that
  equals the forward would be kept all the same)."""
  if activation == "silu":  # sigmoid through tanh; the forward's goes through the logistic function
    s = 0.5 + 0.5 * jnp.tanh(0.5 * x)
    return x * s, s * (1 + x * (1 - s))
  if activation == "gelu_tanh":  # tanh through the logistic function; the forward's is a tanh
    u = _GELU_C * (x + 0.044715 * x ** 3)
    t = 2 * jax.nn.sigmoid(2 * u) - 1
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)
  act, vjp = jax.vjp(ACTIVATIONS[activation], x)
  return act, vjp(jnp.ones_like(x))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated(gate_BLF, up_BLF, activation):
  """act(gate) * up, whose backward pass keeps only gate and up and recomputes act and act' from gate in the
  elementwise pass that forms both gradients (autodiff, or remat of the product, left XLA keeping act(gate) or its
  sigmoid as well: one more [B, L, F] tensor per layer)."""
  return ACTIVATIONS[activation](gate_BLF) * up_BLF


def _gated_fwd(gate_BLF, up_BLF, activation):
  return ACTIVATIONS[activation](gate_BLF) * up_BLF, (gate_BLF, up_BLF)


def _gated_bwd(activation, residuals, g_BLF):
  gate_BLF, up_BLF = residuals
  act_BLF, dact_BLF = _activation_and_derivative(activation, gate_BLF)
  return g_BLF * up_BLF * dact_BLF, g_BLF * act_BLF


gated.defvjp(_gated_fwd, _gated_bwd)


class Mlp(nn.Module):
  """Gated (SwiGLU / GeGLU) or plain feed-forward block."""
  cfg: Config

  @nn.compact
  def __call__(self, x_BLD, deterministic):
    cfg = self.cfg
    dense = lambda n, axes, name: lora_lib.Dense(n, axes=axes, lora=cfg.lora, dtype=cfg.dtype,
                                                 param_dtype=cfg.param_dtype, name=name)
    first = dense(cfg.mlp_dim, ("embed", "mlp"), "gate" if cfg.gated_mlp else "up")(x_BLD, deterministic)
    if cfg.gated_mlp:
      h_BLF = gated(first, dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x_BLD, deterministic), cfg.activation)
    else:
      h_BLF = ACTIVATIONS[cfg.activation](first)
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
    return dense(cfg.embed_dim, ("mlp", "embed"), "down")(h_BLF, deterministic)


class Block(nn.Module):
  """One decoder layer: pre-norms, optional post-norms, sequential or parallel attention + MLP."""
  cfg: Config
  local: bool

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_BL, bidir_BL, cache, deterministic):
    cfg = self.cfg
    h = RMSNorm(cfg, name="pre_attn_norm")(x_BLD)
    attn, new_cache = Attention(cfg, self.local, name="attn")(h, positions_BL, segment_BL, bidir_BL, cache,
                                                              deterministic)
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
    block = nn.remat(Block, static_argnums=(6,)) if cfg.remat else Block
    self.layers = [block(cfg, cfg.layer_kind(i) == "local", name=f"layer_{i}") for i in range(cfg.num_layers)]
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
    new_layers = []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else dict(cache["layers"][i], index=cache["index"],
                                                    positions=cache["positions"], segments=cache["segments"])
      x_BLD, c = layer(x_BLD, positions_BL, segment_BL, bidir_BL, layer_cache, deterministic)
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
  return dict(layers=[dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)],
              index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch, max_len), jnp.int32),
              segments=jnp.zeros((batch, max_len), jnp.int32))


def init_params(cfg: Config, key, batch: int = 1, length: int = 8):
  """Random base parameters (the 'params' collection, with logical-axis metadata boxes)."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  return Transformer(dataclasses.replace(cfg, lora=None)).init(key, tokens)["params"]
