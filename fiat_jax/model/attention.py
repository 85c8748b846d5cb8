"""Attention by backend, behind one switch (`Config.kernels`): the field's kernels where they fit, ops.py's
hand-written forms on the CPU.

  auto          TPU: "splash"; GPU: "cudnn" (bf16 / fp16 without soft-capping), else "triton"; CPU: "fused"
                (measured faster than "xla_chunked" on the CPU: benchmarks/README.md). What a kernel cannot express (the prefix-LM mask
                for splash) falls to "xla_chunked", never to a CPU-only form.
  splash        JAX's Pallas TPU splash attention (segment ids, causal or sliding-window block masks, soft-capping,
                GQA as one multi-query kernel per kv head); on a CPU it runs in Pallas' interpret mode (tests only).
                On a multi-device mesh it runs under jax.shard_map (batch and heads split as the logical-axis rules
                split the activations), each device on its own shard: tested on 8 fake CPU devices in interpret
                mode, not yet on a TPU.
  cudnn         jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on NVIDIA GPUs.
  triton        tokamax's Pallas Triton flash attention (GPU).
  xla_chunked   tokamax's chunked XLA attention: memory linear in length on every backend (the TPU's prefix LM).
  xla_attention jax.nn.dot_product_attention's XLA path (materialises [B, H, L, S] scores).
  fused         ops.fused_attention: CPU-shaped custom VJP in query blocks.
  reference     plain jnp, autodiff.

With a KV cache (prefill and decoding) attention reads an explicit mask over the cache's slots: splash cannot hold
it, so there it is "xla_chunked"; every other kernel takes the mask as it is. Axis legend as in transformer.py.
"""
import math

from absl import flags
import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
import jax.numpy as jnp
import tokamax

from fiat_jax.model import ops

KERNELS = ("auto", "splash", "cudnn", "triton", "xla_chunked", "xla_attention", "fused", "reference")
_NO_SOFTCAP = ("cudnn", "xla_attention")  # jax.nn.dot_product_attention has no logit soft-capping
_STATIC_MASK = ("splash",)  # block masks fixed at trace time: no per-example prefix


def check(kernels: str, softcap: float | None, prefix_lm: bool):
  """Raises (naming Config.kernels) if the name is unknown or the kernel cannot express the configured attention."""
  if kernels not in KERNELS:
    raise ValueError(f"Config.kernels: {kernels!r} is not one of {', '.join(KERNELS)}")
  if kernels in _NO_SOFTCAP and softcap:
    raise ValueError(f"Config.kernels={kernels!r}: jax.nn.dot_product_attention has no logit soft-capping "
                     f"(Config.attn_logit_softcap={softcap}); use 'auto', 'triton', 'splash', 'xla_chunked' or "
                     f"'fused'")
  if kernels in _STATIC_MASK and prefix_lm:
    raise ValueError(f"Config.kernels={kernels!r}: its block masks are fixed at trace time and cannot express "
                     f"the prefix-LM mask (Config.prefix_lm=True, a per-example prefix); use 'auto' or "
                     f"'xla_chunked'")


def resolve(kernels: str, softcap: float | None, prefix_lm: bool, dtype, platform: str | None = None) -> str:
  """The concrete kernel `auto` stands for on `platform` (default: JAX's default backend)."""
  if kernels != "auto":
    return kernels
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "xla_chunked" if prefix_lm else "splash"
  if platform in ("gpu", "cuda", "rocm"):
    return "cudnn" if not softcap and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "triton"
  return "fused"


def attend(q_BLHE, k_BKSE, v_BKSE, mask_BLS, *, segments, window, softcap, kernels: str, causal: bool,
           prefix_lm: bool, local=True):
  """softmax(q k^T, masked, optionally soft-capped) v -> [B, L, H, E]; q comes scaled; k, v head-major.

  Args:
    mask_BLS: the full mask (segments, causality or the prefix, the window), which every form but splash reads.
    segments: (q_seg_BL, k_seg_BS), the packed segment ids splash masks with.
    window: the sliding window of a local layer, or None; with `local` traced (scanned layers of mixed kinds) the
      window applies where `local` holds.
    causal: no cache and no prefix: key slot <= query slot, which the flash kernels skip blocks by.
  """
  kind = resolve(kernels, softcap, prefix_lm, q_BLHE.dtype)
  if not causal and kind == "splash":  # a cache or a prefix: a mask splash cannot hold
    kind = "xla_chunked"
  if kind in ("fused", "reference"):
    return ops.attention(q_BLHE, k_BKSE, v_BKSE, mask_BLS, softcap, kind, causal)
  if kind == "splash":
    if window is None or isinstance(local, bool):
      return _splash(q_BLHE, k_BKSE, v_BKSE, segments, window, softcap)
    return jax.lax.cond(local, lambda: _splash(q_BLHE, k_BKSE, v_BKSE, segments, window, softcap),
                        lambda: _splash(q_BLHE, k_BKSE, v_BKSE, segments, None, softcap))
  k_BSKE = k_BKSE.transpose(0, 2, 1, 3).astype(q_BLHE.dtype)
  v_BSKE = v_BKSE.transpose(0, 2, 1, 3).astype(q_BLHE.dtype)
  if kind in ("cudnn", "xla_attention"):
    impl = "cudnn" if kind == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask_BLS[:, None], scale=1.0,
                                        is_causal=causal, implementation=impl)
  if not flags.FLAGS.is_parsed():
    # tokamax reads its options from absl flags and would parse sys.argv (a gin command line, pytest's) for them:
    # a program that parses no absl flags keeps their defaults.
    flags.FLAGS.mark_as_parsed()
  return tokamax.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask_BLS[:, None], scale=1.0,
                                       is_causal=causal, logits_soft_cap=softcap, implementation=kind)


def _splash(q_BLHE, k_BKSE, v_BKSE, segments, window, softcap):
  """Splash attention, under shard_map when a mesh of several devices is in context (jax.set_mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_local(q_BLHE, k_BKSE, v_BKSE, segments, window, softcap)
  # A pallas_call is opaque to XLA's partitioner, which would gather q, k and v onto every device: split them by
  # the rules the model's activations follow, batch (and segment ids) with the batch, kv heads with their groups.
  batch, heads = _mesh_axes(mesh, "batch"), _mesh_axes(mesh, "kv_heads")
  B, K = q_BLHE.shape[0], k_BKSE.shape[1]
  n_batch, n_heads = math.prod(mesh.shape[a] for a in batch), math.prod(mesh.shape[a] for a in heads)
  if B % n_batch or K % n_heads:
    raise ValueError(f"Config.kernels='splash' on mesh {dict(mesh.shape)}: batch {B} over {batch} ({n_batch} "
                     f"shards) and kv heads {K} over {heads} ({n_heads} shards) must divide evenly")
  batch, heads = batch or None, heads or None
  q_spec = jax.P(batch, None, heads, None)  # H = K * G, kv-head-major: a block of kv heads holds their groups
  kv_spec = jax.P(batch, heads, None, None)
  seg_spec = jax.P(batch, None)
  local = lambda q, k, v, seg: _splash_local(q, k, v, seg, window, softcap)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, (seg_spec, seg_spec)), out_specs=q_spec,
                       check_vma=False)(q_BLHE, k_BKSE, v_BKSE, tuple(segments))


def _mesh_axes(mesh, logical: str) -> tuple[str, ...]:
  """The mesh axes (of size > 1) the rules in context give the logical axis `logical`."""
  spec = nn.logical_to_mesh_axes((logical,))
  axes = spec[0] if spec else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _splash_local(q_BLHE, k_BKSE, v_BKSE, segments, window, softcap):
  """Splash attention: one multi-query kernel (G query heads against one kv head), vmapped over B and K."""
  B, L, H, E = q_BLHE.shape
  K, S = k_BKSE.shape[1], k_BKSE.shape[2]
  G = H // K
  block = _block(L, S)
  shape = (L, S)
  head_mask = masks.LocalMask(shape, (window - 1, 0), 0) if window else masks.CausalMask(shape)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([head_mask] * G), block_sizes=sizes,
                                                attn_logits_soft_cap=softcap,
                                                interpret=jax.default_backend() != "tpu")
  q_BKGLE = q_BLHE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
  q_seg_BL, k_seg_BS = segments
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
  out_BKGLE = jax.vmap(per_head)(q_BKGLE, k_BKSE.astype(q_BLHE.dtype), v_BKSE.astype(q_BLHE.dtype),
                                 splash.SegmentIds(q=q_seg_BL.astype(jnp.int32), kv=k_seg_BS.astype(jnp.int32)))
  return out_BKGLE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)


def _block(L: int, S: int) -> int:
  """The largest splash block (512 down to 128) that tiles both lengths."""
  for b in (512, 256, 128):
    if L % b == 0 and S % b == 0:
      return b
  raise ValueError(f"Config.kernels='splash': lengths {L} x {S} are not multiples of 128; pad the batch's "
                   f"sequence length (feature lengths) to a multiple of 128")
