"""End-to-end fixtures: the installed `fiat` console script, run in subprocesses on files in the real formats."""
import os
import subprocess
import sys
import time

import pytest

from e2e import world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIAT = os.path.join(os.path.dirname(sys.executable), 'fiat')  # the console script setup.py installs
# Small budgets for every run: the product's own run files, with these bound on top (a file of the test's).
SMALL = """
Experiment.languages = ['as', 'hi', 'mr']
Experiment.inputs_length = 512
Experiment.targets_length = 32
Experiment.max_decode_tokens = 4
Experiment.max_eval_examples = 2
Experiment.eval_batch_size = 8
Experiment.bootstrap = 10
TrainConfig.num_steps = 2
TrainConfig.batch_size = 8
TrainConfig.eval_every = 0
TrainConfig.eval_at_start = False
TrainConfig.save_every = 2
TrainConfig.log_every = 1
TrainConfig.tensorboard = False
beta_sampling.max_new_tokens = 12
local_beta.max_len = 8192
"""


def env() -> dict:
  """The environment of every `fiat` call: 8 fake CPU devices, the venv's scripts first on PATH."""
  out = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
  out.pop('OPENAI_API_KEY', None)  # `fiat serve` without --api_key_env needs none: HttpBeta must work without it
  return out


def fiat(*args: str, cwd: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
  """Runs `fiat ARGS` to completion; on a non-zero exit the assertion shows the end of its output."""
  proc = subprocess.run([FIAT, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
  if check:
    assert proc.returncode == 0, f'fiat {" ".join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}'
  return proc


@pytest.fixture(scope='package')
def paths(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp('e2e')
  out = world.build(str(root))
  out['root'] = str(root)
  out['small'] = str(root / 'small.gin')
  (root / 'small.gin').write_text(SMALL)
  out['runs'] = str(root / 'runs')
  out['store'] = str(root / 'store')
  return out


@pytest.fixture(scope='package')
def beta_url(paths):
  """`fiat serve` over the local β checkpoint, bound through a real models/ file and beta/local.gin (no key)."""
  port_file = os.path.join(paths['root'], 'serve.port')
  log = open(os.path.join(paths['root'], 'serve.log'), 'w')
  proc = subprocess.Popen(
      [FIAT, 'serve', '--gin_file=models/llama-3.1-70b-instruct.gin', '--gin_file=beta/local.gin',
       f'--gin.BETA_CHECKPOINT={paths["beta"]!r}', '--gin.BETA_CONFIG=None', f'--gin_file={paths["small"]}',
       '--port=0', f'--port_file={port_file}', '--model_name=tiny-beta',
       f'--request_log={os.path.join(paths["root"], "requests.jsonl")}'],
      cwd=paths['root'], env=env(), stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 300
  while not os.path.exists(port_file):
    assert proc.poll() is None, open(log.name).read()[-4000:]
    assert time.monotonic() < deadline, 'fiat serve did not start in 300 s'
    time.sleep(0.2)
  with open(port_file) as f:
    yield f'http://127.0.0.1:{f.read().strip()}/v1'
  proc.terminate()
  proc.wait(timeout=30)
  log.close()
