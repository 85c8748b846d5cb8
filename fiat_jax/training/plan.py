"""`fiat plan`: bytes per device of parameters, LoRA, optimizer state, batch, activations and KV cache for a model,
mesh and batch, and whether they fit a named device (TPU v4 / v5e / v5p / v6e, H100).

Sizes of stored trees come from `jax.eval_shape` and the run's shardings (nothing is allocated); activations are
XLA's temporary buffers from the compiled memory analysis of the real train step and decode step. The plan reads
the run's own gin files: the model (`hf.model_config`), `TrainConfig` (mode, batch size, micro-batches, compute
dtype, remat policy, optimizer), `make_mesh` (data / fsdp / model) and the row length (Experiment.inputs_length +
targets_length); `plan.*` can override the sequence length and adds the decode shape and the device. With `plan.num_devices` set, the program is compiled for that many emulated CPU devices (planning for
a machine you are not on); without it, for this machine's devices.

  fiat plan --gin_file=models/gemma-2-2b-it.gin --mesh=data=1,fsdp=16,model=1 --device=v5e --gin.plan.seq_len=1024
"""
import dataclasses
import functools
import json
import math
import time
import typing

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import sharding
from fiat_jax.model import transformer as model_lib

GiB = 2 ** 30


class Device(typing.NamedTuple):
  name: str
  hbm_bytes: int  # per chip
  usable: float  # fraction a JAX program can use by default


# Per-chip HBM as Google / NVIDIA publish it. JAX on GPU preallocates 75% of memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); TPUs give a program (nearly) all of it.
DEVICES = {
    "v4": Device("TPU v4", 32 * GiB, 1.0),
    "v5e": Device("TPU v5e", 16 * GiB, 1.0),
    "v5p": Device("TPU v5p", 95 * GiB, 1.0),
    "v6e": Device("TPU v6e", 32 * GiB, 1.0),
    "h100": Device("NVIDIA H100 80GB", 81559 * 2 ** 20, 0.75),
}
BATCH_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "decoder_causal_attention")


def device_spec(name: str) -> Device:
  key = name.lower()
  if key not in DEVICES:
    raise ValueError(f"plan.device: {name!r} is not one of {', '.join(DEVICES)}")
  return DEVICES[key]


def abstract_mesh(data: int, fsdp: int, model: int) -> jax.sharding.AbstractMesh:
  """A device-free mesh: enough to compute every shard's shape."""
  return jax.sharding.AbstractMesh((data, fsdp, model), sharding.MESH_AXES)


def resolve_mesh(num_devices: int, data: int = -1, fsdp: int = 1, model: int = 1) -> dict:
  """Mesh axis sizes with a -1 filled in (make_mesh's rule), checked against num_devices."""
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"plan mesh: at most one axis may be -1, got data={data} fsdp={fsdp} model={model}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"plan mesh: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"plan mesh: data*fsdp*model = {math.prod(sizes)} but num_devices = {num_devices}")
  return dict(zip(sharding.MESH_AXES, sizes))


def bytes_per_device(shapes, shardings) -> int:
  """Sum over leaves of the bytes of one device's shard (the largest, when a dimension does not divide)."""
  leaves = jax.tree_util.tree_leaves(shapes)
  shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(leaves) != len(shards):
    raise ValueError(f"bytes_per_device: {len(leaves)} arrays but {len(shards)} shardings")
  return int(sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards)))


def tree_bytes(shapes) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes)))


def cache_shardings(cfg: model_lib.Config, cache_shapes, mesh, rules=None):
  """KV cache [B, K, S, E] (head-major; scanned: [layers, B, K, S, E]) sharded over batch and kv_heads;
  positions / segments [B, S] over batch."""
  kv = PartitionSpec("batch", "kv_heads", "length", "head_dim")
  if cfg.scan_layers:
    stacked = PartitionSpec("layers", *kv)
    layers = dict(k=stacked, v=stacked)
  else:
    layers = [dict(k=kv, v=kv) for _ in range(cfg.num_layers)]
  specs = dict(layers=layers, index=PartitionSpec(),
               positions=PartitionSpec("batch", "length"), segments=PartitionSpec("batch", "length"))
  return sharding.to_shardings(specs, mesh, rules, cache_shapes)


def _lora_config(lora) -> lora_lib.LoraConfig:
  if isinstance(lora, lora_lib.LoraConfig):
    return lora
  return lora_lib.LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(lora or {}).items()})


def _gin_or(name: str, default):
  """A value bound in the run's gin files (e.g. make_mesh.fsdp), else the default."""
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def run_seq_len() -> int:
  """The run's training row length: seqio's decoder rows hold the inputs then the targets."""
  from fiat_jax import experiment  # pylint: disable=g-import-not-at-top  # seqio: only `fiat plan` needs it
  fields = {f.name: f.default for f in dataclasses.fields(experiment.Experiment)}
  return sum(_gin_or(f"Experiment.{n}", fields[n]) for n in ("inputs_length", "targets_length"))


def _train_config():
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  return train_lib.TrainConfig()


@gin.configurable("plan")
def plan(model: model_lib.Config | None = None, lora=None, train=None, seq_len: int | None = None,
         decode_batch: int = 8, decode_len: int = 2048, device: str = "v5e", num_devices: int | None = None,
         data: int | None = None, fsdp: int | None = None, model_axis: int | None = None, compile: bool = True,
         rules=None) -> dict:
  """The memory plan of one run, per device (bytes), for training and for KV-cache decoding.

  Args:
    model: the architecture (default: hf.model_config(), bound by a gin_configs/models file).
    lora: LoraConfig or a dict of its fields, for mode 'peft' when the model config has none (default rank 8).
    train: a TrainConfig (default: TrainConfig() with the gin bindings: mode, batch_size, micro_batches,
      compute_dtype, optim).
    seq_len: training sequence length (decoder_input_tokens per row); default: the run's, its prefix-LM rows
      Experiment.inputs_length + Experiment.targets_length as the gin files bind them (else their defaults).
    decode_batch, decode_len: rows and cache length (prompt + new tokens) of KV-cache decoding.
    num_devices: devices of the planned mesh (default: this machine's).
    data, fsdp, model_axis: mesh axis sizes (default: make_mesh's gin bindings, else data=-1).
    compile: also compile the train and decode steps for the activations (XLA temporaries).
  """
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  if model is None:
    from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
    model = hf.model_config()
  tcfg = train if train is not None else _train_config()
  if seq_len is None:
    seq_len = run_seq_len()
  if tcfg.mode == "peft" and model.lora is None:
    model = dataclasses.replace(model, lora=_lora_config(lora))
  if tcfg.mode == "full":
    model = dataclasses.replace(model, lora=None)
  cfg = dataclasses.replace(model, remat_policy=tcfg.remat_policy,
                            **({"dtype": tcfg.compute_dtype} if tcfg.compute_dtype else {}))
  dev = device_spec(device)
  n = jax.device_count() if num_devices is None else int(num_devices)
  axes = resolve_mesh(n, _gin_or("make_mesh.data", -1) if data is None else data,
                      _gin_or("make_mesh.fsdp", 1) if fsdp is None else fsdp,
                      _gin_or("make_mesh.model", 1) if model_axis is None else model_axis)
  batch_shards = axes["data"] * axes["fsdp"]
  for what, rows in (("TrainConfig.batch_size", tcfg.batch_size), ("plan.decode_batch", decode_batch)):
    if rows % batch_shards:
      raise ValueError(f"{what}={rows} is not divisible by data*fsdp={batch_shards} (the batch's shards): bind "
                       f"--gin.{what}=<a multiple of {batch_shards}>")
  amesh = abstract_mesh(**axes)
  replicated = NamedSharding(amesh, PartitionSpec())

  logging.info("plan: %s mesh %s on %d %s devices, mode %s: shapes and shardings of the stored trees", device,
               axes, n, dev.name, tcfg.mode)
  key = jax.random.PRNGKey(0)
  params = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, key)))
  params_sh = sharding.param_shardings(cfg, amesh, rules)
  cols, cols_sh = {}, {}
  if tcfg.mode == "peft":
    # params as an argument (traced): PiSSA's init runs an SVD of each kernel
    cols = jax.eval_shape(lambda p: lora_lib.init(cfg.lora, p, key, cfg.tie_embeddings), params)
    cols_sh = sharding.lora_shardings(cfg, amesh, rules)
  trainable, frozen = train_lib.split_variables(tcfg.mode, params, cols)
  trainable = jax.eval_shape(train_lib.master_copy, trainable)  # float32, as the trainer holds it
  # The weights the step reads: the frozen base (param_dtype) in peft, the float32 master weights in full.
  weights = trainable["params"] if tcfg.mode == "full" else params
  trainable_sh = {k: params_sh if k == "params" else cols_sh[k] for k in trainable}
  frozen_sh = {k: params_sh if k == "params" else cols_sh[k] for k in frozen}
  tx = optim_lib.make(tcfg.optim, tcfg.num_steps, trainable, cfg.lora)
  opt = jax.eval_shape(tx.init, trainable)
  with_shapes = jax.tree_util.tree_map(lambda sh, x: (sh, tuple(x.shape)), trainable_sh, trainable)
  opt_sh = train_lib.like_params(opt, with_shapes, replicated)  # as the trainer lays the state out
  batch = {k: jax.ShapeDtypeStruct((tcfg.batch_size, seq_len), jnp.int32) for k in BATCH_FEATURES}
  batch_sh = {k: sharding.batch_sharding(amesh, 2, rules) for k in batch}
  cache = jax.eval_shape(lambda: model_lib.init_cache(cfg, decode_batch, decode_len))
  cache_sh = cache_shardings(cfg, cache, amesh, rules)

  lora_shapes = {k: v for k, v in cols.items()}
  lora_sh = {k: cols_sh[k] for k in cols}
  sizes = dict(params=bytes_per_device(weights, params_sh), lora=bytes_per_device(lora_shapes, lora_sh),
               optimizer=bytes_per_device(opt, opt_sh), batch=bytes_per_device(batch, batch_sh),
               kv_cache=bytes_per_device(cache, cache_sh))
  result = dict(device=device, device_name=dev.name, hbm_bytes=dev.hbm_bytes,
                usable_bytes=int(dev.hbm_bytes * dev.usable), num_devices=n, mesh=axes, mode=tcfg.mode,
                batch_size=tcfg.batch_size, seq_len=seq_len, decode_batch=decode_batch, decode_len=decode_len,
                compute_dtype=cfg.dtype, param_dtype=cfg.param_dtype, optimizer=tcfg.optim.optimizer,
                trainable_dtype=" ".join(sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(trainable)})),
                counts=dict(params=lora_lib.count(params), trainable=lora_lib.count(trainable)),
                global_bytes=dict(params=tree_bytes(weights), lora=tree_bytes(lora_shapes), optimizer=tree_bytes(opt),
                                  kv_cache=tree_bytes(cache)),
                per_device=sizes, compiled=None, backend=None)
  if compile:
    mesh = _concrete_mesh(axes)
    conc = lambda tree_sh: jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s.spec), tree_sh,
                                                  is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable, opt_state=opt,
                 rng=jax.eval_shape(lambda: key))
    state_sh = dict(step=replicated, trainable=trainable_sh, opt_state=opt_sh, rng=replicated)
    logging.info("plan: compiling the train step for its activation memory (minutes on CPU for billions of "
                 "parameters; --no_compile skips it)")
    t0 = time.perf_counter()
    train_mem = _compile_train(cfg, tcfg, tx, state, frozen, batch, conc(state_sh), conc(frozen_sh),
                               conc(batch_sh), mesh, rules)
    logging.info("plan: train step compiled in %.0f s; compiling the decode step", time.perf_counter() - t0)
    t0 = time.perf_counter()
    decode_mem = _compile_decode(cfg, {**frozen, **trainable}, cache, conc({**frozen_sh, **trainable_sh}),
                                 conc(cache_sh), mesh, rules)
    logging.info("plan: decode step compiled in %.0f s", time.perf_counter() - t0)
    result["compiled"] = dict(train=train_mem, decode=decode_mem)
    result["backend"] = jax.devices()[0].platform
  result["train"], result["decode"] = _totals(result)
  return result


def emulate_cpu_devices(n: int) -> bool:
  """Plans for another machine: this process sees n CPU devices. Only before JAX starts a backend (False after,
  and then the devices already there are used if there are enough)."""
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    return True
  except RuntimeError:
    return False


def _concrete_mesh(axes: dict):
  n = math.prod(axes.values())
  if jax.device_count() < n:
    raise ValueError(f"plan: compiling for {n} devices but this process has {jax.device_count()}; run `fiat plan` "
                     f"with plan.num_devices (it emulates them on CPU) or set plan.compile=False")
  return sharding.make_mesh(devices=jax.devices()[:n], **axes)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
              code=int(m.generated_code_size_in_bytes))


def _with(shapes, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _compile_train(cfg, tcfg, tx, state, frozen, batch, state_sh, frozen_sh, batch_sh, mesh, rules) -> dict:
  """Memory analysis of the trainer's jitted step (state donated, as in training)."""
  from fiat_jax.training import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  step = functools.partial(train_lib.train_step, model=model_lib.Transformer(cfg), tcfg=tcfg, tx=tx,
                           lr_fn=optim_lib.schedule(tcfg.optim, tcfg.num_steps))
  fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
               donate_argnums=(0,))
  with sharding.activation_rules(mesh, rules):
    compiled = fn.lower(_with(state, state_sh), _with(frozen, frozen_sh), _with(batch, batch_sh)).compile()
  return _memory(compiled)


def _compile_decode(cfg, variables, cache, variables_sh, cache_sh, mesh, rules) -> dict:
  """Memory analysis of one KV-cache decode step (one new token per row, the cache donated)."""
  model = model_lib.Transformer(cfg)
  B = cache["positions"].shape[0]

  def step(variables, cache, tok_B1, pos_B1):
    logits, cache = model.apply(variables, tok_B1, pos_B1, jnp.ones_like(tok_B1), cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache
  tok_sh = sharding.batch_sharding(mesh, 2, rules)
  fn = jax.jit(step, in_shardings=(variables_sh, cache_sh, tok_sh, tok_sh), out_shardings=(None, cache_sh),
               donate_argnums=(1,))
  tok = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=tok_sh)
  with sharding.activation_rules(mesh, rules):
    compiled = fn.lower(_with(variables, variables_sh), _with(cache, cache_sh), tok, tok).compile()
  return _memory(compiled)


def _totals(r: dict) -> tuple[dict, dict]:
  """Per-device totals and fit for training and decoding."""
  s, comp = r["per_device"], r["compiled"]
  train_act = comp["train"]["temp"] if comp else None
  decode_act = comp["decode"]["temp"] if comp else None
  train_total = s["params"] + s["lora"] + s["optimizer"] + s["batch"] + (train_act or 0)
  decode_total = s["params"] + s["lora"] + s["kv_cache"] + (decode_act or 0)
  fit = lambda total: dict(total=total, fits=total <= r["usable_bytes"],
                           fraction=round(total / r["usable_bytes"], 4))
  return (dict(activations=train_act, **fit(train_total)), dict(activations=decode_act, **fit(decode_total)))


def human(n: int | None) -> str:
  if n is None:
    return "-"
  for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_plan(r: dict) -> str:
  """The table `fiat plan` prints."""
  s = r["per_device"]
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"plan for {r['num_devices']} x {r['device_name']} ({human(r['usable_bytes'])} usable of "
           f"{human(r['hbm_bytes'])} per device), mesh {mesh}",
           f"model: {r['counts']['params']:,} params ({r['param_dtype']}, compute {r['compute_dtype']}), mode "
           f"{r['mode']}: {r['counts']['trainable']:,} trainable ({r['trainable_dtype']}), optimizer {r['optimizer']}",
           f"train: batch {r['batch_size']} x {r['seq_len']} tokens; decode: batch {r['decode_batch']} x cache "
           f"{r['decode_len']}", "", f"{'per device':<28}{'train':>14}{'decode':>14}"]
  rows = [("parameters", s["params"], s["params"]), ("LoRA", s["lora"], s["lora"]),
          ("optimizer state", s["optimizer"], None), ("batch", s["batch"], None), ("KV cache", None, s["kv_cache"]),
          ("activations (XLA temp)", r["train"]["activations"], r["decode"]["activations"]),
          ("total", r["train"]["total"], r["decode"]["total"])]
  for name, a, b in rows:
    lines.append(f"{name:<28}{human(a):>14}{human(b):>14}")
  verdict = lambda t: f"{'fits' if t['fits'] else 'DOES NOT FIT'} ({100 * t['fraction']:.1f}% of usable)"
  lines.append(f"{'fits ' + r['device']:<28}{verdict(r['train']):>14}  {verdict(r['decode'])}")
  if r["compiled"] is None:
    lines.append("activations not measured (plan.compile=False)")
  else:
    lines.append(f"activations: XLA memory analysis compiled on {r['backend']} (on the target accelerator the "
                 f"compiler's fusion differs; run `fiat plan` there for its exact numbers)")
  return "\n".join(lines)


def parse_mesh(spec: str) -> dict[str, int]:
  """--mesh=data=1,fsdp=16,model=1 (axes left out are 1) -> {'data': 1, 'fsdp': 16, 'model': 1}."""
  axes = {"data": 1, "fsdp": 1, "model": 1}
  for part in filter(None, spec.split(",")):
    name, eq, value = part.partition("=")
    if not eq or name.strip() not in axes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"--mesh={spec}: expected data=N,fsdp=N,model=N with positive integers; bad part {part!r}")
    axes[name.strip()] = int(value)
  return axes


def main(argv: list[str]) -> int:
  """`fiat plan --gin_file=models/<model>.gin [--mesh=data=1,fsdp=16,model=1] [--device=v5e] [--json=FILE]`:
  prints the plan; exit 1 if it does not fit."""
  from fiat_jax import cli  # pylint: disable=g-import-not-at-top

  args = cli.parse_gin(argv, "plan")
  kw = {}
  if args.mesh:
    axes = parse_mesh(args.mesh)
    kw = dict(num_devices=math.prod(axes.values()), data=axes["data"], fsdp=axes["fsdp"], model_axis=axes["model"])
  if args.device:
    kw["device"] = args.device
  if args.no_compile:
    kw["compile"] = False
  n = kw.get("num_devices", _gin_or("plan.num_devices", None))
  if n is not None:
    emulate_cpu_devices(int(n))
  result = cli.name_missing_macros(lambda: plan(**kw))
  print(format_plan(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0 if result["train"]["fits"] and result["decode"]["fits"] else 1
