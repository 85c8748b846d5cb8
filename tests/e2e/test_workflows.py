"""The paper's workflow as a user runs it, through the installed `fiat` command: β served over HTTP from a local
checkpoint, rationales stored once, τ rows trained from transformers checkpoints bound through models/*.gin files,
then report, infer, evaluate and ICL on the same runs."""
import csv
import json
import os

import flax
import numpy as np
import pytest

from e2e.conftest import fiat
from fiat_jax import experiment
from fiat_jax.model import stacking

ROWS = {  # row file -> the models/ file binding its τ checkpoint, and which checkpoint
    'xs_fiat': ('models/gemma-2-2b-it.gin', 'tau_it'),
    'xs_finetune': ('models/gemma-2-2b.gin', 'tau_base'),
    'xs_wo_cot': ('models/llama-3.2-1b-instruct.gin', 'tau_llama'),
}


def run_flags(paths, beta_url, row):
  """The flags of one Indic row: its run file, its τ's models/ file and checkpoint, data, store, β over HTTP."""
  models_file, ckpt = ROWS[row]
  return [f'--gin_file=runs/xtreme_up_indic/{row}.gin', f'--gin_file={models_file}', '--gin.TAU_CONFIG=None',
          f'--gin.TAU_CHECKPOINT={paths[ckpt]!r}', '--gin_file=beta/http.gin', f'--gin.BETA_URL={beta_url!r}',
          "--gin.BETA_MODEL='tiny-beta'", f'--gin.DATA_DIR={paths["xtreme_up"]!r}',
          f'--gin.RUNS_DIR={paths["runs"]!r}', f'--gin.STORE_DIR={paths["store"]!r}', f'--gin_file={paths["small"]}']


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def trained(paths, beta_url):
  """`fiat rationales` for the store, then `fiat train` for three rows; returns each row's run directory."""
  out = fiat('rationales', *run_flags(paths, beta_url, 'xs_fiat'), cwd=paths['root'], check=False)
  # A random tiny β writes no parseable answer, so the command's exit is 1 (unparsed), not a failure to store.
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['failed'] == 0 and summary['pending'] == 0, out.stderr[-3000:]
  assert summary['done'] == 7 + 6 + 7  # as, hi, mr in train, validation and test
  dirs = {}
  for row in ROWS:
    out = fiat('train', *run_flags(paths, beta_url, row), cwd=paths['root'])
    headline = json.loads(out.stdout[out.stdout.index('{'):])
    dirs[row] = headline['run_dir']
    assert headline['selected_step'] == 2 and 'run directory' in out.stderr  # INFO logging reaches the user
  return dirs


def test_rows_train_from_transformers_checkpoints(trained, paths):
  for row, run_dir in trained.items():
    tau = json.load(open(os.path.join(run_dir, 'tau.json')))
    metrics = json.load(open(os.path.join(run_dir, 'metrics.json')))
    assert metrics['selected_step'] == tau['selected_step'] == 2
    assert tau['bos_id'] == 2  # the checkpoint's own bos_token_id
    assert tau['mode'] == ('full' if row == 'xs_finetune' else 'peft')
    if tau['lora']:
      assert (tau['lora']['rank'], tau['lora']['variant']) == (8, 'lora')
    assert tau['base_path'] == paths[ROWS[row][1]]
    assert len(read_jsonl(os.path.join(run_dir, 'predictions_test.jsonl'))) == 7
  # β was asked once per example: the trained rows read the store (no request beyond the rationales run's 20).
  assert len(read_jsonl(os.path.join(paths['root'], 'requests.jsonl'))) == 20


def test_infer_reproduces_the_runs_test_predictions(trained, paths, beta_url):
  """Algorithm 2 on the test questions (their stored rationales) gives predictions_test.jsonl's answers."""
  data = os.path.join(paths['xtreme_up'], 'xtreme_up_v1.1', 'qa_cross_lang', 'test')
  gold = read_jsonl(os.path.join(trained['xs_fiat'], 'predictions_test.jsonl'))
  released = [(lang, ex) for lang in ('as', 'hi', 'mr') for ex in read_jsonl(os.path.join(data, f'{lang}.jsonl'))]
  assert [lang for lang, _ in released] == [g['language'] for g in gold]  # the run's order: language, then line
  inputs = os.path.join(paths['root'], 'questions.jsonl')
  with open(inputs, 'w', encoding='utf-8') as f:
    for g, (lang, ex) in zip(gold, released):
      f.write(json.dumps({'id': g['id'], 'language': lang, 'question': ex['question'], 'title': ex['title'],
                          'context': ex['context']}, ensure_ascii=False) + '\n')
  answers = os.path.join(paths['root'], 'answers.jsonl')
  fiat('infer', *run_flags(paths, beta_url, 'xs_fiat'), f'--gin.infer.input_file={inputs!r}',
       f'--gin.infer.output_file={answers!r}', cwd=paths['root'])
  got = read_jsonl(answers)
  assert [g['prediction'] for g in got] == [g['prediction'] for g in gold]
  assert {g['rationale_source'] for g in got} == {'store'}
  np.testing.assert_allclose([g['score'] for g in got], [g['score'] for g in gold], atol=1e-4)


def test_evaluate_rescores_the_selected_tau(trained, paths, beta_url):
  out = fiat('evaluate', *run_flags(paths, beta_url, 'xs_fiat'), cwd=paths['root'])
  again = json.loads(out.stdout.strip().splitlines()[-1])
  metrics = json.load(open(os.path.join(trained['xs_fiat'], 'metrics.json')))
  assert again['f1'] == pytest.approx(metrics['test']['headline']['value'], abs=1e-9)


def test_icl_and_report(trained, paths, beta_url):
  out = fiat('icl', *run_flags(paths, beta_url, 'xs_fiat'), cwd=paths['root'])
  icl = json.loads(out.stdout[out.stdout.index('{'):])
  assert icl['icl']['missing'] == 0 and set(icl['per_language']) == {'as', 'hi', 'mr'}
  report = os.path.join(paths['root'], 'report')
  fiat('report', f'--runs_dir={paths["runs"]}', f'--out_dir={report}', cwd=paths['root'])
  table = open(os.path.join(report, 'report.md'), encoding='utf-8').read()
  for row in ('FIAT', 'Fine-tune', 'w/o CoT'):
    assert row in table
  with open(os.path.join(report, 'table2.csv'), encoding='utf-8') as f:
    fiat_row = next(line for line in csv.reader(f) if line[2] == 'FIAT')
  metrics = json.load(open(os.path.join(trained['xs_fiat'], 'metrics.json')))
  assert fiat_row[3].startswith(f"{metrics['test']['headline']['value']:.1f} [")  # the run's test F1


def test_plan_a_16_chip_mesh(paths):
  out = fiat('plan', '--gin_file=models/gemma-2-2b-it.gin', '--mesh=data=1,fsdp=16,model=1', '--device=v5e',
             '--gin.TrainConfig.batch_size=16', '--gin.plan.decode_batch=16', '--no_compile', cwd=paths['root'])
  assert 'mesh data=1 x fsdp=16 x model=1' in out.stdout
  assert '2,614,341,888 params' in out.stdout  # Gemma 2 2B's published count
  assert 'plan: v5e mesh' in out.stderr  # progress


def test_rationales_with_a_local_beta_models_file(paths):
  """XOR-AttriQA's I_β differs per language; the store `fiat rationales` writes with an in-process β."""
  store = os.path.join(paths['root'], 'xor_store')
  out = fiat('rationales', '--gin_file=runs/xor_attriqa/xs_fiat.gin', '--gin_file=models/gemma-2-27b-it.gin',
             '--gin_file=beta/local.gin', f'--gin.BETA_CHECKPOINT={paths["beta"]!r}', '--gin.BETA_CONFIG=None',
             f'--gin.DATA_DIR={paths["xor_attriqa"]!r}', f'--gin.RUNS_DIR={paths["runs"]!r}',
             f'--gin.STORE_DIR={store!r}', f'--gin_file={paths["small"]}', '--gin.Experiment.languages=None',
             cwd=paths['root'], check=False)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['failed'] == summary['pending'] == 0 and summary['done'] == 10 + 5 + 15, out.stderr[-3000:]
  versions = {json.loads(line)['i_beta_version'] for line in open(os.path.join(store, 'shard-00000.jsonl'))}
  assert len(versions) == 5  # one I_β per language


def test_unrolled_layers_and_remat_through_the_command(trained, paths, beta_url, tmp_path):
  """`fiat train` with --gin.tau_model.scan_layers=False and a remat policy trains the same adapter as the row's
  run in the default scanned layout (per layer; within 1e-4 of each tensor's largest value); `fiat evaluate`
  rescoring it needs the same layout and names the binding otherwise."""
  flags = [*run_flags(paths, beta_url, 'xs_wo_cot'), f'--gin.RUNS_DIR={str(tmp_path)!r}']
  unrolled_flags = ['--gin.tau_model.scan_layers=False', "--gin.TrainConfig.remat_policy='full'"]
  out = fiat('train', *flags, *unrolled_flags, cwd=paths['root'])
  run_dir = json.loads(out.stdout[out.stdout.index('{'):])['run_dir']
  load = lambda d: experiment.read_trainable(os.path.join(d, 'trainable.msgpack'))[0]
  scanned, unrolled = load(trained['xs_wo_cot']), load(run_dir)
  assert stacking.is_scanned(scanned) and not stacking.is_scanned(unrolled)
  flat = lambda t: dict(flax.traverse_util.flatten_dict(t))
  got, want = flat(stacking.unstack(scanned)), flat(unrolled)
  assert got.keys() == want.keys()
  for k, w in want.items():
    assert np.abs(got[k] - w).max() <= 1e-4 * np.abs(w).max(), k
  fiat('evaluate', *flags, *unrolled_flags, cwd=paths['root'])
  wrong = fiat('evaluate', *flags, cwd=paths['root'], check=False)
  assert wrong.returncode != 0 and 'bind --gin.tau_model.scan_layers=False' in wrong.stderr
