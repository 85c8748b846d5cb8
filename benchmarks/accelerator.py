"""One training step and greedy decoding on an accelerator: fiat-jax against transformers + peft, one process each.

The model is Llama-3.2-1B's shape (vocab 128256, hidden 2048, 16 layers, 32 heads / 8 kv heads, head dim 64,
MLP 8192, tied embeddings, rope_theta 500000; its llama3 rope scaling is left out: it changes no cost) with
random bfloat16 weights: transformers builds them once (torch seed 0) and saves them with save_pretrained; every
worker loads that checkpoint (ours with fiat_jax.model.hf.load, the peer with from_pretrained), so both sides start
from the same weights and their first losses agree. Batch 8 x 2048 random token ids (one numpy seed for both);
LoRA rank 8, alpha 16 on q, k, v, o, gate, up, down; AdamW (lr 1e-4, no weight decay, global-norm clip 1.0 on
both sides: our OptimConfig's defaults). Rows, each in its own subprocess of this script (`--worker NAME`):
  ours LoRA / full: fiat_jax.training.train's step built as train.train builds it (_fresh_state's state, shardings and
    optim.make; jax.jit with the state donated), lowered and compiled apart from the first step;
  HF LoRA / full: LlamaForCausalLM(attn_implementation="sdpa") in bfloat16 (+ peft LoraConfig),
    torch.optim.AdamW(fused=True) on CUDA (fused=False on CPU), labels=input_ids;
  decode: fiat_jax.model.decoding.generate (KV cache) against transformers' generate(use_cache=True), greedy,
    batch 16, prompt 128, 128 new tokens.
A worker that runs out of memory is recorded as "oom" and the run goes on. JAX workers get
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless it is set (XLA's default 0.75 would cap ours below what torch may use).

  python benchmarks/accelerator.py --json out.json
      [--kernels NAME] [--scan_layers true|false] [--remat_policy NAME] [--loss_chunk N]
      [--batch 8 --seq 2048 --warmup 2 --steps 5] [--decode_batch 16 --prompt_len 128 --new_tokens 128]
      [--worker_timeout 300] [--lora_variants kernels=triton loss_chunk=512,remat_policy=minimal ...]
  python benchmarks/accelerator.py --smoke --json smoke.json   # tiny model on the CPU, every row, same JSON
  python benchmarks/accelerator.py --check_imports             # exit 1 if our workers' imports load seqio/TF

--kernels, --scan_layers (model Config fields) and --remat_policy (a TrainConfig field) go to our side only when
given, through dataclasses.replace: --kernels picks ops.py's kernels ('auto', 'fused', 'reference',
'xla_attention', 'xla_chunked', 'cudnn', ... as the checkout defines them), --scan_layers scans one block over
the layers, --remat_policy names what the backward pass keeps ('none', 'full', 'minimal',
'save_dots_except_mlp', ...). A flag whose field this checkout lacks makes our rows errors that name it. Our
side runs scanned layers unless --scan_layers false: the product's default. --lora_variants adds rows of our LoRA
step, each with its own flags (comma-separated NAME=VALUE), each against the same peer row. The JSON is rewritten
after every worker ("complete": false until the last), so a run stopped from outside keeps what it measured.
"""
import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accelerator_summary as summary  # pylint: disable=g-import-not-at-top,wrong-import-position

# transformers LlamaConfig fields. No eos token: greedy decoding runs to the end on both sides without
# min_new_tokens (which would mask a logit the other side keeps).
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=None,
                    eos_token_id=None, attention_dropout=0.0)
# The smoke model's weights are drawn 10x wider than Llama's 0.02, so that its first loss depends on them (at 0.02
# every logit is near 0 and any weights give a loss near ln(vocab)): the first-loss check then tells weights apart.
SMOKE_MODEL = dict(LLAMA_3_2_1B, vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   initializer_range=0.2)
# Run shapes; explicit flags override them. peak_n: the bf16 matmul of the peak measurement.
RUN = dict(batch=8, seq=2048, warmup=2, steps=5, decode_batch=16, prompt_len=128, new_tokens=128,
           decode_repeats=3, peak_n=16384, peak_repeats=10, worker_timeout=300)
SMOKE_RUN = dict(batch=2, seq=64, warmup=1, steps=1, decode_batch=2, prompt_len=16, new_tokens=8,
                 decode_repeats=1, peak_n=256, peak_repeats=3, worker_timeout=120)
LORA_RANK, LORA_ALPHA, LEARNING_RATE, CLIP_NORM = 8, 16.0, 1e-4, 1.0
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORBIDDEN = ("seqio", "tensorflow")  # absent from the accelerator machine
VARIANT_FLAGS = ("kernels", "scan_layers", "remat_policy", "loss_chunk")


def _bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
  return text.lower() in ("true", "1")


# ---- Shapes and inputs ----------------------------------------------------------------------------------------

def shapes(args) -> tuple[dict, dict]:
  """(model config, run shape) for --smoke or the default run, with explicit flags applied."""
  model, run = (SMOKE_MODEL, SMOKE_RUN) if args.smoke else (LLAMA_3_2_1B, RUN)
  return dict(model), {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in run.items()}


def train_tokens(run: dict, vocab: int, seed: int) -> np.ndarray:
  """[warmup + steps, batch, seq] random ids: every step its own batch, the same on both sides."""
  count = run["warmup"] + run["steps"]
  return np.random.default_rng(seed).integers(0, vocab, (count, run["batch"], run["seq"]), dtype=np.int32)


def prompts(run: dict, vocab: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed + 1).integers(0, vocab, (run["decode_batch"], run["prompt_len"]), dtype=np.int32)


# ---- Worker helpers -------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _forbidden_loaded() -> list[str]:
  return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def _is_oom(text: str) -> bool:
  return "OutOfMemory" in text or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _steps(step, warmup: int, steps: int) -> tuple[float, list, list]:
  """(first step s, other warm-up step s, timed step s): `step(i)` runs update i and waits for it."""
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    step(i)
    times.append(time.perf_counter() - t0)
  return times[0], times[1:warmup], times[warmup:]


def _avals(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _jax_peak_memory(compiled=None) -> tuple[int | None, str]:
  """(bytes, source): the device allocator's peak, else the compiled step's footprint; peak RSS on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  if devices[0].platform == "cpu":
    return _rss_bytes(), "peak RSS"
  stats = [d.memory_stats() or {} for d in devices]
  if all("peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use"
  m = compiled.memory_analysis() if compiled is not None else None
  if m is not None:
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
            "compiled memory_analysis")
  return None, "unavailable"


def _replace(obj, what: str, fields: dict):
  """dataclasses.replace, with a clear message when this checkout's dataclass lacks a field."""
  known = {f.name for f in dataclasses.fields(obj)}
  for name in fields:
    if name not in known:
      raise ValueError(f"--{name}: this checkout's {what} has no field {name!r}")
  return dataclasses.replace(obj, **fields) if fields else obj


def _overrides(args) -> tuple[dict, dict]:
  """(model Config fields, TrainConfig fields) from the flags given, and only those."""
  model = {k: getattr(args, k) for k in ("kernels", "scan_layers") if getattr(args, k) is not None}
  trainer = {k: getattr(args, k) for k in ("remat_policy", "loss_chunk") if getattr(args, k) is not None}
  return model, trainer


def _ours_model(args, ckpt: str, lora: bool):
  """(Config, params, mesh): the checkpoint as fiat_jax.model.hf.load reads it, with the given Config overrides."""
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  fields = _overrides(args)[0]
  # The layout is chosen at load: hf.load stacks each layer's tensors for Config.scan_layers. Scanned unless
  # --scan_layers false: the product's default (experiment.tau_model).
  cfg, params = hf.load(ckpt, mesh=mesh, scan_layers=bool(fields.pop("scan_layers", True)))
  cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA) if lora else None)
  return _replace(cfg, "model.Config", fields), params, mesh


# ---- Workers --------------------------------------------------------------------------------------------------

def worker_peak(args, ckpt: str) -> dict:
  """bf16 matmul peak: a jitted n^3 jnp.dot, best of several; and the JAX side's environment."""
  del ckpt
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, run = shapes(args)
  n = run["peak_n"]
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in range(2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(run["peak_repeats"]):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  d = jax.devices()[0]
  return dict(n=n, seconds=times, flops_per_s=2.0 * n ** 3 / min(times), backend=jax.default_backend(),
              device_kind=d.device_kind, device_count=jax.device_count(), jax=jax.__version__)


def worker_ours_train(args, ckpt: str, mode: str) -> dict:
  """fiat_jax.training.train.train_step as train.train builds it (mode 'peft' or 'full'), lowered and compiled apart."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  c, run = shapes(args)
  cfg, params, mesh = _ours_model(args, ckpt, lora=mode == "peft")
  num_steps = run["warmup"] + run["steps"]
  tcfg = train_lib.TrainConfig(mode=mode, num_steps=num_steps, batch_size=run["batch"], tensorboard=False,
                               optim=optim_lib.OptimConfig(optimizer="adamw", learning_rate=LEARNING_RATE,
                                                           clip_norm=CLIP_NORM))
  tcfg = _replace(tcfg, "train.TrainConfig", _overrides(args)[1])
  cfg = train_lib.step_model_config(cfg, tcfg)  # the remat policy and compute dtype, as train.train applies them
  model = model_lib.Transformer(cfg)
  state, frozen, tx, state_sh, frozen_sh = train_lib._fresh_state(  # pylint: disable=protected-access
      tcfg, cfg, params, None, mesh)
  del params  # the state holds its own copy (the step donates it); frozen aliases the loaded arrays
  counts = dict(trainable=lora_lib.count(state["trainable"]), frozen=lora_lib.count(frozen))
  tokens = train_tokens(run, c["vocab_size"], args.seed)
  # Position i predicts token i + 1; the last position has no target: the same L - 1 predictions per row as
  # transformers' labels=input_ids.
  weights = np.ones(tokens.shape[1:], np.float32)
  weights[:, -1] = 0.0
  local = lambda i: dict(decoder_input_tokens=tokens[i], decoder_target_tokens=np.roll(tokens[i], -1, axis=1),
                         decoder_loss_weights=weights)
  batches = [sharding.global_batch(local(i), mesh) for i in range(num_steps)]
  batch_sh = {k: v.sharding for k, v in batches[0].items()}
  step_fn = functools.partial(train_lib.train_step, model=model, tcfg=tcfg, tx=tx,
                              lr_fn=optim_lib.schedule(tcfg.optim, num_steps))
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
  # The state the step returns may differ in dtype from the one _fresh_state builds (float32 gradients promote
  # bfloat16 Adam moments): train.train's jax.jit then compiles a second time at step 2. Start from the returned
  # dtypes (zeros either way, so step 1 computes the same) and compile once; the drift is recorded, not hidden.
  with sharding.activation_rules(mesh):
    returned = jax.eval_shape(step_fn, state, frozen, batches[0])[0]
  before, after = _avals(state), _avals(returned)
  drift = [f"{k}: {before[k][1]} -> {after[k][1]}" for k in before if before[k] != after[k]]
  if drift:
    state = jax.jit(lambda s: jax.tree_util.tree_map(lambda x, r: x.astype(r.dtype), s, returned),
                    out_shardings=state_sh, donate_argnums=(0,))(state)
  t0 = time.perf_counter()
  with sharding.activation_rules(mesh):
    compiled = jitted.lower(state, frozen, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  holder, losses = dict(state=state), []
  del state

  def step(i):
    with sharding.activation_rules(mesh):
      holder["state"], metrics = compiled(holder["state"], frozen, batches[i])
    jax.block_until_ready((holder["state"], metrics))
    losses.append(float(metrics["loss"]))

  first, warm, timed = _steps(step, run["warmup"], run["steps"])
  peak, source = _jax_peak_memory(compiled)
  return dict(compile_s=compile_s, state_dtype_drift=drift, first_step_s=first,
              warmup_s=warm, seconds=timed, losses=losses, params=counts,
              peak_memory_bytes=peak, memory_source=source, config=dict(kernels=getattr(cfg, "kernels", None),
              scan_layers=getattr(cfg, "scan_layers", None), model_remat_policy=getattr(cfg, "remat_policy", None),
              remat_policy=getattr(tcfg, "remat_policy", None), loss_chunk=tcfg.loss_chunk, dtype=cfg.dtype))


def worker_ours_decode(args, ckpt: str) -> dict:
  """fiat_jax.model.decoding.generate, greedy, KV cache; the first call (compilation included) apart."""
  from fiat_jax.model import decoding  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  c, run = shapes(args)
  cfg, params, _ = _ours_model(args, ckpt, lora=False)
  model, variables = model_lib.Transformer(cfg), {"params": params}
  rows = prompts(run, c["vocab_size"], args.seed).tolist()
  out = {}

  def call(i):
    del i
    out["tokens"] = decoding.generate(model, variables, rows, max_new_tokens=run["new_tokens"], eos_id=None,
                                      batch_size=len(rows)).tokens

  first, warm, timed = _steps(call, 1, run["decode_repeats"])
  peak, source = _jax_peak_memory()
  return dict(compile_s=first, first_step_s=first, warmup_s=warm, seconds=timed, generated=out["tokens"],
              peak_memory_bytes=peak, memory_source=source)


def _hf_model(ckpt: str):
  """(model, torch, device): LlamaForCausalLM with sdpa attention in bfloat16 on CUDA when there is one."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa")
  return model.to(device=device, dtype=torch.bfloat16), torch, device


def _hf_memory(torch, device: str) -> tuple[int, str]:
  if device == "cuda":
    return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
  return _rss_bytes(), "peak RSS"


def worker_hf_train(args, ckpt: str, mode: str) -> dict:
  """transformers (+ peft) step: loss on labels=input_ids, clip, torch AdamW over the trainable parameters."""
  import peft  # pylint: disable=g-import-not-at-top
  c, run = shapes(args)
  model, torch, device = _hf_model(ckpt)
  if mode == "peft":
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                       target_modules=list(HF_TARGETS), bias="none",
                                                       task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  fused = device == "cuda"
  opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0, fused=fused)
  counts = dict(trainable=sum(p.numel() for p in trainable),
                frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad))
  tokens = torch.from_numpy(train_tokens(run, c["vocab_size"], args.seed).astype(np.int64)).to(device)
  losses = []

  def step(i):
    loss = model(input_ids=tokens[i], labels=tokens[i], use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))  # waits for the device
    if fused:
      torch.cuda.synchronize()

  first, warm, timed = _steps(step, run["warmup"], run["steps"])
  peak, source = _hf_memory(torch, device)
  return dict(compile_s=first, first_step_s=first, warmup_s=warm, seconds=timed, losses=losses, params=counts,
              peak_memory_bytes=peak, memory_source=source, device=device, fused_adamw=fused,
              trainable_dtypes=sorted({str(p.dtype) for p in trainable}),
              device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor())


def worker_hf_decode(args, ckpt: str) -> dict:
  """transformers generate(use_cache=True), greedy; the first call apart."""
  c, run = shapes(args)
  model, torch, device = _hf_model(ckpt)
  model.eval()
  ids = torch.from_numpy(prompts(run, c["vocab_size"], args.seed).astype(np.int64)).to(device)
  out = {}

  def call(i):
    del i
    with torch.inference_mode():
      gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=run["new_tokens"],
                           do_sample=False, use_cache=True, pad_token_id=0)
    out["tokens"] = gen[:, ids.shape[1]:].cpu().tolist()  # waits for the device

  first, warm, timed = _steps(call, 1, run["decode_repeats"])
  peak, source = _hf_memory(torch, device)
  return dict(compile_s=first, first_step_s=first, warmup_s=warm, seconds=timed, generated=out["tokens"],
              peak_memory_bytes=peak, memory_source=source, device=device)


WORKERS = dict(peak=worker_peak,
               ours_lora=lambda a, p: worker_ours_train(a, p, "peft"),
               ours_full=lambda a, p: worker_ours_train(a, p, "full"),
               hf_lora=lambda a, p: worker_hf_train(a, p, "peft"),
               hf_full=lambda a, p: worker_hf_train(a, p, "full"),
               ours_decode=worker_ours_decode, hf_decode=worker_hf_decode)


def run_as_worker(args) -> int:
  """Runs one worker and writes its JSON to --result; an out-of-memory or other failure is written, not raised."""
  try:
    out = dict(WORKERS[args.worker](args, args.ckpt), status="ok")
    if out.get("seconds"):
      out["step_s"] = statistics.median(out["seconds"])
  except Exception as e:  # pylint: disable=broad-except
    out = dict(status="oom" if _is_oom(f"{type(e).__name__} {e}") else "error",
               error=traceback.format_exc()[-3000:])
  if args.worker.startswith("ours"):
    out["forbidden_modules"] = _forbidden_loaded()
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(out, f)
  return 0


def check_imports() -> list[str]:
  """seqio / TensorFlow modules that our workers' imports load (none may: the accelerator machine has neither)."""
  for name in ("model.decoding", "model.hf", "model.lora", "model.transformer", "training.optim", "model.sharding",
               "training.train"):
    importlib.import_module("fiat_jax." + name)
  return _forbidden_loaded()


# ---- Driver ---------------------------------------------------------------------------------------------------

def build_checkpoint(model_cfg: dict, ckpt: str, seed: int):
  """Random bfloat16 weights from transformers (torch seed `seed`), saved with save_pretrained."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: half the host memory of a float32 build
  try:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_cfg))
  finally:
    torch.set_default_dtype(default)
  model.save_pretrained(ckpt)


def variant_argv(spec: str) -> list[str]:
  """'loss_chunk=512,remat_policy=minimal' -> ['--loss_chunk', '512', '--remat_policy', 'minimal'] (our flags)."""
  out = []
  for item in spec.split(","):
    key, sep, value = item.partition("=")
    if not sep or key not in VARIANT_FLAGS:
      raise ValueError(f"--lora_variants {spec!r}: {item!r} is not NAME=VALUE with NAME one of "
                       f"{', '.join(VARIANT_FLAGS)}")
    out += [f"--{key}", value]
  return out


def run_worker(name: str, argv: list[str], ckpt: str, tmp: str, run: dict, smoke: bool, label: str = "") -> dict:
  """`--worker name` in a fresh process under the per-worker timeout; its JSON, or why there is none."""
  label = label or name
  result = os.path.join(tmp, re.sub(r"\W", "_", label) + ".json")
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name, "--ckpt", ckpt, "--result", result]
  env = dict(os.environ)
  if smoke:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  if not name.startswith("hf"):
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  print(f"[accelerator] {label} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=run["worker_timeout"], check=False)
  except subprocess.TimeoutExpired:
    out = dict(status="timeout", error=f"no result within --worker_timeout {run['worker_timeout']} s")
  else:
    if os.path.exists(result):
      with open(result, encoding="utf-8") as f:
        out = json.load(f)
    else:  # died without writing: an allocator's abort, or killed for host memory
      out = dict(status="oom" if _is_oom(proc.stderr[-3000:]) else "error",
                 error=f"exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    out["stderr_tail"] = proc.stderr[-2000:]  # XLA's and the libraries' warnings, kept for the record
  out["wall_s"] = time.perf_counter() - t0
  done = f"{out['step_s']:.4f} s/step" if "step_s" in out else out["status"]
  extra = f", compile {out['compile_s']:.1f} s" if out.get("compile_s") is not None else ""
  print(f"[accelerator] {label}: {done}{extra} ({out['wall_s']:.0f} s)", file=sys.stderr, flush=True)
  if out["status"] == "error":
    print(out["error"], file=sys.stderr, flush=True)
  return out


def environment() -> dict:
  """Host and package versions, read without importing JAX (the driver must leave the accelerator to workers)."""
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "gin-config", "torch", "transformers", "peft"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(versions=versions, python=platform.python_version(), cpu=cpu, cpu_count=os.cpu_count(),
              loadavg_start=os.getloadavg())


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, every row (the same JSON)")
  ap.add_argument("--json", default=None, help="write every number here")
  ap.add_argument("--seed", type=int, default=0, help="torch seed of the weights, numpy seed of the token ids")
  for name in RUN:
    ap.add_argument(f"--{name}", type=int, default=None, help=f"default {RUN[name]} ({SMOKE_RUN[name]} with --smoke)")
  ap.add_argument("--kernels", default=None, help="ours: model Config.kernels (only when given)")
  ap.add_argument("--scan_layers", type=_bool, default=None, help="ours: model Config.scan_layers (only when given)")
  ap.add_argument("--remat_policy", default=None, help="ours: TrainConfig.remat_policy (only when given)")
  ap.add_argument("--loss_chunk", type=int, default=None, help="ours: TrainConfig.loss_chunk (only when given)")
  ap.add_argument("--lora_variants", nargs="*", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                  help="extra rows of our LoRA step with these flags (e.g. kernels=triton loss_chunk=512), each "
                       "against the same peer row")
  ap.add_argument("--check_imports", action="store_true", help="exit 1 if our workers' imports load seqio / TF")
  ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.check_imports:
    bad = check_imports()
    print("forbidden modules loaded: " + (", ".join(bad) if bad else "none"))
    return 1 if bad else 0
  if args.worker:
    return run_as_worker(args)

  model_cfg, run = shapes(args)
  result = dict(args=vars(args), smoke=args.smoke, model=model_cfg, run=run, environment=environment(),
                lora=dict(rank=LORA_RANK, alpha=LORA_ALPHA, targets=HF_TARGETS),
                optimizer=dict(name="adamw", learning_rate=LEARNING_RATE, weight_decay=0.0, clip_norm=CLIP_NORM),
                flop_convention=summary.FLOP_CONVENTION)
  variants = {f"ours_lora[{v}]": variant_argv(v) for v in args.lora_variants}
  result.update(rows={}, variants={}, complete=False)

  def dump():  # after every worker, so that a run stopped from outside keeps what it measured
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)

  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "checkpoint")
    t0 = time.perf_counter()
    build_checkpoint(model_cfg, ckpt, args.seed)
    result["checkpoint_s"] = time.perf_counter() - t0
    result["peak"] = run_worker("peak", argv, ckpt, tmp, run, args.smoke)
    dump()
    for name in summary.ROWS:
      result["rows"][name] = run_worker(name, argv, ckpt, tmp, run, args.smoke)
      dump()
    for name, extra in variants.items():
      result["variants"][name] = run_worker("ours_lora", argv + extra, ckpt, tmp, run, args.smoke, label=name)
      dump()
  result["environment"]["loadavg_end"] = os.getloadavg()
  result["complete"] = True
  summary.summarise(result)
  print(summary.report(result))
  dump()
  everything = [result["peak"], *result["rows"].values(), *result["variants"].values()]
  return 1 if any(r["status"] == "error" for r in everything) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
