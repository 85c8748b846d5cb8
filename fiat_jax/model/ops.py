"""The decoder's hand-written compute kernels, each a plain reference beside the form the CPU step runs.

attention.py picks attention by backend (`Config.kernels`); on the CPU its "fused" choice, and the CPU's gated unit,
LoRA products and plain projections, are the custom VJPs here, shaped for XLA's CPU backend (why each is shaped as
it is, with its measurements: benchmarks/README.md). On GPUs and TPUs the same calls take the plain forms, whose
autodiff XLA's accelerator backends schedule well: a CPU-only speed-up never becomes an accelerator's path.
Axis legend as in transformer.py.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -2.3819763e38  # a finite "minus infinity": fully masked rows stay NaN-free.
QUERY_BLOCK = 128  # fused causal attention without a cache runs in query blocks of this many rows
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}


def on_cpu() -> bool:
  """Whether the CPU-shaped custom VJPs apply (JAX's default backend is the CPU)."""
  return jax.default_backend() == "cpu"


# ---- Attention ---------------------------------------------------------------------------------------------------

def attention(q_BLHE, k_BKSE, v_BKSE, mask_BLS, softcap, kernels: str, causal: bool):
  """softmax(q k^T, masked, optionally soft-capped) v -> [B, L, H, E]; q comes scaled; kernels: fused | reference.

  k and v are head-major (the KV cache's layout). `causal`: no key past a query's own slot is visible (no cache,
  no prefix), which lets the fused form skip the key blocks above the diagonal.
  """
  B, L, H, E = q_BLHE.shape
  K = k_BKSE.shape[1]
  # Head-major: G and L adjacent, so every product is one [G*L, E] x [E, S] (or its transpose) per batch row and
  # kv head, with no copy of k or v per query head.
  q_BKGLE = q_BLHE.reshape(B, L, K, H // K, E).transpose(0, 2, 3, 1, 4)
  if kernels == "reference":
    out_BKGLE = reference_attention(q_BKGLE, k_BKSE, v_BKSE, mask_BLS, softcap)
  elif causal and L % QUERY_BLOCK == 0 and L > QUERY_BLOCK:
    # Query block i sees no key past its last row: the all-masked blocks above the diagonal are never computed.
    Q = QUERY_BLOCK
    out_BKGLE = jnp.concatenate([fused_attention(q_BKGLE[:, :, :, i:i + Q], k_BKSE[:, :, :i + Q],
                                                 v_BKSE[:, :, :i + Q], mask_BLS[:, i:i + Q, :i + Q], softcap)
                                 for i in range(0, L, Q)], axis=3)
  else:
    out_BKGLE = fused_attention(q_BKGLE, k_BKSE, v_BKSE, mask_BLS, softcap)
  return out_BKGLE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)


def _accumulator(dtype):
  """Products accumulate in float32, or in float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _capped_logits(q_BKGLE, k_BKSE, softcap):
  logits_BKGLS = jnp.einsum("BKGLE,BKSE->BKGLS", q_BKGLE, k_BKSE.astype(q_BKGLE.dtype),
                            preferred_element_type=_accumulator(q_BKGLE.dtype))
  return jnp.tanh(logits_BKGLS / softcap) * softcap if softcap else logits_BKGLS


def reference_attention(q_BKGLE, k_BKSE, v_BKSE, mask_BLS, softcap):
  """Plain softmax attention, differentiated by autodiff (keeps the [B, K, G, L, S] probabilities)."""
  logits_BKGLS = jnp.where(mask_BLS[:, None, None], _capped_logits(q_BKGLE, k_BKSE, softcap), NEG_INF)
  return jnp.einsum("BKGLS,BKSE->BKGLE", jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BKSE.dtype), v_BKSE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_attention(q, k, v, mask_BLS, softcap):
  """reference_attention whose backward pass recomputes the probabilities from q, k and each row's max and sum
  (as FlashAttention does): a layer keeps q, k, v, its output and [B, K, G, L] floats, no [.., L, S] tensor."""
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


fused_attention.defvjp(_attend_fwd, _attend_bwd)


# ---- Gated MLP unit ------------------------------------------------------------------------------------------------

def gated_mlp(gate_BLF, up_BLF, activation: str, kernels: str):
  """act(gate) * up, the gated (SwiGLU / GeGLU) unit: fused_gated under "fused", or "auto" on the CPU."""
  if kernels == "reference" or (kernels != "fused" and not on_cpu()):
    return ACTIVATIONS[activation](gate_BLF) * up_BLF
  return fused_gated(gate_BLF, up_BLF, activation)


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
def fused_gated(gate_BLF, up_BLF, activation):
  """act(gate) * up whose backward pass keeps only gate and up and recomputes act and act' from gate in the
  elementwise pass that forms both gradients (autodiff or remat would leave XLA keeping act(gate) or its sigmoid
  as well: one more [B, L, F] tensor per layer)."""
  return ACTIVATIONS[activation](gate_BLF) * up_BLF


def _gated_fwd(gate_BLF, up_BLF, activation):
  return ACTIVATIONS[activation](gate_BLF) * up_BLF, (gate_BLF, up_BLF)


def _gated_bwd(activation, residuals, g_BLF):
  gate_BLF, up_BLF = residuals
  act_BLF, dact_BLF = _activation_and_derivative(activation, gate_BLF)
  return g_BLF * up_BLF * dact_BLF, g_BLF * act_BLF


fused_gated.defvjp(_gated_fwd, _gated_bwd)


# ---- Projections (lora.py's Dense and Embed call this) ---------------------------------------------------------------

def dense_reference(x, w_IO):
  """x w over x's last axis, as jnp writes it (a batched product over x's leading axes)."""
  return jnp.dot(x, w_IO)


def dense(x, w_IO):
  """x w: _dense_2d on the CPU, dense_reference on accelerators."""
  return _dense_2d(x, w_IO) if on_cpu() else dense_reference(x, w_IO)


def _dense_2d(x, w_IO):
  """dense_reference as one 2-D product over x's flattened leading axes: the same values, and autodiff's weight
  gradient becomes one [rows, in]^T [rows, out] product of the operands as they are. From the batched form
  (contracting [B, L, in] with [B, L, out] over B and L) XLA's CPU backend first writes the output gradient
  transposed, [out, B*L]: in full fine-tuning the gated unit's backward pass then ran as such a strided copy for
  the gate's and the up projection's gradients of every layer, and the unembedding's gradient copied each chunk's
  [B*C, V] logit gradient (frozen weights, as under LoRA, get no gradient and no copy)."""
  return jnp.dot(x.reshape(-1, x.shape[-1]), w_IO).reshape(*x.shape[:-1], w_IO.shape[-1])


# ---- LoRA products (lora.py's variants call these) ------------------------------------------------------------------

def low_rank_reference(x, a_IR, b_RO, scale: float):
  """(x a) b * scale, differentiated by autodiff."""
  return jnp.dot(jnp.dot(x, a_IR), b_RO) * scale


def low_rank(x, a_IR, b_RO, scale: float):
  """(x a) b * scale: _low_rank_cpu on the CPU, low_rank_reference on accelerators."""
  return _low_rank_cpu(x, a_IR, b_RO, scale) if on_cpu() else low_rank_reference(x, a_IR, b_RO, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank_cpu(x, a_IR, b_RO, scale: float):
  """(x a) b * scale with the scale on the small rank-R intermediate, and a VJP in which each gradient is one
  matmul against a rank-R factor or intermediate (autodiff of the nested dots made XLA's CPU backend write the
  input gradients of wide projections in transposed form: a [F, B*L] copy per layer)."""
  return _low_rank_fwd(x, a_IR, b_RO, scale)[0]


def _low_rank_fwd(x, a_IR, b_RO, scale):
  h_R = jnp.dot(x, a_IR) * scale
  return jnp.dot(h_R, b_RO), (x, a_IR, b_RO, h_R)


def _low_rank_bwd(scale, res, g_O):
  x, a_IR, b_RO, h_R = res
  g_R = jnp.dot(g_O, b_RO.T) * scale
  rows = tuple(range(x.ndim - 1))  # contract over every leading (batch, length) axis
  return (jnp.dot(g_R, a_IR.T), jnp.tensordot(g_R, x, (rows, rows)).T, jnp.tensordot(h_R, g_O, (rows, rows)))


_low_rank_cpu.defvjp(_low_rank_fwd, _low_rank_bwd)


def lora_dense_reference(x, xd, w_IO, a_IR, b_RO, scale: float):
  """x W + (xd A) B · scale (xd: x after LoRA dropout, or x itself), differentiated by autodiff."""
  return jnp.dot(x, w_IO) + low_rank_reference(xd, a_IR, b_RO, scale)


def lora_dense(x, xd, w_IO, a_IR, b_RO, scale: float):
  """x W + (xd A) B · scale: _lora_dense_cpu on the CPU, lora_dense_reference on accelerators (where the
  concatenated [W; B] would copy every frozen weight each step)."""
  if on_cpu():
    return _lora_dense_cpu(x, xd, w_IO, a_IR, b_RO, scale)
  return lora_dense_reference(x, xd, w_IO, a_IR, b_RO, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lora_dense_cpu(x, xd, w_IO, a_IR, b_RO, scale: float):
  """lora_dense_reference as one matmul, [x, s xd A] @ [W; B]: one product writes the sum, so the layer keeps one
  [.., out] activation for the backward pass, not the base and LoRA outputs side by side (XLA fuses an add into
  each consumer and keeps both addends). The backward pass is again one product over both: g [W; B]^T gives x's
  gradient and the rank-R intermediate's."""
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


_lora_dense_cpu.defvjp(_lora_dense_fwd, _lora_dense_bwd)
