"""launch/local.sh runs `fiat train` as two JAX processes (gloo collectives): inside the run there are 2
processes, and the selected LoRA parameters equal a one-process run on as many devices."""
import json
import os
import subprocess

import jax
import numpy as np

from e2e.conftest import REPO, env
from fiat_jax import experiment

LAUNCH = os.path.join(REPO, 'launch', 'local.sh')


def train(paths, processes, devices, name):
  runs, logs = os.path.join(paths['root'], name), os.path.join(paths['root'], name + '-logs')
  cmd = [LAUNCH, f'--processes={processes}', f'--devices={devices}', f'--log_dir={logs}', '--', 'fiat', 'train',
         '--gin_file=runs/xtreme_up_indic/xs_wo_cot.gin', '--gin_file=tiny.gin',
         f'--gin.DATA_DIR={paths["xtreme_up"]!r}', f'--gin.RUNS_DIR={runs!r}', f'--gin.STORE_DIR={runs!r}',
         "--gin.Experiment.languages=['as','hi','mr']"]
  proc = subprocess.run(cmd, cwd=paths['root'], env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  run_dir = os.path.join(runs, 'xtreme_up_indic', 'xs_wo_cot')
  trainable, _ = experiment.read_trainable(os.path.join(run_dir, 'trainable.msgpack'))
  return proc, logs, run_dir, trainable


def test_two_processes_train_as_one(paths):
  two, logs, two_dir, two_lora = train(paths, 2, 2, 'two')
  one, _, one_dir, one_lora = train(paths, 1, 4, 'one')
  assert 'process 0 of 2: 2 local / 4 global devices' in two.stderr
  assert 'process 1 of 2: 2 local / 4 global devices' in open(os.path.join(logs, 'process-1.log')).read()
  assert json.load(open(os.path.join(two_dir, 'version.json')))['processes'] == 2
  assert json.load(open(os.path.join(one_dir, 'version.json')))['processes'] == 1
  a, b = jax.tree_util.tree_leaves(two_lora), jax.tree_util.tree_leaves(one_lora)
  assert len(a) == len(b) > 0
  assert max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(two_lora['lora'])) > 1e-4  # trained
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
