"""Real multi-process runs on this machine: jax.distributed on a free localhost port, gloo collectives on CPU.

The test functions start worker processes that run this file (`python tests/test_multihost.py WORKER ...`); each
worker sees its own XLA_FLAGS device count.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices: int, process_id: int | None = None, num_processes: int | None = None, port=None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("FIAT_", "JAX_COORDINATOR"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
  if num_processes is not None:
    env.update(FIAT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", FIAT_NUM_PROCESSES=str(num_processes),
               FIAT_PROCESS_ID=str(process_id))
  return env


def start(worker: str, args: list[str], devices: int, num_processes: int = 1, port=None) -> list[subprocess.Popen]:
  """Starts `num_processes` workers (jax.distributed when more than one); returns their Popen handles."""
  port = port or free_port()
  procs = []
  for pid in range(num_processes):
    env = worker_env(devices, pid if num_processes > 1 else None, num_processes if num_processes > 1 else None, port)
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), worker, *args], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def wait(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
  """Waits for every worker; fails with their output if one did not exit 0."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{out[-4000:]}"
  return outs


def run(worker: str, args: list[str], devices: int, num_processes: int = 1) -> list[str]:
  return wait(start(worker, args, devices, num_processes))


# ---- workers (run in subprocesses) -------------------------------------------------------------------------------

def _setup_worker():
  from fiat_jax.training import distributed  # pylint: disable=g-import-not-at-top
  return distributed.initialize(timeout_s=60)


def worker_collectives(out_dir: str) -> None:
  """A gloo all-gather and a psum over every process's devices."""
  info = _setup_worker()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import distributed  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(jnp.asarray([info["process_index"] * 10 + 1.0]))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
  x = jax.make_array_from_callback((jax.device_count(),), jax.sharding.NamedSharding(mesh, jax.P("d")),
                                   lambda idx: np.arange(jax.device_count(), dtype=np.float32)[idx] + 1)
  total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(x)
  distributed.barrier("collectives")
  with open(os.path.join(out_dir, f"collectives-{info['process_index']}.json"), "w") as f:
    json.dump(dict(info, gathered=np.asarray(gathered).ravel().tolist(), total=float(total),
                   writer=distributed.is_writer()), f)


def worker_forward_grad(out_dir: str) -> None:
  """Logits and LoRA gradients of a tiny model on a (data=2, fsdp=2) mesh over every process's devices."""
  info = _setup_worker()
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  cfg, params, lora, tokens = _forward_grad_inputs()
  mesh = sharding.make_mesh(data=2, fsdp=2)
  p = jax.jit(lambda x: x, out_shardings=sharding.param_shardings(cfg, mesh))(params)
  lo = jax.jit(lambda x: x, out_shardings=sharding.lora_shardings(cfg, mesh)["lora"])(lora)
  n, i = info["process_count"], info["process_index"]
  rows = len(tokens) // n
  t = sharding.global_batch({"t": tokens[i * rows:(i + 1) * rows]}, mesh)["t"]
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  with sharding.activation_rules(mesh):
    (loss, logits), grads = jax.jit(_loss_and_grads(cfg), out_shardings=replicated)(lo, p, t)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
  np.savez(os.path.join(out_dir, f"forward_grad-{i}.npz"), loss=np.asarray(loss), logits=np.asarray(logits),
           shards=np.asarray(len(t.sharding.device_set)), **flat)


def _forward_grad_inputs():
  """A tiny LoRA model with random numpy weights (shapes from eval_shape: nothing to compile)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.tiny_config(vocab_size=264, lora=lora_lib.LoraConfig(rank=4))
  rng = np.random.default_rng(0)
  fill = lambda tree, scale: jax.tree_util.tree_map(
      lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)
  params_shape = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  lora_shape = jax.eval_shape(lambda: lora_lib.init(cfg.lora, params_shape, jax.random.PRNGKey(0), True))
  params, lora = fill(params_shape, 0.3), fill(lora_shape["lora"], 0.1)
  tokens = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
  return cfg, params, lora, tokens


def _loss_and_grads(cfg):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.Transformer(cfg)

  def loss(lora, params, tokens):
    logits, _ = model.apply({"params": params, "lora": lora}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1]), logits
  return jax.value_and_grad(loss, has_aux=True)


# ---- tests -------------------------------------------------------------------------------------------------------

def test_two_processes_gloo_collectives_through_launch_local(tmp_path):
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "--processes=2", "--devices=2",
                      f"--log_dir={tmp_path}", "--", sys.executable, os.path.abspath(__file__), "collectives",
                      str(tmp_path)], env=worker_env(1), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  results = [json.load(open(tmp_path / f"collectives-{i}.json")) for i in range(2)]
  for i, r in enumerate(results):
    assert (r["process_index"], r["process_count"], r["local_devices"], r["global_devices"]) == (i, 2, 2, 4)
    assert r["gathered"] == [1.0, 11.0]
    assert r["total"] == 1 + 2 + 3 + 4
  assert [r["writer"] for r in results] == [True, False]


def test_two_process_sharded_forward_and_grads_equal_one_device(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  run("forward_grad", [str(tmp_path)], devices=2, num_processes=2)
  cfg, params, lora, tokens = _forward_grad_inputs()
  (ref_loss, ref_logits), ref_grads = jax.jit(_loss_and_grads(cfg))(lora, params, tokens)
  ref = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ref_grads)}
  for i in range(2):
    got = np.load(tmp_path / f"forward_grad-{i}.npz")
    assert int(got["shards"]) == 4
    np.testing.assert_allclose(got["loss"], ref_loss, atol=1e-6)
    np.testing.assert_allclose(got["logits"], ref_logits, atol=1e-5)
    assert set(ref) <= set(got.files) and len(ref) == 28
    for k, v in ref.items():
      np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=k)


WORKERS = {"collectives": worker_collectives, "forward_grad": worker_forward_grad}

if __name__ == "__main__":
  WORKERS[sys.argv[1]](*sys.argv[2:])
