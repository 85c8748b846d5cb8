"""Token cross-entropy: the per-token loss (with z-loss and label smoothing), and a chunked form for large
vocabularies that never holds the [B, L, V] logits and projects onto the vocabulary only once per step."""
import functools

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_NV, targets_N, weights_N, z_loss: float, label_smoothing: float):
  """(sum of weighted training loss, sum of weighted negative log-likelihood) over N tokens."""
  logits_NV = logits_NV.astype(jnp.float32)
  log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
  nll_N = log_z_N - jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0]
  loss_N = nll_N
  if label_smoothing:  # mix the one-hot target with the uniform distribution over the vocab
    loss_N = (1 - label_smoothing) * nll_N + label_smoothing * (log_z_N - jnp.mean(logits_NV, axis=-1))
  if z_loss:
    loss_N = loss_N + z_loss * jnp.square(log_z_N)
  return jnp.sum(loss_N * weights_N), jnp.sum(nll_N * weights_N)


def task_mean_weights(weights_BL, task_ids_BL, task_weights):
  """Per-token weights w · λ_t / (task t's summed w): the weighted loss sum is Σ_t λ_t · (task t's token mean).

  Distilled CoT (Hsieh et al. 2023) averages each task's loss over its own tokens before mixing them, so that
  long rationale targets do not outweigh few-token labels as one token-weighted mean would. Sums run over the
  whole (global) batch; a task absent from the batch contributes nothing.
  """
  weights_BL = weights_BL.astype(jnp.float32)
  out_BL = jnp.zeros_like(weights_BL)
  for task, lam in enumerate(task_weights):
    mask_BL = jnp.where(task_ids_BL == task, weights_BL, 0.0)
    out_BL = out_BL + mask_BL * (lam / jnp.maximum(jnp.sum(mask_BL), 1e-9))
  return out_BL


def _split(chunk: int, *xs):
  """Each [B, L, ...] -> [L / chunk, B, chunk, ...]: the scan's per-chunk inputs."""
  B, L = xs[0].shape[:2]
  return tuple(jnp.moveaxis(x.reshape(B, L // chunk, chunk, *x.shape[2:]), 1, 0) for x in xs)


def _merge(x):
  """The inverse of _split."""
  n, B, C = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, n * C, *x.shape[3:])


def chunked_cross_entropy(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss,
                          label_smoothing, kernels: str = "fused"):
  """(loss sum, NLL sum) of the logits `logits_fn(head, frozen_head, h_BCD)` taken `chunk` positions at a time.

  `head` holds the trainable parameters the projection reads (differentiated), `frozen_head` the frozen ones.
  `kernels` as model.Config.kernels: "reference" is autodiff through the scan over chunks (which keeps every
  chunk's logits for the backward pass); any other value the fused form below.
  """
  if kernels == "reference":
    return _sums(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss, label_smoothing)
  return fused_cross_entropy(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss,
                             label_smoothing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7, 8))
def fused_cross_entropy(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss,
                        label_smoothing):
  """chunked_cross_entropy whose forward pass computes each chunk's logits once and with them, at once, the
  gradients w.r.t. h and `head` (softmax minus target through the projection's VJP), keeping those [B, L, D] and
  head-sized results instead of any logits; the backward pass only scales them by the incoming cotangents.
  (Autodiff, even under jax.checkpoint, projects every chunk onto the vocabulary a second time.)
  """
  return _sums(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss, label_smoothing)


def _sums(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss, label_smoothing):
  def body(carry, xs):
    h_BCD, t_BC, w_BC = xs
    logits = logits_fn(head, frozen_head, h_BCD)
    sums = cross_entropy_sums(logits.reshape(-1, logits.shape[-1]), t_BC.reshape(-1), w_BC.reshape(-1), z_loss,
                              label_smoothing)
    return carry + jnp.stack(sums), None

  sums, _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32), _split(chunk, h_BLD, targets_BL, weights_BL))
  return sums[0], sums[1]


def _fwd(logits_fn, h_BLD, head, frozen_head, targets_BL, weights_BL, chunk, z_loss, label_smoothing):
  separate_nll = bool(z_loss or label_smoothing)  # otherwise the loss is the NLL and so are its gradients

  def body(carry, xs):
    sums, d_head = carry
    h_BCD, t_BC, w_BC = xs
    logits, project_vjp = jax.vjp(lambda h, p: logits_fn(p, frozen_head, h), h_BCD, head)
    V = logits.shape[-1]
    ce = lambda lg: cross_entropy_sums(lg.reshape(-1, V), t_BC.reshape(-1), w_BC.reshape(-1), z_loss,
                                       label_smoothing)
    chunk_sums, ce_vjp = jax.vjp(ce, logits)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    dh_loss, dp_loss = project_vjp(ce_vjp((one, zero))[0])
    new_head, dh = [jax.tree_util.tree_map(jnp.add, d_head[0], dp_loss)], [dh_loss]
    if separate_nll:
      dh_nll, dp_nll = project_vjp(ce_vjp((zero, one))[0])
      new_head.append(jax.tree_util.tree_map(jnp.add, d_head[1], dp_nll))
      dh.append(dh_nll)
    return (sums + jnp.stack(chunk_sums), tuple(new_head)), tuple(dh)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, head)
  init = (jnp.zeros(2, jnp.float32), (zeros, zeros) if separate_nll else (zeros,))
  (sums, d_head), dh = jax.lax.scan(body, init, _split(chunk, h_BLD, targets_BL, weights_BL))
  dh = tuple(_merge(d).astype(h_BLD.dtype) for d in dh)
  return (sums[0], sums[1]), (dh, d_head, frozen_head)


def _bwd(logits_fn, chunk, z_loss, label_smoothing, res, g):
  del logits_fn, chunk, z_loss, label_smoothing
  dh, d_head, frozen_head = res
  g_loss, g_nll = g  # without z-loss and smoothing the NLL's gradients are the loss's: [-1] is [0]
  dh_total = dh[0] * g_loss.astype(dh[0].dtype) + dh[-1] * g_nll.astype(dh[-1].dtype)
  head_total = jax.tree_util.tree_map(lambda a, b: a * g_loss.astype(a.dtype) + b * g_nll.astype(b.dtype),
                                      d_head[0], d_head[-1])
  return (dh_total, head_total, jax.tree_util.tree_map(jnp.zeros_like, frozen_head), None, None)


fused_cross_entropy.defvjp(_fwd, _bwd)
