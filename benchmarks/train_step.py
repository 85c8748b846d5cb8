"""One training update: fiat-jax's LoRA train step (fiat_jax.training.train.train_step, jitted with shardings and donation
as train.train does it) against Hugging Face transformers + peft (PyTorch eager), and full fine-tuning of both
for memory.

The model is a Llama architecture with random weights: model dim 512, 8 layers, 8 heads, 2 kv heads, head dim 64,
SwiGLU MLP 1408, vocab 32000 (untied), float32; LoRA rank 8, alpha 16 on q, k, v, o, gate, up, down; AdamW.
Batch 8 x 512 random token ids (one fixed numpy seed, the same for both). Every measurement runs in its own
subprocess of this script (`--worker NAME`), so that each reports its own peak RSS and the peer can be started
with glibc malloc tunables (they must be in the environment before the process starts). The peer runs twice, as
installed and with GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736, and ours
runs as installed and with FIAT_GLIBC_MALLOC=reuse (fiat_jax/malloc.py, our own equivalent, which those tunables
do not achieve for XLA's threads); each side's faster run gives the speed ratio and its lower peak RSS the memory
ratio. The machine's float32 matmul peak (a jitted 4096^3 jnp.dot, best of
several) is the denominator of the model-FLOPs utilisation (MFU). Our LoRA step is also timed once more with
TrainConfig.micro_batches=8 (the same update, accumulated over 8 slices of the batch): an extra row, outside the
ratios. The machine must be otherwise idle: with both cores busy elsewhere, PyTorch's OpenMP threads slow down
far more than XLA's (steps 4x to 5x slower), and the peak itself drops by half.

  python benchmarks/train_step.py [--steps 5 --warmup 2 --batch 8 --seq 512] [--loss_chunk 32] [--remat]
      [--kernels fused]
      [--micro_batches 1] [--variant_micro_batches 8] [--torch_threads 0] [--json out.json]

Smoke run: python benchmarks/train_step.py --steps 1 --warmup 1 --batch 1 --seq 64
"""
import sys

if __name__ == "__main__" and sys.argv[1:3] in (["--worker", "ours_lora"], ["--worker", "ours_full"]):
  # Our workers start as the `fiat` command starts: with FIAT_GLIBC_MALLOC=reuse, glibc malloc settings before
  # numpy starts its threads.
  from fiat_jax import malloc  # pylint: disable=g-import-not-at-top
  malloc.keep_freed_memory()

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model, in transformers' LlamaConfig fields (benchmarks/decode.py decodes the same one).
HF_CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 attention_dropout=0.0)
LORA_RANK, LORA_ALPHA = 8, 16.0
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
PEAK_N, PEAK_REPEATS = 4096, 5

FLOP_CONVENTION = (
    "model FLOPs per step: N = matmul parameters (q, k, v, o, gate, up, down of every layer and the untied "
    "unembedding; the embedding lookup is not a matmul); per token, LoRA counts 4N (forward 2N + activation "
    "gradients 2N; frozen weights get no weight gradients; LoRA's own rank-8 matmuls are ignored) and full "
    "fine-tuning 6N; attention per sequence and layer counts QK^T and AV over the full L x L square (not "
    "halved for the causal mask), 2*2*L*L*D forward, x2 for LoRA (forward + activation gradients) and x3 for "
    "full fine-tuning. MFU = model FLOPs / step time / the float32 matmul peak.")


# ---- FLOPs ----------------------------------------------------------------------------------------------------

def matmul_params(c: dict = HF_CONFIG) -> int:
  d, f, e = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  h, k = c["num_attention_heads"], c["num_key_value_heads"]
  per_layer = d * h * e * 2 + d * k * e * 2 + 3 * d * f  # q and o, k and v, gate up down
  return c["num_hidden_layers"] * per_layer + d * c["vocab_size"]


def step_flops(mode: str, batch: int, seq: int, c: dict = HF_CONFIG) -> float:
  """Model FLOPs of one update under FLOP_CONVENTION; mode 'lora' or 'full'."""
  n = matmul_params(c)
  attn_fwd = 2 * 2 * seq * seq * c["num_attention_heads"] * c["head_dim"] * c["num_hidden_layers"] * batch
  tokens = batch * seq
  if mode == "lora":
    return 4.0 * n * tokens + 2.0 * attn_fwd
  return 6.0 * n * tokens + 3.0 * attn_fwd


def token_batches(count: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """[count, batch, seq + 1] random ids: both sides read inputs [:, :-1]; ours targets [:, 1:], the peer shifts
  labels=input_ids itself (same matmuls, L logits per row)."""
  return np.random.default_rng(seed).integers(3, HF_CONFIG["vocab_size"], (count, batch, seq + 1), dtype=np.int32)


def effective_chunk(loss_chunk: int, seq: int) -> int:
  """TrainConfig.loss_chunk for a sequence length: 0 (the whole sequence at once) when the chunk does not divide it
  into several pieces (e.g. a smoke run's short sequence)."""
  return loss_chunk if 0 < loss_chunk < seq and seq % loss_chunk == 0 else 0


# ---- Worker helpers -------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _mib(kib: float) -> float:
  return kib / 1024.0


def _finish(result: dict) -> dict:
  result["peak_rss_mib"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
  result["fiat_glibc_malloc"] = os.environ.get("FIAT_GLIBC_MALLOC")
  result["loadavg_end"] = os.getloadavg()
  return result


def _timed(step, warmup: int, steps: int) -> tuple[list, list]:
  """(warm-up seconds, timed seconds): `step(i)` runs update i and waits for it."""
  warm, timed = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    step(i)
    (warm if i < warmup else timed).append(time.perf_counter() - t0)
  return warm, timed


# ---- Workers --------------------------------------------------------------------------------------------------

def worker_peak(args) -> dict:
  """Float32 matmul peak: a jitted PEAK_N^3 jnp.dot, best of PEAK_REPEATS (and torch.mm's, for reference)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = PEAK_N
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(PEAK_REPEATS):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n ** 3
  out = dict(n=n, seconds=times, flops_per_s=flops / min(times))
  if not args.no_torch_peak:
    import torch  # pylint: disable=g-import-not-at-top
    ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
    torch.mm(ta, tb)
    t_times = []
    for _ in range(PEAK_REPEATS):
      t0 = time.perf_counter()
      torch.mm(ta, tb)
      t_times.append(time.perf_counter() - t0)
    out["torch_mm"] = dict(seconds=t_times, flops_per_s=flops / min(t_times), threads=torch.get_num_threads())
  return out


def worker_ours(args, mode: str) -> dict:
  """fiat_jax.training.train.train_step, built and jitted as train.train builds it (mode 'peft' or 'full')."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  c = HF_CONFIG
  cfg = model_lib.Config(
      vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], embed_dim=c["hidden_size"],
      num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
      mlp_dim=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"], tie_embeddings=False,
      remat_policy="full" if args.remat else "none", kernels=args.kernels,
      lora=lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA) if mode == "peft" else None)
  num_steps = args.warmup + args.steps
  tcfg = train_lib.TrainConfig(mode=mode, num_steps=num_steps, batch_size=args.batch,
                               loss_chunk=effective_chunk(args.loss_chunk, args.seq),
                               micro_batches=args.micro_batches, remat_policy="full" if args.remat else "none",
                               tensorboard=False,
                               optim=optim_lib.OptimConfig(optimizer="adamw", learning_rate=LEARNING_RATE))
  model = model_lib.Transformer(cfg)
  mesh = sharding.make_mesh()

  # As train.train: params in their shards, LoRA collections, (trainable, frozen), optax, state shardings.
  params = nn.meta.unbox(sharding.init_params_sharded(cfg, jax.random.PRNGKey(1), mesh))
  key_lora, key_rng = jax.random.split(jax.random.PRNGKey(tcfg.seed))
  collections = sharding.init_lora_sharded(cfg, params, key_lora, mesh) if mode == "peft" else None
  trainable, frozen = train_lib.split_variables(mode, params, collections)
  tx = optim_lib.make(tcfg.optim, num_steps, trainable)
  lr_fn = optim_lib.schedule(tcfg.optim, num_steps)
  state_sh, frozen_sh = train_lib._shardings(cfg, mode, mesh, trainable, frozen,  # pylint: disable=protected-access
                                             jax.eval_shape(tx.init, trainable))
  trainable = jax.device_put(trainable, state_sh["trainable"], may_alias=False)
  frozen = jax.device_put(frozen, frozen_sh)
  state = jax.device_put(dict(step=np.zeros((), np.int32), trainable=trainable, opt_state=None, rng=key_rng),
                         dict(state_sh, opt_state=None))
  state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(state["trainable"])
  del params, collections, trainable  # train.train's caller keeps its own copy; the benchmark does not
  counts = dict(trainable=lora_lib.count(state["trainable"]), frozen=lora_lib.count(frozen))

  tokens = token_batches(num_steps, args.batch, args.seq, args.seed)
  ones = np.ones((args.batch, args.seq), np.float32)
  local = lambda i: dict(decoder_input_tokens=tokens[i, :, :-1], decoder_target_tokens=tokens[i, :, 1:],
                         decoder_loss_weights=ones)
  batches = [sharding.global_batch(local(i), mesh) for i in range(num_steps)]
  batch_sh = {k: v.sharding for k, v in batches[0].items()}
  step_fn = functools.partial(train_lib.train_step, model=model, tcfg=tcfg, tx=tx, lr_fn=lr_fn)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
  rss_before_compile = _mib(_status_kib("VmRSS"))
  t0 = time.perf_counter()
  with sharding.activation_rules(mesh):
    compiled = jitted.lower(state, frozen, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  memory = None
  try:
    m = compiled.memory_analysis()
    if m is not None:
      memory = {k: getattr(m, k) / 2 ** 20 for k in (
          "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes") if hasattr(m, k)}
  except Exception as e:  # pylint: disable=broad-except
    memory = dict(error=repr(e))
  rss_after_compile = _mib(_status_kib("VmRSS"))
  hwm_after_compile = _mib(_status_kib("VmHWM"))
  losses = []
  holder = dict(state=state)
  del state

  def step(i):
    with sharding.activation_rules(mesh):
      holder["state"], metrics = compiled(holder["state"], frozen, batches[i])
    jax.block_until_ready((holder["state"], metrics))
    losses.append(float(metrics["loss"]))

  warm, timed = _timed(step, args.warmup, args.steps)
  return _finish(dict(
      framework="fiat-jax", mode=mode, loss_chunk=tcfg.loss_chunk, remat=args.remat, kernels=args.kernels,
      micro_batches=tcfg.micro_batches, params=counts,
      compile_s=compile_s, warmup_s=warm, seconds=timed, step_s=statistics.median(timed), losses=losses,
      compiled_memory_mib=memory, rss_before_compile_mib=rss_before_compile,
      rss_after_compile_mib=rss_after_compile, hwm_after_compile_mib=hwm_after_compile,
      devices=[str(d) for d in jax.devices()]))


def worker_torch(args, mode: str) -> dict:
  """transformers LlamaForCausalLM (+ peft LoRA), loss on labels=input_ids, torch.optim.AdamW over the trainable
  parameters; eager PyTorch with its default threads."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
  if mode == "peft":
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                       target_modules=list(HF_TARGETS), bias="none",
                                                       task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
  counts = dict(trainable=sum(p.numel() for p in trainable),
                frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad))
  tokens = torch.from_numpy(token_batches(args.warmup + args.steps, args.batch, args.seq, args.seed)[:, :, :-1]
                            .astype(np.int64))
  losses = []

  def step(i):
    ids = tokens[i]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))

  warm, timed = _timed(step, args.warmup, args.steps)
  attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
  return _finish(dict(framework="transformers+peft" if mode == "peft" else "transformers", mode=mode, params=counts,
                      warmup_s=warm, seconds=timed, step_s=statistics.median(timed), losses=losses,
                      torch_threads=torch.get_num_threads(), attn_implementation=attn))


WORKERS = {
    "peak": worker_peak,
    "ours_lora": functools.partial(worker_ours, mode="peft"),
    "ours_full": functools.partial(worker_ours, mode="full"),
    "torch_lora": functools.partial(worker_torch, mode="peft"),
    "torch_full": functools.partial(worker_torch, mode="full"),
}
RESULT_TAG = "TRAIN_STEP_RESULT "


# ---- Driver ---------------------------------------------------------------------------------------------------

def run_worker(name: str, args, tunables: bool = False, micro_batches: int | None = None) -> dict:
  """Runs `--worker name` in a fresh process (with or without its malloc settings: the glibc tunables for the peer,
  FIAT_GLIBC_MALLOC=reuse for ours) and returns its JSON."""
  micro_batches = args.micro_batches if micro_batches is None else micro_batches
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("FIAT_GLIBC_MALLOC", None)
  if tunables and name.startswith("ours"):
    env["FIAT_GLIBC_MALLOC"] = "reuse"
  elif tunables:
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps), "--warmup",
         str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed),
         "--loss_chunk", str(args.loss_chunk), "--micro_batches", str(micro_batches),
         "--torch_threads", str(args.torch_threads), "--kernels", args.kernels] + (
             ["--remat"] if args.remat else []) + (["--no_torch_peak"] if args.no_torch_peak else [])
  label = name + ((" (FIAT_GLIBC_MALLOC=reuse)" if name.startswith("ours") else " (GLIBC_TUNABLES)") if tunables
                  else "") + (
      f" (micro_batches={micro_batches})" if micro_batches != args.micro_batches else "")
  print(f"[train_step] running {label} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
  if proc.returncode or not lines:
    raise RuntimeError(f"worker {label} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                       f"{proc.stderr[-4000:]}")
  out = json.loads(lines[-1][len(RESULT_TAG):])
  out["wall_s"] = time.perf_counter() - t0
  done = (f"{out['flops_per_s'] / 1e9:.1f} GFLOP/s" if "flops_per_s" in out else
          f"{out['step_s']:.3f} s/step, peak RSS {out['peak_rss_mib']:.0f} MiB")
  print(f"[train_step] {label}: {done} ({out['wall_s']:.0f} s)", file=sys.stderr, flush=True)
  return out


def environment() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, machine=platform.machine(), cpu_count=os.cpu_count(),
              cpus_usable=len(os.sched_getaffinity(0)), python=platform.python_version(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__, torch=torch.__version__,
              torch_threads=torch.get_num_threads(), transformers=transformers.__version__, peft=peft.__version__,
              backend=jax.default_backend(), loadavg_start=os.getloadavg())


def summarise(result: dict) -> dict:
  """Adds tokens/s and MFU to each run, the peer's best LoRA run, and the two ratios."""
  a, peak = result["args"], result["peak"]["flops_per_s"]
  tokens = a["batch"] * a["seq"]
  for run in result["runs"].values():
    kind = "lora" if run["mode"] == "peft" else "full"
    run["model_flops"] = step_flops(kind, a["batch"], a["seq"])
    run["tokens_per_s"] = tokens / run["step_s"]
    run["mfu"] = run["model_flops"] / run["step_s"] / peak
  r = result["runs"]
  best_peer = min(("torch_lora", "torch_lora_tunables"), key=lambda k: r[k]["step_s"])
  best_ours = min(("ours_lora", "ours_lora_tunables"), key=lambda k: r[k]["step_s"])
  lowest_peer_rss = min(r["torch_lora"]["peak_rss_mib"], r["torch_lora_tunables"]["peak_rss_mib"])
  lowest_ours_rss = min(r["ours_lora"]["peak_rss_mib"], r["ours_lora_tunables"]["peak_rss_mib"])
  result.update(best_peer_lora=best_peer, best_ours_lora=best_ours, peer_lora_peak_rss_mib=lowest_peer_rss,
                ours_lora_peak_rss_mib=lowest_ours_rss)
  result["ratio_ours_over_peer"] = r[best_ours]["tokens_per_s"] / r[best_peer]["tokens_per_s"]
  result["lora_peak_memory_ours_over_peer"] = lowest_ours_rss / lowest_peer_rss
  if "ours_lora_variant" in r:
    v = r["ours_lora_variant"]
    result["variant"] = dict(micro_batches=v["micro_batches"],
                             ratio_ours_over_peer=v["tokens_per_s"] / r[best_peer]["tokens_per_s"],
                             lora_peak_memory_ours_over_peer=v["peak_rss_mib"] / lowest_peer_rss)
  return result


def _levers(run: dict) -> str:
  out = [f"TrainConfig.loss_chunk={run['loss_chunk']}" if run["loss_chunk"] else "no loss chunking"]
  out.append("Config.remat_policy=full" if run["remat"] else "no remat")
  out.append(f"Config.kernels={run['kernels']}")
  if run["micro_batches"] > 1:
    out.append(f"TrainConfig.micro_batches={run['micro_batches']}")
  return ", ".join(out)


def report(result: dict) -> str:
  """The markdown table benchmarks/README.md shows, then the ratio lines."""
  a, env, r = result["args"], result["environment"], result["runs"]
  peak = result["peak"]
  env_name = lambda run: ("GLIBC tunables" if run.get("glibc_tunables") else
                          "FIAT_GLIBC_MALLOC=reuse" if run.get("fiat_glibc_malloc") else "as installed")
  rows = [("fiat-jax LoRA (train_step, jit + donation; as installed)", "ours_lora"),
          ("fiat-jax LoRA (FIAT_GLIBC_MALLOC=reuse)", "ours_lora_tunables"),
          ("transformers + peft LoRA (as installed)", "torch_lora"),
          ("transformers + peft LoRA (GLIBC tunables)", "torch_lora_tunables"),
          (f"fiat-jax full fine-tuning ({env_name(r['ours_full'])})", "ours_full"),
          (f"transformers full fine-tuning ({env_name(r['torch_full'])})", "torch_full")]
  if "ours_lora_variant" in r:
    rows.append((f"fiat-jax LoRA, micro_batches={r['ours_lora_variant']['micro_batches']} (extra, not in the ratios)",
                 "ours_lora_variant"))
  load = lambda t: "/".join(f"{x:.1f}" for x in t)
  lines = [f"Train step, batch {a['batch']} x sequence {a['seq']} ({a['batch'] * a['seq']} tokens), float32, AdamW; "
           f"median of {a['steps']} steps after {a['warmup']} warm-up; {env['cpu']}, {env['cpus_usable']} cores, "
           f"{env['backend']}; jax {env['jax']}, torch {env['torch']} ({r['torch_lora']['torch_threads']} threads), "
           f"transformers {env['transformers']}, peft {env['peft']}. Ours: {_levers(r['ours_lora'])} (full "
           f"fine-tuning: {_levers(r['ours_full'])}). float32 matmul peak (jitted {peak['n']}^3 jnp.dot, best of "
           f"{len(peak['seconds'])}): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s"
           + (f" (torch.mm: {peak['torch_mm']['flops_per_s'] / 1e9:.1f} GFLOP/s)" if "torch_mm" in peak else "")
           + f". Peak RSS: each worker process's ru_maxrss, MiB. Load average (1/5/15 min) at start "
           f"{load(env['loadavg_start'])}, at end {load(env['loadavg_end'])}.", "",
           "| | step s | tokens/s | MFU % | peak RSS MB |", "|---|---:|---:|---:|---:|"]
  for label, key in rows:
    x = r[key]
    lines.append(f"| {label} | {x['step_s']:.3f} | {x['tokens_per_s']:.1f} | {100 * x['mfu']:.1f} | "
                 f"{x['peak_rss_mib']:.0f} |")
  lines += ["", f"ratio ours/peer: {result['ratio_ours_over_peer']:.2f}",
            f"LoRA peak memory ours/peer: {result['lora_peak_memory_ours_over_peer']:.2f}", "",
            f"Faster LoRA runs: ours {env_name(r[result['best_ours_lora']])}, the peer's "
            f"{env_name(r[result['best_peer_lora']])}; the memory ratio divides the lower peak RSS of our two LoRA "
            f"runs ({result['ours_lora_peak_rss_mib']:.0f} MiB) by the lower of the peer's two "
            f"({result['peer_lora_peak_rss_mib']:.0f} MiB)."]
  if "variant" in result:
    v = result["variant"]
    lines.append(f"Extra row, micro_batches={v['micro_batches']} (the same batch-{a['batch']} update accumulated over "
                 f"{v['micro_batches']} slices; the peer was not run with gradient accumulation): tokens/s over the "
                 f"peer's best {v['ratio_ours_over_peer']:.2f}, peak RSS over the peer's "
                 f"{v['lora_peak_memory_ours_over_peer']:.2f}.")
  for key, label in (("ours_lora", "ours LoRA"), ("ours_lora_tunables", "ours LoRA, FIAT_GLIBC_MALLOC=reuse"),
                     ("ours_lora_variant", "ours LoRA micro-batched"),
                     ("ours_full", "ours full")):
    m = r.get(key, {}).get("compiled_memory_mib")
    if m and "error" not in m:
      lines.append(f"{label}: compiled memory_analysis (MiB) arguments {m.get('argument_size_in_bytes', 0):.0f}, "
                   f"outputs {m.get('output_size_in_bytes', 0):.0f}, aliased {m.get('alias_size_in_bytes', 0):.0f}, "
                   f"temporaries {m.get('temp_size_in_bytes', 0):.0f}; RSS after compile "
                   f"{r[key]['rss_after_compile_mib']:.0f} MiB; compile {r[key]['compile_s']:.1f} s.")
  lines += ["", "FLOP convention: " + FLOP_CONVENTION,
            f"Model FLOPs per step: LoRA {step_flops('lora', a['batch'], a['seq']) / 1e9:.1f} G, full "
            f"{step_flops('full', a['batch'], a['seq']) / 1e9:.1f} G (N = {matmul_params():,})."]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per worker (median reported)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (our compilation)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--seed", type=int, default=0, help="numpy seed of the token ids")
  ap.add_argument("--loss_chunk", type=int, default=32, help="ours: TrainConfig.loss_chunk (0: none)")
  ap.add_argument("--remat", action="store_true", help="ours: TrainConfig.remat_policy='full'")
  ap.add_argument("--kernels", default="fused", choices=("reference", "fused", "xla_attention"),
                  help="ours: model Config.kernels (fiat_jax/model/ops.py)")
  ap.add_argument("--micro_batches", type=int, default=1,
                  help="ours: TrainConfig.micro_batches (gradient accumulation over slices of the same batch)")
  ap.add_argument("--variant_micro_batches", type=int, default=8,
                  help="also time our LoRA step with this many micro-batches (an extra row, not in the ratios; "
                       "0: skip)")
  ap.add_argument("--torch_threads", type=int, default=0, help="peer: torch.set_num_threads (0: torch's own)")
  ap.add_argument("--no_torch_peak", action="store_true", help="skip torch.mm's peak (reference only)")
  ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--json", default=None, help="write all the numbers here")
  args = ap.parse_args(argv)
  if args.worker:
    out = WORKERS[args.worker](args)
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0

  result = dict(args=vars(args), environment=environment(), config=dict(HF_CONFIG, lora_rank=LORA_RANK,
                lora_alpha=LORA_ALPHA, lora_targets=HF_TARGETS, learning_rate=LEARNING_RATE),
                flop_convention=FLOP_CONVENTION, glibc_tunables=GLIBC_TUNABLES)
  result["peak"] = run_worker("peak", args)
  runs = {}
  runs["ours_lora"] = run_worker("ours_lora", args)
  runs["ours_lora_tunables"] = run_worker("ours_lora", args, tunables=True)
  runs["torch_lora"] = run_worker("torch_lora", args)
  runs["torch_lora_tunables"] = run_worker("torch_lora", args, tunables=True)
  v = args.variant_micro_batches
  if v and v != args.micro_batches and args.batch % v == 0:
    runs["ours_lora_variant"] = run_worker("ours_lora", args, micro_batches=v)
  # Each side's full fine-tuning runs with whichever setting made its LoRA step faster.
  runs["ours_full"] = run_worker("ours_full", args,
                                 tunables=runs["ours_lora_tunables"]["step_s"] < runs["ours_lora"]["step_s"])
  runs["torch_full"] = run_worker("torch_full", args,
                                  tunables=runs["torch_lora_tunables"]["step_s"] < runs["torch_lora"]["step_s"])
  result["runs"] = runs
  result["environment"]["loadavg_end"] = os.getloadavg()
  summarise(result)
  print(report(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
