"""Greedy KV-cache decoding: fiat_jax.model.decoding.generate against Hugging Face transformers' generate (use_cache,
PyTorch) on the same weights, and beta's throughput through `fiat serve` against calling LocalBeta directly.

The model is the train-step benchmark's: model dim 512, 8 layers, 8 heads, 2 kv heads, MLP 1408, vocab 32000,
float32 (a Llama architecture with random weights). transformers builds it, saves it as a safetensors checkpoint,
and fiat_jax.model.hf.load reads that checkpoint: both sides decode with identical weights, and the benchmark reports
how many generated tokens agree. Runs are interleaved (ours, theirs, ours, ...) so load on the machine hits both,
each after a pause of PAUSE_S seconds.

  python benchmarks/decode.py [--batch 8 --prompt_len 128 --new_tokens 64 --repeats 3] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The train-step benchmark's model, in transformers' LlamaConfig fields.
HF_CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def build_models(ckpt_dir: str, seed: int = 0):
  """(transformers model, our (Transformer, variables)) with the same random weights, via a safetensors file."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
  peer.save_pretrained(ckpt_dir)
  cfg, params = hf.load(ckpt_dir)
  return peer, (model_lib.Transformer(cfg), {"params": params})


PAUSE_S = 1.0  # seconds of idle before each timed run


def time_ours(ours, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
  from fiat_jax.model import decoding  # pylint: disable=g-import-not-at-top
  model, variables = ours
  start = time.perf_counter()
  res = decoding.generate(model, variables, prompts.tolist(), max_new_tokens=new_tokens, eos_id=None,
                          batch_size=len(prompts))
  return time.perf_counter() - start, np.asarray(res.tokens)


def time_peer(peer, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  tokens = torch.tensor(prompts)
  with torch.inference_mode():
    start = time.perf_counter()
    out = peer.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    seconds = time.perf_counter() - start
  return seconds, out[:, prompts.shape[1]:].numpy()


def decode_benchmark(peer, ours, batch: int, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
  """tokens/s (new tokens over wall time, prefill included) of both, interleaved; the first call of each is a
  warm-up (our compilation; the peer's first-call costs) and is reported apart."""
  prompts = np.random.default_rng(seed).integers(3, HF_CONFIG["vocab_size"], (batch, prompt_len))
  first_ours, tok_ours = time_ours(ours, prompts, new_tokens)
  first_peer, tok_peer = time_peer(peer, prompts, new_tokens)
  t_ours, t_peer = [], []
  for _ in range(repeats):
    # A pause before each timed run, so that neither side's idle worker threads, which spin for a while after their
    # last parallel region (OpenMP's for up to 200 ms by default), still compete for the cores with the other side.
    time.sleep(PAUSE_S)
    t_ours.append(time_ours(ours, prompts, new_tokens)[0])
    time.sleep(PAUSE_S)
    t_peer.append(time_peer(peer, prompts, new_tokens)[0])
  n = batch * new_tokens
  agree = tok_ours == tok_peer
  first_diff = [int(np.argmin(row)) if not row.all() else new_tokens for row in agree]
  ours_tps, peer_tps = n / statistics.median(t_ours), n / statistics.median(t_peer)
  return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
              ours=dict(seconds=t_ours, first_call_s=first_ours, tokens_per_s=ours_tps, best_tokens_per_s=n / min(t_ours)),
              peer=dict(seconds=t_peer, first_call_s=first_peer, tokens_per_s=peer_tps, best_tokens_per_s=n / min(t_peer)),
              ratio=ours_tps / peer_tps, token_agreement=float(agree.mean()),
              rows_identical=int(sum(d == new_tokens for d in first_diff)), first_difference=first_diff)


def beta_benchmark(ours, requests: int, clients: int, new_tokens: int, prompt_chars: int, seed: int = 0) -> dict:
  """Rationale requests through `fiat serve` (HttpBeta, `clients` concurrent) against LocalBeta.map directly."""
  import seqio  # pylint: disable=g-import-not-at-top
  from fiat_jax.beta import backends  # pylint: disable=g-import-not-at-top
  from fiat_jax.beta import serve  # pylint: disable=g-import-not-at-top
  model, variables = ours
  rng = np.random.default_rng(seed)
  words = ["question", "answer", "passage", "the", "of", "attributable", "because", "language", "river", "city"]
  texts = [" ".join(rng.choice(words, prompt_chars)).capitalize()[:prompt_chars] for _ in range(requests)]
  messages = [[{"role": "user", "content": t}] for t in texts]
  sampling = backends.Sampling(max_new_tokens=new_tokens, stop=())
  beta = backends.LocalBeta(model, variables, seqio.ByteVocabulary(), identity="local:decode-benchmark",
                            batch_size=clients)

  def direct():
    return [c for _, c in sorted(beta.map([(m, 0) for m in messages], sampling), key=lambda ic: ic[0])]

  def served(url):
    http = backends.HttpBeta(base_url=url, model=beta.identity, api_key_env=None, concurrency=clients)
    return [c for _, c in sorted(http.map([(m, 0) for m in messages], sampling), key=lambda ic: ic[0])]

  direct()  # compile every prompt-length bucket once
  with tempfile.TemporaryDirectory() as tmp:
    srv = serve.start(beta, request_log=os.path.join(tmp, "requests.jsonl"), max_batch=clients)
    try:
      served(srv.url)  # warm the server's path too
      t0 = time.perf_counter()
      direct_out = direct()
      t_direct = time.perf_counter() - t0
      warm_batches = len(srv.batcher.batch_sizes)
      t0 = time.perf_counter()
      served_out = served(srv.url)
      t_served = time.perf_counter() - t0
      batch_sizes = list(srv.batcher.batch_sizes)[warm_batches:]
    finally:
      srv.shutdown()
  errors = [c.error for c in direct_out + served_out if c.error]
  if errors:
    raise RuntimeError(f"beta benchmark: {len(errors)} requests failed, e.g. {errors[0]}")
  same = sum(a.texts == b.texts for a, b in zip(direct_out, served_out))
  out_tokens = sum(c.tokens_out for c in direct_out)
  return dict(requests=requests, clients=clients, new_tokens=new_tokens, prompt_chars=prompt_chars,
              tokens_out=out_tokens, direct=dict(seconds=t_direct, requests_per_s=requests / t_direct,
                                                 tokens_per_s=out_tokens / t_direct),
              served=dict(seconds=t_served, requests_per_s=requests / t_served,
                          tokens_per_s=sum(c.tokens_out for c in served_out) / t_served),
              overhead=t_served / t_direct - 1.0, identical_outputs=same, served_batch_sizes=batch_sizes)


def environment() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
              cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.devices()[0].platform,
              torch=torch.__version__, torch_threads=torch.get_num_threads(), transformers=transformers.__version__)


def report(result: dict) -> str:
  """The markdown table benchmarks/README.md shows."""
  d, env = result["decode"], result["environment"]
  lines = [f"Greedy decoding, batch {d['batch']}, prompt {d['prompt_len']}, {d['new_tokens']} new tokens "
           f"(median of {d['repeats']}; {env['backend']}, {env['cpu_count']} cores, torch threads "
           f"{env['torch_threads']})", "",
           "| | new tokens/s | best | first call (s) |", "|---|---:|---:|---:|",
           f"| fiat-jax decoding.generate (jax {env['jax']}) | {d['ours']['tokens_per_s']:.1f} | "
           f"{d['ours']['best_tokens_per_s']:.1f} | {d['ours']['first_call_s']:.2f} |",
           f"| transformers generate, use_cache (torch {env['torch']}, transformers {env['transformers']}) | "
           f"{d['peer']['tokens_per_s']:.1f} | {d['peer']['best_tokens_per_s']:.1f} | "
           f"{d['peer']['first_call_s']:.2f} |", "",
           f"ratio (ours / peer): **{d['ratio']:.2f}x**; generated tokens identical: "
           f"{100 * d['token_agreement']:.1f}% ({d['rows_identical']}/{d['batch']} rows entirely)"]
  b = result.get("beta")
  if b:
    lines += ["", f"beta: {b['requests']} requests, {b['clients']} concurrent clients, {b['new_tokens']} new tokens, "
              f"~{b['prompt_chars']}-byte prompts", "", "| | requests/s | tokens/s | seconds |", "|---|---:|---:|---:|",
              f"| LocalBeta.map (direct) | {b['direct']['requests_per_s']:.2f} | {b['direct']['tokens_per_s']:.1f} | "
              f"{b['direct']['seconds']:.2f} |",
              f"| fiat serve + HttpBeta | {b['served']['requests_per_s']:.2f} | {b['served']['tokens_per_s']:.1f} | "
              f"{b['served']['seconds']:.2f} |", "",
              f"server overhead: {100 * b['overhead']:+.1f}%; identical completions: "
              f"{b['identical_outputs']}/{b['requests']}; the server's batches: {b['served_batch_sizes']}"]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch_threads", type=int, default=None, help="default: torch's own (the machine's cores)")
  ap.add_argument("--beta_requests", type=int, default=32, help="0 skips the beta benchmark")
  ap.add_argument("--beta_clients", type=int, default=8)
  ap.add_argument("--beta_new_tokens", type=int, default=32)
  ap.add_argument("--beta_prompt_chars", type=int, default=120)
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  with tempfile.TemporaryDirectory() as ckpt:
    peer, ours = build_models(ckpt)
    result = dict(environment=environment(), config=HF_CONFIG,
                  decode=decode_benchmark(peer, ours, args.batch, args.prompt_len, args.new_tokens, args.repeats))
  if args.beta_requests:
    result["beta"] = beta_benchmark(ours, args.beta_requests, args.beta_clients, args.beta_new_tokens,
                                    args.beta_prompt_chars)
  print(report(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
