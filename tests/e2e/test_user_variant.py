"""A LoRA variant from the user's own module, through the `fiat` command: gated_lora.py and gated.gin (which
imports it) copied into the working directory, as in a research checkout; `fiat train` trains the variant and
`fiat evaluate` reloads it; without the gin file, `fiat evaluate` names the import it lacks."""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from e2e.conftest import REPO, fiat
from fiat_jax import experiment

USER = os.path.join(REPO, 'tests', 'user_lora')
XTREME_UP = os.path.join(REPO, 'tests', 'testdata', 'xtreme_up')
TARGET_SHAPES = {  # the tiny τ (D 32, F 64, 4 heads and 2 kv heads of 8) at rank 4, stacked on its 2 layers
    'attn': {'q': (32, 32), 'k': (32, 16), 'v': (32, 16), 'o': (32, 32)},
    'mlp': {'gate': (32, 64), 'up': (32, 64), 'down': (64, 32)}}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """`fiat train` of the xs_wo_cot row (no β) on the tiny τ with gated.gin: (working dir, flags, run directory)."""
  cwd = tmp_path_factory.mktemp('user_variant')
  for name in ('gated_lora.py', 'gated.gin'):
    shutil.copy(os.path.join(USER, name), cwd)
  runs = str(cwd / 'runs')
  flags = ['--gin_file=runs/xtreme_up_indic/xs_wo_cot.gin', '--gin_file=tiny.gin', f'--gin.DATA_DIR={XTREME_UP!r}',
           f'--gin.RUNS_DIR={runs!r}', f'--gin.STORE_DIR={runs!r}', "--gin.Experiment.languages=['as','hi','mr']"]
  out = fiat('train', *flags, '--gin_file=gated.gin', cwd=str(cwd))
  assert 'trainable params: 4,152 / total' in out.stdout  # LoRA's 4,096 at rank 4 and a gate [4] per target
  return str(cwd), flags, json.loads(out.stdout[out.stdout.index('{'):])['run_dir']


def test_train_saves_the_variants_tensors(run):
  _, _, run_dir = run
  trainable, record = experiment.read_trainable(os.path.join(run_dir, 'trainable.msgpack'))
  assert record['lora']['variant'] == 'gated' and record['lora']['rank'] == 4
  assert json.load(open(os.path.join(run_dir, 'tau.json')))['lora']['variant'] == 'gated'
  layers = trainable['lora']['layers']
  assert jax.tree_util.tree_map(np.shape, layers) == {
      block: {t: {'a': (2, n_in, 4), 'g': (2, 4), 'b': (2, 4, n_out)} for t, (n_in, n_out) in targets.items()}
      for block, targets in TARGET_SHAPES.items()}
  assert 0 < np.abs(layers['mlp']['down']['b']).max() < 1e-3  # 2 steps at the warm-up's learning rates
  assert np.abs(layers['attn']['q']['g'] - 1.0).max() < 1e-3  # the gates start at 1
  steps = [r for r in map(json.loads, open(os.path.join(run_dir, 'metrics.jsonl'))) if 'loss' in r]
  assert [r['step'] for r in steps] == [1, 2]
  assert all(math.isfinite(r['loss']) and 0 < r['loss'] < 10 for r in steps)
  with open(os.path.join(run_dir, 'config.gin')) as f:
    assert f.readline() == 'import gated_lora\n'  # what `fiat evaluate` must import again


def test_evaluate_reloads_the_variant_and_names_a_missing_import(run):
  cwd, flags, run_dir = run
  out = fiat('evaluate', *flags, '--gin_file=gated.gin', cwd=cwd)
  metrics = json.load(open(os.path.join(run_dir, 'metrics.json')))
  assert json.loads(out.stdout.strip().splitlines()[-1])['f1'] == pytest.approx(
      metrics['test']['headline']['value'], abs=1e-9)
  out = fiat('evaluate', *flags, cwd=cwd, check=False)
  assert out.returncode == 2
  assert (f"fiat evaluate: error: {run_dir}/tau.json: the run trained the LoRA variant 'gated', which no module "
          f"imported by this command registers (lora, dora, pissa, vera are): pass the gin file that imports its "
          f"module") in out.stderr
