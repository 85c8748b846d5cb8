"""Run integrity through the `fiat` command: a resume with other settings is refused (or recorded when allowed),
tau.json must agree with the saved adapter, damaged run files name themselves and are rebuilt by `fiat train`,
one `fiat train` per run directory, writability checked first, metrics.jsonl without repeats after a resume,
and the rationale store keeps every complete record and repairs a corrupt line."""
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from e2e.conftest import FIAT, env, fiat

ROW = ('xtreme_up_indic', 'xs_wo_cot')  # no rationale: τ trains without β
STEPS = ['--gin.TrainConfig.num_steps=4', '--gin.TrainConfig.save_every=2', '--gin.TrainConfig.eval_every=2',
         '--gin.TrainConfig.keep=5']
REBUILD = "rerun `fiat train` with the run's gin files in this run directory: it rebuilds them from the checkpoints"


def flags(paths, runs):
  """xs_wo_cot on the tiny Llama τ, 4 steps with a checkpoint and a validation every 2, under RUNS_DIR `runs`."""
  return [f'--gin_file=runs/{ROW[0]}/{ROW[1]}.gin', '--gin_file=models/llama-3.2-1b-instruct.gin',
          '--gin.TAU_CONFIG=None', f'--gin.TAU_CHECKPOINT={paths["tau_llama"]!r}',
          f'--gin.DATA_DIR={paths["xtreme_up"]!r}', f'--gin.RUNS_DIR={runs!r}',
          f'--gin.STORE_DIR={os.path.join(paths["root"], "no_store")!r}', f'--gin_file={paths["small"]}', *STEPS]


def copy_run(original: str, tmp_path) -> tuple[str, str]:
  """(RUNS_DIR, run directory) of a copy of the trained run in the same layout."""
  runs = str(tmp_path / 'runs')
  shutil.copytree(original, os.path.join(runs, *ROW))
  return runs, os.path.join(runs, *ROW)


def error(out, prefix: str) -> str:
  """The one-line error (`fiat MODE: error: ...`, exit code 2) of a failed command, from its message on, which
  starts with `prefix`."""
  assert out.returncode == 2, out.stderr[-3000:]
  found = [line.split(': error: ', 1)[1] for line in out.stderr.splitlines()
           if line.startswith('fiat ') and ': error: ' in line]
  found = [line for line in found if line.startswith(prefix)]
  assert len(found) == 1, out.stderr[-3000:]
  return found[0]


def read(path, mode='rb'):
  with open(path, mode) as f:
    return f.read()


def records(run_dir):
  """metrics.jsonl without its wall-clock fields: (step, {name: value})."""
  clock = ('time', 'step_time_s', 'tokens_per_s')
  return [(r['step'], {k: v for k, v in r.items() if k not in clock})
          for r in map(json.loads, read(os.path.join(run_dir, 'metrics.jsonl'), 'r').splitlines())]


@pytest.fixture(scope='module')
def trained(paths, tmp_path_factory):
  """One uninterrupted 4-step run: checkpoints 2 and 4, validation at 2 and 4."""
  runs = str(tmp_path_factory.mktemp('integrity') / 'runs')
  fiat('train', *flags(paths, runs), cwd=paths['root'])
  return os.path.join(runs, *ROW)


def test_a_resume_with_other_settings_is_refused_or_recorded(trained, paths, tmp_path):
  runs, run_dir = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(run_dir, 'checkpoints', '4'))  # killed after checkpoint 2
  before = {name: read(os.path.join(run_dir, name)) for name in ('config.gin', 'train_config.json', 'metrics.jsonl')}
  changed = ['--gin.PEFT_LR=0.05', '--gin.Experiment.seed=7']
  out = fiat('train', *flags(paths, runs), *changed, cwd=paths['root'], check=False)
  assert out.returncode == 2
  lines = out.stderr.splitlines()
  head = lines.index(f"fiat train: error: {run_dir}/train_config.json: this command's settings differ "
                     f"from the ones the run recorded; refusing to resume from step 2:")
  assert lines[head + 1:head + 4] == [
      '  train.optim.learning_rate: recorded 0.0003, now 0.05',
      '  train.seed: recorded 0, now 7',
      'Use a new run directory (another Experiment.name or RUNS_DIR), or rerun with --allow_changed_settings to '
      'resume with this command\'s settings (the change is recorded in settings_history.jsonl)']
  assert {name: read(os.path.join(run_dir, name)) for name in before} == before  # nothing rewritten

  fiat('train', *flags(paths, runs), *changed, '--allow_changed_settings', cwd=paths['root'])
  history = [json.loads(line) for line in read(os.path.join(run_dir, 'settings_history.jsonl'), 'r').splitlines()]
  assert [(h['resumed_from_step'], h['changes']) for h in history] == [
      (2, ['train.optim.learning_rate: recorded 0.0003, now 0.05', 'train.seed: recorded 0, now 7'])]
  settings = json.loads(read(os.path.join(run_dir, 'train_config.json')))
  assert (settings['train']['optim']['learning_rate'], settings['train']['seed']) == (0.05, 7)
  assert 'PEFT_LR = 0.05' in read(os.path.join(run_dir, 'config.gin'), 'r')
  assert json.loads(read(os.path.join(run_dir, 'metrics.json')))['experiment']['seed'] == 7


def test_a_resume_logs_each_step_once_and_ends_as_the_uninterrupted_run(trained, paths, tmp_path):
  runs, run_dir = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(run_dir, 'checkpoints', '4'))  # killed mid-save of checkpoint 4: steps 3-4 logged
  logged = records(trained)
  again = [r for r in logged if r[0] > 2 or any(k.startswith('test/') for k in r[1])]
  assert len(again) == 4  # steps 3 and 4, validation at 4, the final test
  out = fiat('train', *flags(paths, runs), cwd=paths['root'])
  assert f'{run_dir}/metrics.jsonl: dropped 4 records logged after step 2' in out.stdout
  assert records(run_dir) == logged
  for name in ('trainable.msgpack', 'tau.json', 'predictions_test.jsonl'):
    assert read(os.path.join(run_dir, name)) == read(os.path.join(trained, name)), name


def test_tau_json_and_damaged_run_files_are_named_and_rebuilt(trained, paths, tmp_path):
  runs, run_dir = copy_run(trained, tmp_path)
  tau, adapter = os.path.join(run_dir, 'tau.json'), os.path.join(run_dir, 'trainable.msgpack')
  edited = json.loads(read(tau))
  edited['lora'].update(rank=4, alpha=64, variant='dora')
  with open(tau, 'w') as f:
    json.dump(edited, f)
  out = fiat('evaluate', *flags(paths, runs), cwd=paths['root'], check=False)
  lines = out.stderr.splitlines()
  head = lines.index(f'fiat evaluate: error: {tau}: does not match the adapter saved in {adapter}:')
  assert out.returncode == 2 and lines[head + 1:head + 5] == [
      '  lora.alpha: tau.json 64, trainable.msgpack 16.0', '  lora.rank: tau.json 4, trainable.msgpack 8',
      '  lora.variant: tau.json "dora", trainable.msgpack "lora"', f'Restore tau.json ({REBUILD})']

  with open(tau, 'wb') as f:
    f.write(read(os.path.join(trained, 'tau.json'))[:50])
  inputs = os.path.join(str(tmp_path), 'questions.jsonl')
  with open(inputs, 'w') as f:
    f.write(json.dumps({'language': 'hi', 'question': 'q?', 'title': 't', 'context': 'c'}) + '\n')
  out = fiat('infer', *flags(paths, runs), f'--gin.infer.input_file={inputs!r}',
             f"--gin.infer.output_file={os.path.join(str(tmp_path), 'answers.jsonl')!r}", cwd=paths['root'],
             check=False)
  assert error(out, '') == (
      f'{tau}: damaged (50 bytes, not valid JSON: Unterminated string starting at: '
      f'line 5 column 3 (char 45)); {REBUILD}')

  shutil.copy(os.path.join(trained, 'tau.json'), tau)
  for size in (100, 0):  # truncated, then empty
    with open(adapter, 'wb') as f:
      f.write(read(os.path.join(trained, 'trainable.msgpack'))[:size])
    out = fiat('evaluate', *flags(paths, runs), cwd=paths['root'], check=False)
    assert error(out, f'{adapter}: damaged ({size} bytes; ').endswith(REBUILD)

  with open(tau, 'wb') as f:
    f.write(b'')
  fiat('train', *flags(paths, runs), cwd=paths['root'])  # rebuilds both from the checkpoints
  for name in ('tau.json', 'trainable.msgpack'):
    assert read(os.path.join(run_dir, name)) == read(os.path.join(trained, name)), name


@contextlib.contextmanager
def read_only(path):
  """path made unwritable: chmod for a user, the immutable attribute for root (whom modes do not stop)."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    yield
    os.chmod(path, 0o755)
    return
  if subprocess.run(['chattr', '+i', path], capture_output=True).returncode != 0:
    pytest.skip('running as root on a file system without chattr +i: cannot make a directory read-only')
  try:
    yield
  finally:
    subprocess.run(['chattr', '-i', path], check=True)


def test_one_train_per_run_directory_and_writability_first(trained, paths, tmp_path):
  runs, run_dir = copy_run(trained, tmp_path)
  with read_only(run_dir):
    out = fiat('train', *flags(paths, runs), cwd=paths['root'], check=False)
  assert error(out, '') == (
      f'{run_dir}: not writable (Operation not permitted' if os.geteuid() == 0 else
      f'{run_dir}: not writable (Permission denied') + (
      '); a run writes its checkpoints and results there: make it writable, or bind another RUNS_DIR')

  runs = str(tmp_path / 'fresh')  # a new run that would train long, held by its command
  run_dir = os.path.join(runs, *ROW)
  long_run = [*flags(paths, runs), '--gin.TrainConfig.num_steps=100000', '--gin.TrainConfig.save_every=100000']
  first = subprocess.Popen([FIAT, 'train', *long_run], cwd=paths['root'], env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  lock = os.path.join(run_dir, 'run.lock')
  try:
    holder = f'host {socket.gethostname()} pid {first.pid} since '
    deadline = time.monotonic() + 120
    while holder not in (read(lock, 'r') if os.path.exists(lock) else ''):
      assert first.poll() is None and time.monotonic() < deadline
      time.sleep(0.2)
    out = fiat('train', *long_run, cwd=paths['root'], check=False)
    last = error(out, '')
    assert last.startswith(f'{run_dir}: another `fiat train` is using this run '
                           f'directory (held by {holder}')
    assert last.endswith(f'; {lock}); wait for it to end, or use another run directory')
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  with open(lock, 'rb+') as f:  # a killed holder leaves no stale lock: the OS dropped it
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_store_keeps_complete_records_and_repairs_a_corrupt_line(paths):
  store = os.path.join(paths['root'], 'integrity_store')
  rationales = ['rationales', '--gin_file=runs/xtreme_up_indic/xs_fiat.gin', '--gin_file=models/gemma-2-27b-it.gin',
                '--gin_file=beta/local.gin', f'--gin.BETA_CHECKPOINT={paths["beta"]!r}', '--gin.BETA_CONFIG=None',
                f'--gin.DATA_DIR={paths["xtreme_up"]!r}', f'--gin.RUNS_DIR={paths["runs"]!r}',
                f'--gin.STORE_DIR={store!r}', f'--gin_file={paths["small"]}', "--gin.Experiment.languages=['as']"]
  summary = lambda out: json.loads(out.stdout.strip().splitlines()[-1])
  first = summary(fiat(*rationales, cwd=paths['root'], check=False))
  shard = os.path.join(store, 'shard-00000.jsonl')
  whole = read(shard)
  lines = whole.splitlines()
  assert first['done'] == len(lines) == 6 and first['failed'] == first['pending'] == 0

  with open(shard, 'wb') as f:
    f.write(whole[:-1])  # the last record complete, only its newline missing
  again = summary(fiat(*rationales, cwd=paths['root'], check=False))
  assert (again['asked'], again['done']) == (0, 0) and read(shard) == whole  # kept, newline added

  with open(shard, 'wb') as f:
    f.write(b'\n'.join([lines[0], lines[1][:30] + b'\xff', *lines[2:]]) + b'\n')
  out = fiat(*rationales, cwd=paths['root'], check=False)
  assert error(out, '') == (
      f'{shard}:2: corrupt record (not a JSON object); the store is damaged there: `fiat rationales '
      '--repair` moves such lines to shard-00000.jsonl.corrupt and asks β again for their examples')
  repaired = summary(fiat(*rationales, '--repair', cwd=paths['root'], check=False))
  assert (repaired['repaired'], repaired['asked'], repaired['done']) == (1, 1, 1)
  side = [json.loads(line) for line in read(shard + '.corrupt').splitlines()]
  assert [(s['line'], s['bytes']) for s in side] == [(2, 31)]
  now = [json.loads(line) for line in read(shard).splitlines()]
  assert [r['key'] for r in now] == [json.loads(line)['key'] for line in [lines[0], *lines[2:], lines[1]]]
