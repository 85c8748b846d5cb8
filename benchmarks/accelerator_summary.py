"""The accelerator benchmark's arithmetic and table (benchmarks/accelerator.py): model FLOPs under one stated
convention, tokens/s, MFU, the ours / HF ratios, the targets, and the printed report; no JAX or torch here."""
import numpy as np

ROWS = ("ours_lora", "hf_lora", "ours_full", "hf_full", "ours_decode", "hf_decode")
PAIRS = (("lora", "LoRA step"), ("full", "full fine-tuning step"), ("decode", "decode"))
TARGETS = dict(lora_speed=1.2, lora_memory=0.8, compile_s=30.0)

FLOP_CONVENTION = (
    "N = matmul parameters: q, k, v, o, gate, up, down of every layer plus the unembedding (tied to the "
    "embedding, still one D x V product; the embedding lookup is no matmul). Training, per token: 6N full "
    "fine-tuning, 4N LoRA (forward 2N + activation gradients 2N; frozen weights get no weight gradients; LoRA's "
    "rank-8 products ignored); attention per sequence and layer 2*2*L*L*H*E forward over the whole L x L square "
    "(not halved for the causal mask), x3 full, x2 LoRA. Decode: 2 x the layers' matmul parameters per prompt "
    "and new token, 2*D*V per new token, attention 2*2*H*E per layer against every key so far. MFU = model "
    "FLOPs / step time / the bf16 matmul peak measured in the same run.")


# ---- FLOPs ----------------------------------------------------------------------------------------------------

def layer_params(c: dict) -> int:
  d, f, e = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  per_layer = d * c["num_attention_heads"] * e * 2 + d * c["num_key_value_heads"] * e * 2 + 3 * d * f
  return c["num_hidden_layers"] * per_layer


def matmul_params(c: dict) -> int:
  return layer_params(c) + c["hidden_size"] * c["vocab_size"]


def train_flops(kind: str, batch: int, seq: int, c: dict) -> float:
  """Model FLOPs of one update (FLOP_CONVENTION); kind 'lora' or 'full'."""
  attn = 2 * 2 * seq * seq * c["num_attention_heads"] * c["head_dim"] * c["num_hidden_layers"] * batch
  return (4.0 * matmul_params(c) * batch * seq + 2.0 * attn if kind == "lora" else
          6.0 * matmul_params(c) * batch * seq + 3.0 * attn)


def decode_flops(batch: int, prompt: int, new: int, c: dict) -> float:
  """Model FLOPs of one generate call (FLOP_CONVENTION)."""
  keys = prompt * prompt + sum(prompt + t for t in range(1, new + 1))  # keys seen, summed over query tokens
  attn = 2 * 2 * c["num_attention_heads"] * c["head_dim"] * c["num_hidden_layers"] * batch * keys
  return 2.0 * layer_params(c) * batch * (prompt + new) + 2.0 * c["hidden_size"] * c["vocab_size"] * batch * new + attn


# ---- Summary and report -------------------------------------------------------------------------------------

def summarise(result: dict) -> dict:
  """Adds tokens/s, model TFLOP/s and MFU to every row, the ours / HF ratios, and the targets."""
  c, run, rows = result["model"], result["run"], result["rows"]
  peak = result["peak"].get("flops_per_s")
  variants = result.get("variants", {})
  for name, row in [*rows.items(), *variants.items()]:
    row["kind"] = name.split("_")[1].split("[")[0]
    if row["status"] != "ok":
      continue
    if row["kind"] == "decode":
      row["tokens"] = run["decode_batch"] * run["new_tokens"]
      row["model_flops"] = decode_flops(run["decode_batch"], run["prompt_len"], run["new_tokens"], c)
    else:
      row["tokens"] = run["batch"] * run["seq"]
      row["model_flops"] = train_flops(row["kind"], run["batch"], run["seq"], c)
    row["tokens_per_s"] = row["tokens"] / row["step_s"]
    row["model_tflops_per_s"] = row["model_flops"] / row["step_s"] / 1e12
    row["mfu"] = row["model_flops"] / row["step_s"] / peak if peak else None
  ratios = {}
  for kind, _ in PAIRS:
    ours, hf = rows[f"ours_{kind}"], rows[f"hf_{kind}"]
    both = ours["status"] == hf["status"] == "ok"
    mem = both and ours["peak_memory_bytes"] and hf["peak_memory_bytes"]
    ratios[kind] = dict(tokens_per_s=ours["tokens_per_s"] / hf["tokens_per_s"] if both else None,
                        peak_memory=ours["peak_memory_bytes"] / hf["peak_memory_bytes"] if mem else None)
    if both and kind != "decode":
      ratios[kind]["first_loss_difference"] = ours["losses"][0] - hf["losses"][0]
    if both and kind == "decode":
      same = np.asarray(ours["generated"]) == np.asarray(hf["generated"])
      ratios[kind]["tokens_identical"] = float(same.mean())
  result["ratios"] = ratios
  hf = rows["hf_lora"]
  for row in variants.values():  # each against the same peer row as ours_lora
    ok = row["status"] == hf["status"] == "ok"
    row["ratio_tokens_per_s"] = row["tokens_per_s"] / hf["tokens_per_s"] if ok else None
    row["ratio_peak_memory"] = (row["peak_memory_bytes"] / hf["peak_memory_bytes"]
                                if ok and row["peak_memory_bytes"] and hf["peak_memory_bytes"] else None)
  compiles = [rows[k].get("compile_s") for k in ("ours_lora", "ours_full")]
  result["targets"] = dict(
      lora_speed=dict(target=">= 1.2x HF tokens/s", value=ratios["lora"]["tokens_per_s"]),
      lora_memory=dict(target="<= 0.8x HF peak memory", value=ratios["lora"]["peak_memory"]),
      compile_s=dict(target="<= 30 s (ours, LoRA and full)", value=None if None in compiles else max(compiles)),
      full_fits=dict(target=f"ours full fine-tuning runs at batch {run['batch']} x {run['seq']}",
                     value=rows["ours_full"]["status"]))
  t = result["targets"]
  for key, ok in (("lora_speed", lambda v: v >= TARGETS["lora_speed"]),
                  ("lora_memory", lambda v: v <= TARGETS["lora_memory"]),
                  ("compile_s", lambda v: v <= TARGETS["compile_s"]), ("full_fits", lambda v: v == "ok")):
    t[key]["met"] = None if t[key]["value"] is None else bool(ok(t[key]["value"]))
  return result


LABELS = dict(ours_lora="fiat-jax LoRA step", hf_lora="transformers + peft LoRA step",
              ours_full="fiat-jax full fine-tuning step", hf_full="transformers full fine-tuning step",
              ours_decode="fiat-jax decoding.generate", hf_decode="transformers generate")


def report(result: dict) -> str:
  """The side-by-side table, the ratios and the targets."""
  c, run, rows, env, peak = result["model"], result["run"], result["rows"], result["environment"], result["peak"]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  v = env["versions"]
  device = (f"{peak.get('device_kind')} ({peak.get('backend')}, {peak.get('device_count')} device(s))"
            if peak["status"] == "ok" else f"peak worker {peak['status']}")
  lines = [f"{'SMOKE (tiny model on the CPU; not a measurement). ' if result['smoke'] else ''}"
           f"Llama shape: vocab {c['vocab_size']}, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
           f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, MLP {c['intermediate_size']}, bfloat16; "
           f"train batch {run['batch']} x {run['seq']}, median of {run['steps']} steps after {run['warmup']} "
           f"warm-up; decode batch {run['decode_batch']}, prompt {run['prompt_len']}, +{run['new_tokens']} new "
           f"tokens, median of {run['decode_repeats']} after 1. Device: {device}; bf16 matmul peak (jitted "
           f"{peak.get('n')}^3 jnp.dot, best of {len(peak.get('seconds', []))}): "
           f"{fmt(peak.get('flops_per_s') and peak['flops_per_s'] / 1e12, '.1f')} TFLOP/s. jax {v['jax']}, "
           f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}.", "",
           "| | step s | tokens/s | model TFLOP/s | MFU % | peak memory MiB | compile s | first loss | status |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  variants = result.get("variants", {})
  for name, r in [*((n, rows[n]) for n in ROWS), *variants.items()]:
    mem = r.get("peak_memory_bytes")
    loss = r.get("losses") or [None]
    label = LABELS.get(name) or LABELS["ours_lora"] + " " + name[len("ours_lora"):]
    lines.append(f"| {label} | {fmt(r.get('step_s'), '.4f')} | {fmt(r.get('tokens_per_s'), '.1f')} | "
                 f"{fmt(r.get('model_tflops_per_s'), '.3f')} | {fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} | "
                 f"{fmt(mem and mem / 2 ** 20, '.0f')} | {fmt(r.get('compile_s'), '.1f')} | {fmt(loss[0], '.4f')} | "
                 f"{r['status']} |")
  lines += ["", "| ours / HF | tokens/s | peak memory |", "|---|---:|---:|"]
  for kind, label in PAIRS:
    q = result["ratios"][kind]
    lines.append(f"| {label} | {fmt(q['tokens_per_s'], '.2f')} | {fmt(q['peak_memory'], '.2f')} |")
  for name, r in variants.items():
    lines.append(f"| LoRA step, ours {name[len('ours_lora'):]} | {fmt(r.get('ratio_tokens_per_s'), '.2f')} | "
                 f"{fmt(r.get('ratio_peak_memory'), '.2f')} |")
  lines.append("")
  for key, t in result["targets"].items():
    verdict = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
    value = t["value"] if isinstance(t["value"], str) else fmt(t["value"], ".2f")
    lines.append(f"target {key}: {t['target']}: {value} ({verdict})")
  q = result["ratios"]
  memory = sorted({rows[n]["memory_source"] for n in ROWS if rows[n].get("memory_source")})
  same = q["decode"].get("tokens_identical")
  lines += ["", f"First-step loss ours - HF (same weights, same batch): LoRA "
            f"{fmt(q['lora'].get('first_loss_difference'), '+.2e')}, full "
            f"{fmt(q['full'].get('first_loss_difference'), '+.2e')}. Decoded tokens identical: "
            f"{fmt(same and 100 * same, '.1f')}%.",
            f"Peak memory: {', '.join(memory)}. Compile: ours lower + compile of the step (decode: the first "
            "generate call, compilation included); HF the first step (first generate call).",
            "FLOP convention: " + FLOP_CONVENTION]
  for name in ("ours_lora", "ours_full"):
    drift = rows[name].get("state_dtype_drift")
    if drift:
      lines.append(f"{LABELS[name]}: the step returns {len(drift)} state leaves in another dtype than "
                   f"train._fresh_state builds them (e.g. {drift[0]}), so train.train compiles its step twice; "
                   "measured here from the returned dtypes with one compilation.")
  return "\n".join(lines)
