"""KV-cache decoding equals full recomputation; sampling is repeatable; scoring equals a hand sum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiat_jax.model import decoding
from fiat_jax.model import transformer as model_lib
import helpers

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], [3]]


def _greedy_by_recomputation(cfg, params, prompt, steps, length=48):
  """A full forward pass over the whole sequence at every step (right-padded to one length: causality makes the
  padding invisible to earlier positions, and one compilation serves every step)."""
  forward = jax.jit(lambda t, b: model_lib.Transformer(cfg).apply({"params": params}, t, bidirectional_BL=b)[0])
  seq = list(prompt)
  bidir = np.zeros((1, length), bool)
  bidir[0, :len(prompt)] = True
  for _ in range(steps):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(forward(tokens, bidir)[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("overrides", [{}, dict(prefix_lm=True),
                                       dict(attention_pattern=("local", "global"), sliding_window=3,
                                            attn_logit_softcap=5.0, qk_norm=True, norm_plus_one=True)])
def test_kv_cache_greedy_equals_recomputation(overrides):
  cfg = model_lib.tiny_config(**overrides)
  params = helpers.tiny_params(cfg)
  out = decoding.generate(model_lib.Transformer(cfg), {"params": params}, PROMPTS, max_new_tokens=12, eos_id=None,
                          batch_size=2)
  for prompt, tokens, lps in zip(PROMPTS, out.tokens, out.logprobs):
    assert tokens == _greedy_by_recomputation(cfg, params, prompt, 12)
    assert len(lps) == 12 and all(lp <= 0 for lp in lps)
  assert len(set(map(tuple, out.tokens))) > 1


def test_stops_at_eos_and_excludes_it():
  cfg = model_lib.tiny_config()
  params = helpers.tiny_params(cfg)
  model = model_lib.Transformer(cfg)
  full = decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=8, eos_id=None)
  eos = full.tokens[0][2]
  cut = decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=8, eos_id=eos)
  assert cut.tokens[0] == full.tokens[0][:full.tokens[0].index(eos)]
  for f, c in zip(full.tokens, cut.tokens):
    assert c == (f[:f.index(eos)] if eos in f else f)
  # Several stop ids (a chat model's <eos> and <end_of_turn>): each row stops at the first of either.
  eos2 = full.tokens[1][1]
  both = decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=8, eos_id=[eos, eos2])
  for f, c in zip(full.tokens, both.tokens):
    stops = [i for i, t in enumerate(f) if t in (eos, eos2)]
    assert c == (f[:stops[0]] if stops else f)
  assert both.tokens[1] == full.tokens[1][:1]


def test_sampling_repeatable_with_the_same_key_and_varies_with_another():
  cfg = model_lib.tiny_config()
  params = helpers.tiny_params(cfg, gain=1.0)
  model = model_lib.Transformer(cfg)
  run = lambda seed, **kw: decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=10, eos_id=None,
                                             key=jax.random.PRNGKey(seed), temperature=1.0, **kw).tokens
  assert run(0) == run(0)
  assert run(0) != run(1)
  assert run(0, top_k=1) == decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=10,
                                              eos_id=None).tokens  # top-1 sampling is greedy
  with pytest.raises(ValueError, match="key"):
    decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=2, eos_id=None, temperature=0.7)


def test_top_p_keeps_the_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(decoding.sample_logits(logits, jax.random.PRNGKey(i), 1.0, 0, 0.75)[0]) for i in range(200)}
  assert draws == {0, 1}


def test_score_equals_sum_of_stepwise_logprobs():
  cfg = model_lib.tiny_config(prefix_lm=True)
  params = helpers.tiny_params(cfg)
  model = model_lib.Transformer(cfg)
  targets = [[40, 41], [50], [60, 61, 62]]
  got = decoding.score(model, {"params": params}, PROMPTS, targets)
  forward = jax.jit(lambda t, b: jax.nn.log_softmax(model.apply({"params": params}, t, bidirectional_BL=b)[0][0]))
  for prompt, target, value in zip(PROMPTS, targets, got):
    seq = prompt + target
    bidir = jnp.array([[True] * len(prompt) + [False] * len(target)])
    logp = forward(jnp.array([seq]), bidir)
    expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))
    assert value == pytest.approx(expected, abs=1e-4)
  # Greedy tokens' log-probs from generate equal their teacher-forced score.
  gen = decoding.generate(model, {"params": params}, PROMPTS, max_new_tokens=4, eos_id=None)
  np.testing.assert_allclose(decoding.score(model, {"params": params}, PROMPTS, gen.tokens),
                             [sum(lp) for lp in gen.logprobs], atol=1e-4)
