"""Every gin_configs/models/ file combined with every gin_configs/runs/ file parses as `fiat` parses it
(cli.parse_gin: the gin search path and every configurable), and binds the run's τ or β where it says."""
import glob
import os

import gin
import pytest

from fiat_jax import cli
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax import experiment

MODELS = sorted(glob.glob(os.path.join(cli.GIN_DIR, 'models', '*.gin')))
RUNS = sorted(glob.glob(os.path.join(cli.GIN_DIR, 'runs', '*', '*.gin')))
MACROS = ["DATA_DIR='/data'", "RUNS_DIR='/runs'", "STORE_DIR='/store'"]


def role(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read().split('\n# Role: ', 1)[1].split(' ', 1)[0]


@pytest.mark.parametrize('models_file', MODELS, ids=os.path.basename)
def test_a_models_file_parses_with_every_run_file(models_file):
  checkpoint = '/ckpt/model'
  beta = role(models_file).startswith('β')
  macro = 'BETA_CHECKPOINT' if beta else 'TAU_CHECKPOINT'
  for run_file in RUNS:
    gin.clear_config()
    argv = [f'--gin_file={os.path.relpath(run_file, cli.GIN_DIR)}', f'--gin_file=models/{os.path.basename(models_file)}']
    cli.parse_gin(argv + [f'--gin.{m}' for m in MACROS + [f"{macro}='{checkpoint}'"]], 'fiat train')
    exp, recipe = experiment.Experiment(), experiment.Recipe()
    assert exp.run_dir.startswith('/runs/'), run_file
    if beta:
      assert gin.query_parameter('local_beta.checkpoint_dir').scoped_selector == 'BETA_CHECKPOINT/gin.macro'
    else:
      which = 'base' if 'non-instruction-tuned' in open(models_file, encoding='utf-8').read() else 'instruction_tuned'
      assert gin.query_parameter(f'tau_model.{which}').scoped_selector == 'TAU_CHECKPOINT/gin.macro'
      assert gin.query_parameter('tau_model.expected').scoped_selector == 'TAU_CONFIG/gin.macro'
    assert recipe.method in ('tau', 'icl')
  gin.clear_config()
