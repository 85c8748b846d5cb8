"""Compile time of the LoRA train step at depth: `Config.scan_layers` true against false, in one process.

The step is fiat_jax.training.train.train_step as train.train builds it (split_variables, master_copy, optim.make,
train._shardings; jax.jit with the state donated) on accelerator.py's Llama-3.2-1B shape (vocab 128256, d 2048,
32/8 heads, head dim 64, MLP 8192, tied) in bfloat16, LoRA rank 8 / alpha 16 on q, k, v, o, gate, up, down, AdamW
with clipping, batch 1 x --seq_len, loss chunk 512. Each variant is lowered and compiled apart (no step runs):
its inputs are shape-and-sharding structs, so no weights are drawn. --repeats alternates the order of the two
variants; the table shows each column's median. The issue's CPU proxy target: scanned total (lower + compile,
wall seconds) <= 1/3 of the unrolled one. The process's CPU seconds (all threads) are recorded beside the wall
seconds: on a shared machine they vary less (XLA's CPU backend compiles its kernels on parallel threads).

  python benchmarks/compile_depth.py [--layers 16] [--seq_len 2048] [--kernels xla_chunked] [--repeats 1]
      [--loss_chunk 512] [--remat_policy none] [--hlo_counts] [--json out.json]
  python benchmarks/compile_depth.py --smoke --json smoke.json   # 3 tiny float32 layers; also runs one step each

--smoke also draws weights (the unrolled layout, stacked for the scanned one: the same numbers in both) and runs
the first step of each variant, recording its loss. --kernels sets Config.kernels only when given (else 'auto').
"""
import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position

TARGET = 1 / 3  # scanned total / unrolled total
VARIANTS = ("scanned", "unrolled")
GIB = 2 ** 30
TIMES = ("lower_s", "compile_s", "total_s", "cpu_lower_s", "cpu_compile_s", "cpu_total_s")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*?\s([a-z][\w\-]*)\(", re.MULTILINE)  # its opcode


def configs(args):
  """(model Config, TrainConfig) of the unrolled variant, with the flags applied as train.train applies them."""
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  shape = accelerator.SMOKE_MODEL if args.smoke else accelerator.LLAMA_3_2_1B
  hf_cfg = dict(shape, architectures=["LlamaForCausalLM"], num_hidden_layers=args.layers)
  cfg = hf.config_from_hf(hf_cfg, "float32" if args.smoke else "bfloat16", where="compile_depth")
  tcfg = train_lib.TrainConfig(mode="peft", num_steps=2, batch_size=1, tensorboard=False, loss_chunk=args.loss_chunk,
                               remat_policy=args.remat_policy,
                               optim=optim_lib.OptimConfig(optimizer="adamw", learning_rate=accelerator.LEARNING_RATE,
                                                           clip_norm=accelerator.CLIP_NORM))
  fields = dict(lora=lora_lib.LoraConfig(rank=accelerator.LORA_RANK, alpha=accelerator.LORA_ALPHA))
  if args.kernels is not None:
    fields["kernels"] = args.kernels
  return train_lib.step_model_config(dataclasses.replace(cfg, **fields), tcfg), tcfg


def batch(args, vocab: int) -> dict:
  """One row of random ids; position i predicts token i + 1 and the last position has no target."""
  tokens = np.random.default_rng(args.seed).integers(0, vocab, (1, args.seq_len), dtype=np.int32)
  weights = np.ones(tokens.shape, np.float32)
  weights[:, -1] = 0.0
  return dict(decoder_input_tokens=tokens, decoder_target_tokens=np.roll(tokens, -1, axis=1),
              decoder_loss_weights=weights)


def abstract_inputs(cfg, tcfg, mesh):
  """(state, frozen) as shape-and-sharding structs, the optimizer and the shardings: what train._fresh_state
  builds, without drawing weights."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  params = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  lora = jax.eval_shape(lambda p: lora_lib.init(cfg.lora, p, jax.random.PRNGKey(0), cfg.tie_embeddings), params)
  trainable, frozen = train_lib.split_variables(tcfg.mode, params, lora)
  tx = optim_lib.make(tcfg.optim, tcfg.num_steps, trainable, cfg.lora)
  master = jax.eval_shape(train_lib.master_copy, trainable)
  opt = jax.eval_shape(tx.init, master)
  shardings = train_lib._shardings  # pylint: disable=protected-access
  state_sh, frozen_sh = shardings(cfg, tcfg.mode, mesh, trainable, frozen, opt)
  state = dict(step=jax.ShapeDtypeStruct((), np.int32), trainable=master, opt_state=opt,
               rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  with_sh = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  return with_sh(state, state_sh), with_sh(frozen, frozen_sh), tx, state_sh, frozen_sh


def real_inputs(cfg, tcfg, mesh, seed: int):
  """train._fresh_state on drawn weights: the unrolled layout's, stacked when cfg scans, so both variants hold
  the same numbers (LoRA's collections too)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import stacking  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  params = nn.meta.unbox(model_lib.init_params(unrolled, jax.random.PRNGKey(seed)))
  lora = lora_lib.init(cfg.lora, params, jax.random.PRNGKey(seed + 1), cfg.tie_embeddings)
  lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # B = 0 would hide a wrong adapter in the first loss
  if cfg.scan_layers:
    params, lora = stacking.stack(params), stacking.stack(lora)
  return train_lib._fresh_state(tcfg, cfg, params, lora, mesh)  # pylint: disable=protected-access


def hlo_counts(text: str) -> dict:
  """Instruction counts of a compiled module's text: all, fusions, converts, while loops, dots."""
  ops = [m.group(1) for m in _INSTRUCTION.finditer(text)]
  return dict(instructions=len(ops), fusions=ops.count("fusion"), converts=ops.count("convert"),
              whiles=ops.count("while"), dots=ops.count("dot"), text_chars=len(text))


def measure(args, scan: bool) -> dict:
  """Lowers and compiles one variant (a fresh jit each call, so nothing is cached); with --smoke runs a step."""
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  cfg, tcfg = configs(args)
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  mesh = sharding.make_mesh()
  if args.smoke:
    state, frozen, tx, state_sh, frozen_sh = real_inputs(cfg, tcfg, mesh, args.seed)
    abstract = abstract_inputs(cfg, tcfg, mesh)
    if accelerator._avals(abstract[:2]) != accelerator._avals((state, frozen)):  # pylint: disable=protected-access
      raise AssertionError("abstract_inputs and train._fresh_state disagree on shapes or dtypes")
  else:
    state, frozen, tx, state_sh, frozen_sh = abstract_inputs(cfg, tcfg, mesh)
  data = sharding.global_batch(batch(args, cfg.vocab_size), mesh)
  step_fn = functools.partial(train_lib.train_step, model=model_lib.Transformer(cfg), tcfg=tcfg, tx=tx,
                              lr_fn=optim_lib.schedule(tcfg.optim, tcfg.num_steps))
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, {k: v.sharding for k, v in data.items()}),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
  with sharding.activation_rules(mesh):
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jitted.lower(state, frozen, data)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
  memory = compiled.memory_analysis()
  out = dict(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0, cpu_lower_s=c1 - c0, cpu_compile_s=c2 - c1,
             cpu_total_s=c2 - c0,
             temp_bytes=memory.temp_size_in_bytes if memory is not None else None,
             argument_bytes=memory.argument_size_in_bytes if memory is not None else None)
  if args.hlo_counts:
    out["hlo"] = hlo_counts(compiled.as_text())
  if args.smoke:
    with sharding.activation_rules(mesh):
      _, metrics = compiled(state, frozen, data)
    out["first_loss"] = float(metrics["loss"])
  return out


def summarise(runs: dict) -> dict:
  """Medians per variant, and the scanned / unrolled ratio of the medians' totals against TARGET."""
  med = {}
  for name in VARIANTS:
    rows = runs[name]
    med[name] = {k: statistics.median(r[k] for r in rows) for k in TIMES}
    med[name]["temp_bytes"] = rows[0]["temp_bytes"]
    for k in ("hlo", "first_loss"):
      if k in rows[0]:
        med[name][k] = rows[0][k]
  ratio = med["scanned"]["total_s"] / med["unrolled"]["total_s"]
  per_repeat = [s["total_s"] / u["total_s"] for s, u in zip(runs["scanned"], runs["unrolled"])]
  cpu_ratio = med["scanned"]["cpu_total_s"] / med["unrolled"]["cpu_total_s"]
  return dict(medians=med, ratio=ratio, ratios_per_repeat=per_repeat, cpu_ratio=cpu_ratio, target=TARGET,
              met=ratio <= TARGET)


def table(result: dict) -> str:
  med, args = result["summary"]["medians"], result["args"]
  lines = [f"{args['layers']} layers, L {args['seq_len']}, kernels {result['kernels']}, remat {args['remat_policy']}, "
           f"loss chunk {args['loss_chunk']}, {args['repeats']} repeat(s) alternating (medians):", "",
           "| variant | lower s | compile s | total s | CPU s (lower + compile) | temp GiB |",
           "|---|---:|---:|---:|---:|---:|"]
  for name in VARIANTS:
    m = med[name]
    temp = f"{m['temp_bytes'] / GIB:.2f}" if m["temp_bytes"] is not None else "n/a"
    lines.append(f"| {name} | {m['lower_s']:.1f} | {m['compile_s']:.1f} | {m['total_s']:.1f} | "
                 f"{m['cpu_total_s']:.1f} | {temp} |")
  s = result["summary"]
  lines += ["", f"scanned / unrolled total: {s['ratio']:.3f} (per repeat: "
            f"{', '.join(f'{r:.3f}' for r in s['ratios_per_repeat'])}); target <= {TARGET:.3f}: "
            f"{'met' if s['met'] else 'not met'}; in process CPU seconds: {s['cpu_ratio']:.3f}"]
  if "hlo" in med["scanned"]:
    lines += ["", "| variant | HLO instructions | fusions | converts | whiles | dots |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | " + " | ".join(str(med[n]["hlo"][k]) for k in ("instructions", "fusions", "converts",
                                                                          "whiles", "dots")) + " |" for n in VARIANTS]
  if "first_loss" in med["scanned"]:
    lines.append(f"\nfirst loss: scanned {med['scanned']['first_loss']:.6f}, "
                 f"unrolled {med['unrolled']['first_loss']:.6f}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="3 tiny float32 layers, L 64; also runs one step each")
  ap.add_argument("--layers", type=int, default=None, help="default 16 (3 with --smoke)")
  ap.add_argument("--seq_len", type=int, default=None, help="default 2048 (64 with --smoke)")
  ap.add_argument("--loss_chunk", type=int, default=None, help="TrainConfig.loss_chunk; default 512 (16 with --smoke)")
  ap.add_argument("--kernels", default=None, help="Config.kernels (default: unset, i.e. 'auto')")
  ap.add_argument("--remat_policy", default="none", help="TrainConfig.remat_policy, applied as train.train does")
  ap.add_argument("--repeats", type=int, default=1, help="rounds, each variant once, the order alternating")
  ap.add_argument("--hlo_counts", action="store_true", help="also count the compiled modules' instructions")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None, help="write every number here")
  args = ap.parse_args(argv)
  for name, full, smoke in (("layers", 16, 3), ("seq_len", 2048, 64), ("loss_chunk", 512, 16)):
    if getattr(args, name) is None:
      setattr(args, name, smoke if args.smoke else full)
  import jax  # pylint: disable=g-import-not-at-top
  runs = {name: [] for name in VARIANTS}
  for r in range(args.repeats):
    for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
      runs[name].append(measure(args, name == "scanned"))
      print(f"[compile_depth] round {r + 1} {name}: {runs[name][-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
  result = dict(args=vars(args), kernels=args.kernels or "auto", backend=jax.default_backend(),
                jax=jax.__version__, loadavg=os.getloadavg(), runs=runs, summary=summarise(runs),
                forbidden_modules=accelerator._forbidden_loaded())  # pylint: disable=protected-access
  print(table(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
