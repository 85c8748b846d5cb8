"""A new user's first hour: the wheel installed (not editable) works from any directory, `--help` answers without
JAX, the start is quiet, and each mistake is one line with exit code 2."""
import os
import re
import subprocess
import sys
import sysconfig

import pytest

from e2e.conftest import FIAT, REPO, env

TESTDATA = os.path.join(REPO, 'tests', 'testdata')
NOTICES = re.compile(r'libtpu|absl::InitializeLog|oneDNN|cuda drivers|cuInit|cpu_feature_guard|Traceback')
TINY_TRAIN = ['train', '--gin_file=runs/xor_attriqa/xs_finetune.gin', '--gin_file=tiny.gin',
              f"--gin.DATA_DIR='{os.path.join(TESTDATA, 'xor_attriqa')}'"]


def fiat(args, cwd, exe=FIAT):
  environment = env()
  if exe != FIAT:  # the installed copy: nothing may point it back at the source tree
    environment.pop('PYTHONPATH', None)
  return subprocess.run([exe] + args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900,
                        check=False)


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """`pip install` of the built wheel into a fresh virtual environment; its dependencies are this one's (a path
  line, which does not run this environment's editable-install hook: the wheel's own files are what is tested)."""
  root = tmp_path_factory.mktemp('wheel')
  pip = [sys.executable, '-m', 'pip']
  clean = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the source tree must not look installed
  subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '-q', REPO, '-w', str(root / 'dist')],
                 check=True, capture_output=True, cwd=root)
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root / 'venv')], check=True)
  python = str(root / 'venv' / 'bin' / 'python')
  wheel, = (root / 'dist').glob('fiat_jax-*.whl')
  subprocess.run(pip + ['--python', python, 'install', '--no-deps', '-q', str(wheel)], check=True,
                 capture_output=True, env=clean)
  assert os.path.isfile(root / 'venv' / 'bin' / 'fiat')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], check=True,
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, 'deps_of_the_test_environment.pth'), 'w', encoding='utf-8') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  work = root / 'elsewhere'
  work.mkdir()
  return {'fiat': str(root / 'venv' / 'bin' / 'fiat'), 'python': python, 'cwd': str(work)}


def test_the_wheel_carries_its_gin_files_and_runs_outside_the_source_tree(installed):
  """fiat train on tiny.gin, fiat plan --no_compile on a models/ file and the quick demo, from the wheel."""
  clean = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  where = subprocess.run([installed['python'], '-c', 'import fiat_jax.cli as c; print(c.__file__, c.GIN_DIR)'],
                         cwd=installed['cwd'], env=clean, capture_output=True, text=True, check=True).stdout.split()
  assert not where[0].startswith(REPO) and where[1] == os.path.join(os.path.dirname(where[0]), 'gin_configs')
  assert os.path.isfile(os.path.join(where[1], 'runs', 'xtreme_up_indic', 'xs_fiat.gin'))
  out = os.path.join(installed['cwd'], 'o')
  trained = fiat(TINY_TRAIN + [f"--gin.RUNS_DIR='{out}/runs'", f"--gin.STORE_DIR='{out}/store'"],
                 installed['cwd'], installed['fiat'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert os.path.isfile(os.path.join(out, 'runs', 'xor_attriqa', 'xs_finetune', 'metrics.json'))
  assert not NOTICES.search(trained.stderr), trained.stderr[:3000]  # a quiet start
  planned = fiat(['plan', '--gin_file=models/gemma-2-2b-it.gin', '--no_compile', '--mesh=data=1,fsdp=8,model=1'],
                 installed['cwd'], installed['fiat'])
  assert planned.returncode == 0 and re.search(r'^fits v5e +fits ', planned.stdout, re.M), planned.stderr[-3000:]
  demo = subprocess.run([installed['python'], '-m', 'fiat_jax.demo', '--quick', '--out_dir=demo_out'],
                        cwd=installed['cwd'], env=clean, capture_output=True, text=True, check=False, timeout=900)
  assert demo.returncode == 0, demo.stderr[-3000:]
  assert '| FIAT |' in demo.stdout and os.path.isfile(os.path.join(installed['cwd'], 'demo_out', 'report',
                                                                     'agreement.md'))


def test_the_paper_command_fails_only_on_the_missing_data_in_one_line(installed):
  """README's "Running the paper" command, without the release or the checkpoints: one line naming the data."""
  result = fiat(['train', '--gin_file=runs/xtreme_up_indic/xs_fiat.gin', '--gin_file=beta/http.gin',
                 "--gin.DATA_DIR='/data/xtreme_up_v1.1'", "--gin.RUNS_DIR='runs'", "--gin.STORE_DIR='store'",
                 "--gin.TAU_XS_IT='/ckpt/gemma-2-2b-it'", "--gin.TAU_XS_BASE='/ckpt/gemma-2-2b'",
                 "--gin.BETA_URL='http://127.0.0.1:8000/v1'", "--gin.BETA_MODEL='big-model'"],
                installed['cwd'], installed['fiat'])
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('fiat train: error: ') and '/data/xtreme_up_v1.1' in last, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


def test_help_lists_the_modes_and_each_mode_its_flags_without_importing_jax():
  code = ('import sys; from fiat_jax import main; assert main.run(["--help"]) == 0; '
          'assert main.run(["train", "--help"]) == 0; assert main.run(["serve", "-h"]) == 0; '
          'print("loaded:", sorted(m for m in ("jax", "tensorflow", "gin", "flax") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert out.strip().endswith('loaded: []')
  assert re.search(r'^  train +Algorithm 1', out, re.M) and re.search(r'^  plan +memory per device', out, re.M)
  assert '--gin.NAME=VALUE' in out and 'example:\n  fiat train --gin_file=runs/' in out
  assert '--port PORT' in out and '--coordinator_address=VALUE' in out


@pytest.mark.parametrize('args, message', [
    (['--gin_file=runs/xor_attriqa/xs_finetun.gin'],
     'fiat train: error: --gin_file=runs/xor_attriqa/xs_finetun.gin: not found (looked in the current directory'),
    (['--gin.TrainConfig.num_step=5'], "fiat train: error: Configurable 'TrainConfig' doesn't have a parameter "
     "named 'num_step'. Did you mean num_steps?"),
    (['--gin.RUNS_DIR=/data/x'], "fiat train: error: --gin.RUNS_DIR=/data/x: gin cannot parse the value '/data/x'; "
     "a string is quoted for gin inside the shell's quotes: --gin.RUNS_DIR=\"'/data/x'\""),
    ([], 'fiat train: error: the gin macro RUNS_DIR is required and not bound: add --gin.RUNS_DIR=VALUE'),
])
def test_a_gin_mistake_is_one_line_and_exit_code_2(tmp_path, args, message):
  result = fiat(TINY_TRAIN + args, str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert not NOTICES.search(result.stderr), result.stderr[-2000:]
  with_debug = fiat(TINY_TRAIN + args + ['--debug'], str(tmp_path))
  assert with_debug.returncode == 1 and 'Traceback' in with_debug.stderr


def test_missing_paths_are_one_line_and_exit_code_2(tmp_path):
  score = fiat(['score', '--task=xtreme_up_xqa', f'--gold={tmp_path}/nogold', '--predictions=p.jsonl'],
               str(tmp_path))
  assert (score.returncode, score.stderr) == (2, f'fiat score: error: --gold={tmp_path}/nogold: no such file or '
                                                 'directory\n')
  no_flag = fiat(['score', '--task=xtreme_up_xqa'], str(tmp_path))
  assert (no_flag.returncode, no_flag.stderr) == (2, 'fiat score: error: the following arguments are required: '
                                                     '--gold, --predictions (`fiat score --help` lists the flags)\n')
  evaluate = fiat(['evaluate'] + TINY_TRAIN[1:] + [f"--gin.RUNS_DIR='{tmp_path}/runs'",
                                                    f"--gin.STORE_DIR='{tmp_path}/store'"], str(tmp_path))
  assert evaluate.returncode == 2, evaluate.stderr[-2000:]
  assert evaluate.stderr.strip().splitlines()[-1] == (
      f'fiat evaluate: error: {tmp_path}/runs/xor_attriqa/xs_finetune/trainable.msgpack: no trained τ in this run '
      'directory; run `fiat train` with the same gin files first')
