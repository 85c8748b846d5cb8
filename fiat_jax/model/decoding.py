"""Prefill + KV-cache decoding (greedy and temperature / top-k / top-p sampling), and scoring of given targets.

Prompts of different lengths are left-padded into one batch: padding has segment id 0, which no real token
attends to, and positions count real tokens only, so every row sees exactly its own prompt.
"""
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np

from fiat_jax.model import ops
from fiat_jax.model import transformer as model_lib


class GenerateResult(typing.NamedTuple):
  tokens: list[list[int]]  # new tokens per prompt, EOS excluded
  logprobs: list[list[float]]  # the model's log-probability of each new token (temperature 1, unfiltered)


def _bucket(n: int, multiple: int = 16) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def left_pad(prompts: list[list[int]], length: int, pad_id: int):
  """[B, length] tokens, positions and segment ids (0 on padding) for left-aligned-to-the-end prompts."""
  B = len(prompts)
  tokens = np.full((B, length), pad_id, np.int32)
  positions = np.zeros((B, length), np.int32)
  segments = np.zeros((B, length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the {length} allowed")
    if p:
      tokens[i, length - len(p):] = p
      positions[i, length - len(p):] = np.arange(len(p))
      segments[i, length - len(p):] = 1
  return tokens, positions, segments


def sample_logits(logits_BV, key, temperature: float, top_k: int, top_p: float):
  """Greedy when temperature == 0, else a sample from the tempered, top-k / nucleus-filtered distribution."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, ops.NEG_INF, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cutoff_idx = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff, ops.NEG_INF, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "temperature", "top_k", "top_p"))
def _generate(model, variables, tokens, positions, segments, key, *, max_new_tokens, eos_id, temperature, top_k,
              top_p):
  cfg = model.cfg
  B, P = tokens.shape
  cache = model_lib.init_cache(cfg, B, P + max_new_tokens)
  # Prefill: the logits of the last slot only (the [B, P, V] projection of every prompt slot is most of a
  # prompt's FLOPs at a large vocabulary, and only the last one picks the first new token).
  hidden, cache = model.apply(variables, tokens, positions, segments, segments > 0, cache=cache, return_hidden=True)
  logits = model.apply(variables, hidden[:, -1:], method=model_lib.Transformer.logits)
  next_pos = jnp.max(positions, axis=1) + (segments[:, -1] > 0)

  def cond(state):
    i, _, _, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, last_BV, cache, pos_B, done, key, out_tok, out_lp = state
    key, sub = jax.random.split(key)
    tok_B = sample_logits(last_BV, sub, temperature, top_k, top_p)
    lp_B = jnp.take_along_axis(jax.nn.log_softmax(last_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    out_tok = out_tok.at[:, i].set(jnp.where(done, -1, tok_B))
    out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp_B))
    done = done | jnp.isin(tok_B, jnp.asarray(eos_id, jnp.int32))
    logits, cache = model.apply(variables, tok_B[:, None], pos_B[:, None], jnp.ones((B, 1), jnp.int32),
                                cache=cache)
    return i + 1, logits[:, -1], cache, pos_B + 1, done, key, out_tok, out_lp

  state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, next_pos, jnp.zeros((B,), bool), key,
           jnp.full((B, max_new_tokens), -1, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.float32))
  _, _, _, _, _, _, out_tok, out_lp = jax.lax.while_loop(cond, body, state)
  return out_tok, out_lp


def generate(model, variables, prompts: list[list[int]], *, max_new_tokens: int, eos_id, key=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, pad_id: int = 0, max_len: int | None = None,
             batch_size: int = 16) -> GenerateResult:
  """Decodes every prompt; stops a row at EOS (excluded from the output) or after max_new_tokens.

  `eos_id` is one id, several (chat models also end a turn on e.g. Gemma's <end_of_turn>), or None.
  Prompts are processed in batches of `batch_size` (the last one padded with empty rows); lengths are bucketed
  to multiples of 16 so a few compilations serve a whole data set. `max_len` caps prompt + new tokens.
  """
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit jax.random key")
  key = jax.random.PRNGKey(0) if key is None else key
  eos_ids = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
  tokens_out, lps_out = [], []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [[]] * (batch_size - n)
    P = _bucket(max(len(p) for p in chunk))
    new = max_new_tokens if max_len is None else max(0, min(max_new_tokens, max_len - max(len(p) for p in chunk)))
    if new == 0:
      tokens_out += [[] for _ in range(n)]
      lps_out += [[] for _ in range(n)]
      continue
    tok, pos, seg = left_pad(chunk, P, pad_id)
    out_tok, out_lp = _generate(model, variables, tok, pos, seg, jax.random.fold_in(key, start),
                                max_new_tokens=new, eos_id=eos_ids, temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p))
    out_tok, out_lp = np.asarray(out_tok), np.asarray(out_lp)
    for r in range(n):
      keep = [j for j in range(new) if out_tok[r, j] >= 0 and out_tok[r, j] not in eos_ids]
      tokens_out.append([int(out_tok[r, j]) for j in keep])
      lps_out.append([float(out_lp[r, j]) for j in keep])
  return GenerateResult(tokens_out, lps_out)


@functools.partial(jax.jit, static_argnames=("model",))
def _token_logprobs(model, variables, tokens, segments, bidir, targets):
  logits, _ = model.apply(variables, tokens, None, segments, bidir)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def score(model, variables, prompts: list[list[int]], targets: list[list[int]], pad_id: int = 0,
          batch_size: int = 16, per_token: bool = False):
  """Sum (or per-token list) of log P(target tokens | prompt) for each pair: one teacher-forced forward pass."""
  if len(prompts) != len(targets):
    raise ValueError(f"score: {len(prompts)} prompts but {len(targets)} targets")
  sums, per = [], []
  for start in range(0, len(prompts), batch_size):
    pairs = list(zip(prompts[start:start + batch_size], targets[start:start + batch_size]))
    n = len(pairs)
    pairs += [([], [])] * (batch_size - n)
    L = _bucket(max(len(p) + len(t) for p, t in pairs))
    tokens = np.full((batch_size, L), pad_id, np.int32)
    next_tok = np.zeros((batch_size, L), np.int32)
    segments = np.zeros((batch_size, L), np.int32)
    bidir = np.zeros((batch_size, L), bool)
    for i, (p, t) in enumerate(pairs):
      seq = list(p) + list(t)
      tokens[i, :len(seq)] = seq
      segments[i, :len(seq)] = 1
      bidir[i, :len(p)] = True
      next_tok[i, :max(len(seq) - 1, 0)] = seq[1:]
    lp = np.asarray(_token_logprobs(model, variables, tokens, segments, bidir, next_tok))
    for i, (p, t) in enumerate(pairs[:n]):
      if not p:
        raise ValueError(f"score: prompt {start + i} is empty; the first target token needs a context")
      row = lp[i, len(p) - 1:len(p) - 1 + len(t)]
      sums.append(float(row.sum()))
      per.append(row.tolist())
  return per if per_token else np.asarray(sums, np.float64)
