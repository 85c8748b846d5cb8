"""Every gin file loads with τ overridden to tiny; every recipe runs end to end on the fixtures and writes metrics."""
import glob
import json
import os

import gin
import pytest

from fiat_jax import cli
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as fiat has them)
from fiat_jax.data import formatting
from fiat_jax.data import readers
from fiat_jax import experiment
from fiat_jax.training import train
from fiat_jax import tuning
import store_helpers

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XOR = os.path.join(TESTDATA, 'xor_attriqa')
XQA = os.path.join(TESTDATA, 'xtreme_up')
MACROS = ["DATA_DIR='{data}'", "RUNS_DIR='{runs}'", "STORE_DIR='{store}'", "BETA_URL='http://127.0.0.1:1/v1'",
          "BETA_MODEL='big'", 'PEFT_LR=1e-3', 'FULL_LR=1e-4', 'RATIONALE_LENGTH=128']
# Table 3's rows switch ingredients off cumulatively (docs/paper_rows.md): (data
# recipe, peft, instruction-tuned base).
EXPECTED = {'fiat': ('instruction_rationale', True, True), 'wo_cot': ('instruction', True, True),
            'wo_instruction': ('plain', True, True), 'wo_peft': ('plain', False, True), 'wo_it_base': ('plain', False, False),
            'finetune': ('plain', False, False), 'distilled_cot': ('distilled_cot', True, True),
            'plain_wo_cot': ('instruction', True, False), 'plain_wo_instruction': ('plain', True, False)}


def write_store(store_dir, dataset, data_dir, rationale=None, raw=None):
  """A rationale store written by `fiat rationales` with store_helpers.ScriptedBeta, whose output for an example is
  raw(ex), else f'{rationale(ex)}\nAnswer: yes' (default rationale: store_helpers.rationale_for)."""
  replies = None
  if raw or rationale:
    replies = store_helpers.replies_by_id(dataset, data_dir, raw or (lambda ex: f'{rationale(ex)}\nAnswer: yes'))
  return store_helpers.write_store(store_dir, dataset, data_dir, store_helpers.ScriptedBeta(replies=replies))


def parse(files, tmp_path, data=XOR, extra=()):
  gin.clear_config()
  gin.add_config_file_search_path(cli.GIN_DIR)
  bindings = [m.format(data=data, runs=tmp_path / 'runs', store=tmp_path / 'store') for m in MACROS]
  gin.parse_config_files_and_bindings(list(files), bindings + list(extra))


MINE = ('recipes', 'runs', 'datasets', 'sizes', 'beta', 'tiny.gin', 'demo.gin')  # models/ is tested with hf.py
GIN_FILES = sorted(p for p in glob.glob(os.path.join(cli.GIN_DIR, '**', '*.gin'), recursive=True)
                   if os.path.relpath(p, cli.GIN_DIR).split(os.sep)[0] in MINE)


@pytest.mark.parametrize('path', GIN_FILES)
def test_every_gin_file_loads_with_tiny_tau(path, tmp_path):
  rel = os.path.relpath(path, cli.GIN_DIR)
  with open(path, encoding='utf-8') as f:
    head = f.read().split('\n', 1)[0]
  assert head.startswith('# ') and len(head) > 20, f'{rel}: needs a header comment'
  if rel == 'demo.gin':
    parse([rel], tmp_path, extra=["MINIATURE_BETA='/tmp/w/beta'", "MINIATURE_TOKENIZER='/tmp/w/sp.model'", "MINIATURE_I_BETA='/tmp/w/i.txt'", "MINIATURE_EXEMPLARS='/tmp/w/e.jsonl'",
                                  "MINIATURE_TAU_IT='/tmp/w/tau_it'", "MINIATURE_TAU_BASE='/tmp/w/tau_base'"])
  else:
    parse([rel, 'tiny.gin'], tmp_path)
  exp, recipe = experiment.Experiment(), experiment.Recipe()
  cfg = train.TrainConfig()
  assert cfg.num_steps >= 1 and cfg.optim.learning_rate > 0
  if rel.startswith('runs/'):
    setting, name = rel.split('/')[1], os.path.basename(rel)[:-4]
    assert exp.setting == setting and exp.run_dir == str(tmp_path / 'runs' / setting / exp.name)
    row = name if name == 'icl' else name.split('_', 1)[1]
    if row == 'icl':
      assert recipe.method == 'icl' and exp.tau_size is None
    else:
      assert (recipe.data_recipe, recipe.peft, recipe.instruction_tuned_base) == EXPECTED[row]
      assert exp.tau_size == name.split('_')[0].upper()
      assert cfg.optim.learning_rate == (1e-3 if recipe.peft else 1e-4)
  gin.clear_config()


def test_unknown_binding_fails_fast_naming_it(tmp_path):
  gin.clear_config()
  with pytest.raises(ValueError, match='no_such_field'):
    cli.parse_gin(['--gin_file=runs/xor_attriqa/xs_fiat.gin', '--gin.Experiment.no_such_field=1'], 'fiat train')
  with pytest.raises(cli.UsageError, match=r"unknown arguments \['--bogus'\]"):
    cli.parse_gin(['--gin_file=runs/xor_attriqa/xs_fiat.gin', '--bogus'], 'train')
  gin.clear_config()


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp('stores')
  return {'xor': write_store(root / 'xor', 'xor_attriqa', XOR), 'xqa': write_store(root / 'xqa', 'xtreme_up_xqa', XQA)}


RUNS = [('xor_attriqa', 'icl'), ('xor_attriqa', 'xs_fiat'), ('xor_attriqa', 'xs_wo_cot'),
        ('xor_attriqa', 'xs_wo_instruction'), ('xor_attriqa', 's_wo_peft'), ('xor_attriqa', 'xs_finetune'),
        ('xtreme_up_indic', 'xs_distilled_cot'), ('xtreme_up_full', 's_fiat')]


@pytest.mark.parametrize('setting,name', RUNS)
def test_recipe_runs_end_to_end_and_writes_metrics(setting, name, stores, tmp_path):
  xor = setting == 'xor_attriqa'
  store_dir = stores['xor' if xor else 'xqa']
  argv = [f'--gin_file=runs/{setting}/{name}.gin', '--gin_file=tiny.gin', f"--gin.DATA_DIR='{XOR if xor else XQA}'",
          f"--gin.RUNS_DIR='{tmp_path}'", f"--gin.STORE_DIR='{store_dir}'"]
  if setting == 'xtreme_up_indic':  # the fixture release holds three of the 20 Indic languages
    argv.append("--gin.Experiment.languages=['as', 'hi', 'mr']")
  gin.clear_config()
  assert tuning.train_main(argv) == 0
  run_dir = tmp_path / setting / ('xs_finetune' if name == 'xs_wo_it_base' else name)
  m = json.loads((run_dir / 'metrics.json').read_text())
  for f in ('config.gin', 'version.json', 'operative_config.gin'):
    assert (run_dir / f).exists(), f
  assert "Experiment.name = '%s'" % name in (run_dir / 'config.gin').read_text()
  test = m['test']
  if xor:
    assert test['n'] == 15 and sorted(test['per_language']) == ['bn', 'fi', 'ja', 'ru', 'te']
    acc = test['headline']['accuracy_mean_over_languages']['value']
    assert 0.0 <= acc <= 100.0
    if name == 'icl':  # the store says "yes" for everything: accuracy = share of attributable answers
      labels = [ex['label'] for ex in readers.read_split('xor_attriqa', XOR, 'test')]
      assert test['overall']['accuracy'] == pytest.approx(100.0 * sum(labels) / len(labels))
      assert test['headline']['auc_pr_mean_over_languages'] is None
      return
    assert 0.0 <= test['headline']['auc_pr_mean_over_languages']['value'] <= 100.0
  else:
    assert 0.0 <= test['overall']['f1'] <= 100.0
  assert m['steps'] == 2 and m['best']['step'] == 2
  lines = (run_dir / 'predictions_test.jsonl').read_text().splitlines()
  assert len(lines) == test['n']
  assert (run_dir / experiment.TRAINABLE_FILE).stat().st_size > 0
  log = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log if 'loss' in r] == [1, 2]
  gin.clear_config()


def test_sweep_orders_rows_so_beta_is_asked_once():
  from fiat_jax import sweep  # pylint: disable=g-import-not-at-top
  files = sweep.run_files('xtreme_up_indic', ['XS', 'S'], '3')
  assert files[:3] == ['runs/xtreme_up_indic/xs_fiat.gin', 'runs/xtreme_up_indic/s_fiat.gin',
                       'runs/xtreme_up_indic/icl.gin']
  assert len(files) == 11 and files[-1] == 'runs/xtreme_up_indic/s_finetune.gin'
  assert len(sweep.run_files('xor_attriqa', ['XS'], '2')) == 3
  with pytest.raises(cli.UsageError, match='xs_distilled_cot'):
    sweep.run_files('xor_attriqa', ['XS'], '4')


def test_sweep_figure6_rows():
  from fiat_jax import sweep  # pylint: disable=g-import-not-at-top
  assert sweep.run_files('xtreme_up_full', ['XS', 'S'], '6') == [
      f'runs/xtreme_up_full/{size}_{row}.gin' for row in ('wo_cot', 'wo_instruction', 'plain_wo_cot',
                                                          'plain_wo_instruction') for size in ('xs', 's')]


def bindings(rel, tmp_path):
  """The resolved gin config of a runs/ file alone (no tiny.gin), as {'Configurable.param': value text}."""
  parse([rel], tmp_path, extra=["TAU_XS_IT='/ckpt/xs-it'", "TAU_XS_BASE='/ckpt/xs'", "TAU_S_IT='/ckpt/s-it'",
                                "TAU_S_BASE='/ckpt/s'"])
  out, key = {}, None
  for line in gin.config_str().splitlines():
    if not line.strip() or line.startswith('#'):
      continue
    if not line[0].isspace() and ' = ' in line:
      key, value = line.split(' = ', 1)
      out[key] = value
    else:  # a multi-line value goes on
      out[key] += line.strip()
  return out


@pytest.mark.parametrize('setting', ['xor_attriqa', 'xtreme_up_indic', 'xtreme_up_full'])
@pytest.mark.parametrize('size', ['xs', 's'])
def test_figure6_runs_differ_only_in_the_instruction_and_the_base(setting, size, tmp_path):
  rows = ('wo_cot', 'wo_instruction', 'plain_wo_cot', 'plain_wo_instruction')
  cfg, recipes = {}, {}
  for row in rows:
    cfg[row] = bindings(f'runs/{setting}/{size}_{row}.gin', tmp_path)
    recipes[row] = experiment.Recipe()
    assert (cfg[row]['Experiment.name'], cfg[row]['Experiment.row']) == (f"'{size}_{row}'", f"'{row}'")
  gin.clear_config()

  def differ(a, b):
    keys = (cfg[a].keys() | cfg[b].keys()) - {'Experiment.name', 'Experiment.row'}
    return {k for k in keys if cfg[a].get(k) != cfg[b].get(k)}
  assert differ('wo_cot', 'wo_instruction') == differ('plain_wo_cot', 'plain_wo_instruction') == {
      'Recipe.instruction'}
  assert differ('wo_cot', 'plain_wo_cot') == differ('wo_instruction', 'plain_wo_instruction') == {
      'Recipe.instruction_tuned_base'}
  # Figure 6's pairs: (with I_τ, without I_τ) on the instruction-tuned τ, then on the plain τ; no rationale, LoRA.
  assert [(r.instruction, r.instruction_tuned_base, r.rationale, r.peft) for r in recipes.values()] == [
      (True, True, 'none', True), (False, True, 'none', True), (True, False, 'none', True),
      (False, False, 'none', True)]


def test_every_run_selects_checkpoints_on_the_whole_validation_split(tmp_path):
  paths = [os.path.relpath(p, cli.GIN_DIR) for p in GIN_FILES if os.path.relpath(p, cli.GIN_DIR).startswith('runs')]
  assert len(paths) >= 50
  for rel in paths:
    bindings(rel, tmp_path)
    assert experiment.Experiment().max_eval_examples is None, rel
  # The subsample stays an option: an int keeps that many validation examples per language.
  parse(['runs/xtreme_up_indic/xs_fiat.gin'], tmp_path, extra=['Experiment.max_eval_examples = 1'])
  assert experiment.Experiment().max_eval_examples == 1
  gin.clear_config()
  examples = [{'id': str(i), 'language': lang} for i, lang in enumerate(['as', 'hi', 'as', 'mr', 'hi', 'as'])]
  kept = tuning._subsample(examples, 1, seed=0)
  assert sorted(ex['language'] for ex in kept) == ['as', 'hi', 'mr']


def test_distilled_cot_cuts_long_rationales_counts_them_and_trains(tmp_path):
  store_dir = write_store(tmp_path / 'store', 'xtreme_up_xqa', XQA, rationale=lambda ex: 'Step. ' * 50)
  argv = ['--gin_file=runs/xtreme_up_indic/xs_distilled_cot.gin', '--gin_file=tiny.gin', f"--gin.DATA_DIR='{XQA}'",
          f"--gin.RUNS_DIR='{tmp_path}'", f"--gin.STORE_DIR='{store_dir}'", "--gin.Experiment.languages=['as', 'mr']",
          '--gin.RATIONALE_LENGTH=64', '--gin.TrainConfig.rationale_loss_weight=0.5']
  gin.clear_config()
  assert tuning.train_main(argv) == 0
  run_dir = tmp_path / 'xtreme_up_indic' / 'xs_distilled_cot'
  m = json.loads((run_dir / 'metrics.json').read_text())
  # 4 as + mr training examples, each a 299-byte rationale + EOS: 300 tokens, cut to 64
  assert m['truncation']['train_rationale_targets'] == {'rationale_targets': 4, 'truncated': 4,
                                                        'mean_tokens_cut': 236.0}
  assert json.loads((run_dir / 'train_config.json').read_text())['train']['rationale_loss_weight'] == 0.5
  log = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in log if 'loss' in r]
  assert len(losses) == 2 and all(0 < v < 20 for v in losses)
  gin.clear_config()


def test_raw_rationale_field_gives_tau_betas_whole_output(tmp_path):
  from fiat_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  write_store(tmp_path / 'store', 'xor_attriqa', XOR, raw=lambda ex: f'It names {ex["id"]}.\nAnswer: yes')
  texts = {}
  for field in ('rationale', 'raw'):
    parse(['runs/xor_attriqa/xs_fiat.gin', 'tiny.gin'], tmp_path, extra=[f"Recipe.rationale_field = '{field}'"])
    exp, recipe = experiment.Experiment(), experiment.Recipe()
    _, _, vocab, _ = experiment.tau_model()
    rows = pipeline.eval_examples(*experiment.task_data(exp, recipe, vocab), 'test')
    texts[field] = {r['id']: r['inputs_pretokenized'] for r in rows}
    os.makedirs(exp.run_dir, exist_ok=True)
    experiment.write_provenance(exp.run_dir)
    m = experiment.write_metrics(exp.run_dir, exp, recipe, {})
    metrics_file = os.path.join(exp.run_dir, experiment.METRICS_FILE)
    assert json.loads(open(metrics_file).read())['recipe']['rationale_field'] == field
    assert f"Recipe.rationale_field = '{field}'" in open(os.path.join(exp.run_dir, 'config.gin')).read()
    assert m['recipe']['rationale_field'] == field
  assert len(texts['raw']) == 15
  for i, text in texts['raw'].items():
    assert f'{formatting.RATIONALE_HEADER} It names {i}.\nAnswer: yes\n' in text
    assert f'{formatting.RATIONALE_HEADER} It names {i}.\n' in texts['rationale'][i]
    assert 'Answer: yes' not in texts['rationale'][i]
  with pytest.raises(ValueError, match="Recipe.rationale_field: 'answer' is not one of"):
    experiment.Recipe(rationale_field='answer')
  gin.clear_config()
