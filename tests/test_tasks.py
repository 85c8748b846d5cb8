"""The seqio tasks: names, mixtures, registration, I_tau formats per data recipe, rationale attachment."""
import json
import os
import re

import gin
import pytest
import seqio

from fiat_jax.beta import store
from fiat_jax.data import formatting
from fiat_jax.data import pipeline
from fiat_jax.data import readers
import store_helpers
import tasks
from tasks import xor_attriqa
from tasks import xtreme_up

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XOR = os.path.join(TESTDATA, 'xor_attriqa')
XQA = os.path.join(TESTDATA, 'xtreme_up')
VOCAB = seqio.ByteVocabulary()


def write_store(store_dir, dataset, data_dir, splits=readers.SPLITS, replies=None, beta_name='scripted', **kw):
  """A store written by `fiat rationales` (ScriptedBeta; `replies`: {example id: β's output, None: β fails})."""
  beta = store_helpers.ScriptedBeta(beta_name, store_helpers.replies_by_id(dataset, data_dir, replies or {}))
  return store_helpers.write_store(store_dir, dataset, data_dir, beta, splits, **kw)


def test_every_task_and_mixture_is_named_and_registers_for_a_task_data():
  assert tasks.definition('xor_attriqa') is xor_attriqa
  assert len(pipeline.NAMES) == (5 + 1) * 5 + (27 + 2) * 5  # languages + mixtures, times the 5 data recipes
  assert {'xor_attriqa_bn_instruction_rationale', 'xor_attriqa_instruction_rationale', 'xtreme_up_xqa_ur_distilled_cot',
          'xtreme_up_xqa_indic_instruction', 'xtreme_up_xqa_full_plain'} <= set(pipeline.NAMES)
  td = pipeline.TaskData(XQA, vocabulary=VOCAB)
  assert pipeline.register(td) == list(pipeline.NAMES)
  indic = seqio.get_mixture_or_task('xtreme_up_xqa_indic_plain')
  assert len(indic.tasks) == 20
  assert pipeline.task_names(td, 'xtreme_up_xqa_indic_plain') == [f'xtreme_up_xqa_{lang}_plain'
                                                             for lang in ('as', 'hi', 'mr')]
  assert len(pipeline.task_names(td, 'xtreme_up_xqa_full_plain')) == 8  # the languages the release's train split has
  # Examples-proportional rates: hi has 3 train examples, as and mr 2, the languages without a file none.
  rates = {t.name: indic.get_rate(t) for t in indic.tasks}
  assert [rates[f'xtreme_up_xqa_{lang}_plain'] for lang in ('as', 'hi', 'mr')] == [2.0, 3.0, 2.0]
  assert sum(rates.values()) == 7.0
  td = pipeline.TaskData(XQA, vocabulary=VOCAB, languages=['hi', 'bn'])
  assert pipeline.task_names(td, 'xtreme_up_xqa_indic_instruction') == ['xtreme_up_xqa_hi_instruction']
  with pytest.raises(ValueError, match=r"TaskData.store_dir is not set \(data recipe 'instruction_rationale' needs the "
                     r"rationale store\)"):
    pipeline.eval_examples(td, 'xtreme_up_xqa_hi_instruction_rationale', 'train')
  with pytest.raises(readers.DataError, match=r'xtreme_up_xqa_ko_plain train: no ko examples'):
    pipeline.eval_examples(td, 'xtreme_up_xqa_ko_plain', 'train')
  td = pipeline.TaskData(XQA, vocabulary=VOCAB, languages=['xx'])
  with pytest.raises(ValueError, match=r"unknown language\(s\) \['xx'\] for xtreme_up_xqa"):
    pipeline.task_names(td, 'xtreme_up_xqa_full_plain')
  with pytest.raises(ValueError, match="'cot' is no task or mixture"):
    pipeline.task_names(td, 'cot')
  with pytest.raises(TypeError, match=r'TaskData.inputs_length: .1024. \(str\) is not'):
    pipeline.TaskData(XQA, inputs_length='1024')
  with pytest.raises(ValueError, match=r"TaskData.source='hf': expected one of \('files', 'tfds'\)"):
    pipeline.TaskData(XQA, source='hf')


def test_registered_tasks_read_a_gin_bound_task_data(tmp_path):
  """As T5X users do: bind fiat_jax.data.pipeline.TaskData in gin, register(TaskData()), seqio.get_mixture_or_task."""
  store_dir = write_store(tmp_path / 'store', 'xor_attriqa', XOR)
  try:
    gin.parse_config([f"fiat_jax.data.pipeline.TaskData.data_dir = '{XOR}'",
                      f"fiat_jax.data.pipeline.TaskData.store_dir = '{store_dir}'",
                      'fiat_jax.data.pipeline.TaskData.inputs_length = 2000'])
    gin.bind_parameter('fiat_jax.data.pipeline.TaskData.vocabulary', VOCAB)
    td = pipeline.TaskData()  # pylint: disable=no-value-for-parameter
    pipeline.register(td)
    mixture = seqio.get_mixture_or_task('xor_attriqa_instruction_rationale')
    got = [(list(ex['inputs']), list(ex['targets'])) for task in mixture.tasks
           for ex in task.get_dataset(None, split='validation', shuffle=False, num_epochs=1).as_numpy_iterator()]
    expected = pipeline.eval_examples(td, 'xor_attriqa_instruction_rationale', 'validation')
    assert len(expected) == 5 and got == [
        (want['inputs'], VOCAB.encode(want['targets_pretokenized']) + [VOCAB.eos_id]) for want in expected]
    for want in expected:
      rationale = store_helpers.rationale_for(want['example'], 'xor_attriqa')
      assert f'{formatting.RATIONALE_HEADER} {rationale}\n' in want['inputs_pretokenized']
    assert pipeline.truncation_stats(td, 'xor_attriqa_instruction_rationale', 'validation') == {
        'examples': 5, 'truncated': 0, 'mean_tokens_cut': 0.0}
    gin.parse_config(['fiat_jax.data.pipeline.TaskData.inputs_length = 700'])
    shorter = pipeline.TaskData()  # pylint: disable=no-value-for-parameter
    pipeline.register(shorter)  # the registry now reads the new binding
    cut = [ex['inputs'] for task in seqio.get_mixture_or_task('xor_attriqa_instruction_rationale').tasks
           for ex in task.get_dataset(None, split='validation', shuffle=False, num_epochs=1).as_numpy_iterator()]
    assert max(len(ids) for ids in cut) <= 700 < max(len(ids) for ids, _ in got)
    assert pipeline.truncation_stats(shorter, 'xor_attriqa_instruction_rationale', 'validation') == {
        'examples': 5, 'truncated': 2, 'mean_tokens_cut': 71.0}
  finally:
    gin.clear_config()
  with pytest.raises(ValueError, match=r'TaskData.data_dir is not set \(xor_attriqa_bn_instruction_rationale reads the '
                     r'release\)'):
    pipeline.eval_examples(pipeline.TaskData(vocabulary=VOCAB), 'xor_attriqa_bn_instruction_rationale', 'validation')


def test_tasks_score_with_their_own_definition():
  """One definition per data set: β's answers, τ's outputs and prediction files score through tasks/<dataset>.py."""
  examples = readers.read_split('xor_attriqa', XOR, 'validation')
  assert [xor_attriqa.beta_prediction(a) for a in ('Yes.', '**No**', 'not attributable', 'maybe', None)] == [
      True, False, False, None, None]
  assert [xor_attriqa.tau_prediction(xor_attriqa.postprocess(o)) for o in (' Yes.', 'no', 'perhaps')] == [
      True, False, None]
  result = xor_attriqa.score(examples, [True, None, False, True, True], [1.0, 0.5, -1.0, 2.0, 0.0], n_resamples=10)
  assert result['overall'] == {'accuracy': 60.0, 'auc_pr': 100.0}  # all 5 are attributable; None counts wrong
  assert xor_attriqa.flat(result) == {'accuracy': 60.0, 'auc_pr': 100.0}
  assert xtreme_up.beta_prediction('unanswerable.') == 'No Answer' and xtreme_up.beta_prediction('') is None
  assert xtreme_up.vote_key(' The  Taj Mahal ') == 'the taj mahal'
  xqa = readers.read_split('xtreme_up_xqa', XQA, 'test', ['hi'])
  result = xtreme_up.score(xqa, ['No Answer', None, 'New Delhi'], n_resamples=10)
  assert result['per_language']['hi'] == {'f1': pytest.approx(200 / 3), 'em': pytest.approx(200 / 3), 'n': 3}
  assert xtreme_up.flat(result) == {'f1': pytest.approx(200 / 3), 'f1_all_languages': pytest.approx(200 / 3),
                                    'em': pytest.approx(200 / 3)}
  with pytest.raises(readers.DataError, match=r"p.jsonl:3: field 'prediction': expected 'yes'/'no'"):
    xor_attriqa.file_prediction('maybe', 'p.jsonl', 3)


def test_formats_per_recipe():
  ex = readers.read_split('xtreme_up_xqa', XQA, 'train', ['hi'])[0]
  i_tau = formatting.load_i_tau('xtreme_up_xqa')
  assert i_tau.startswith('Answer the question from the English passage.')
  x = ('Question: भारत की राजधानी क्या है?\nTitle: New Delhi\nPassage: New Delhi is the capital of '
       'India and a part of the National Capital Territory of Delhi.')
  assert formatting.format_inputs('xtreme_up_xqa', ex, 'instruction', i_tau) == f'{i_tau}\n\n{x}\nAnswer:'
  assert formatting.format_inputs('xtreme_up_xqa', ex, 'instruction_rationale', i_tau, 'R.') == (
      f'{i_tau}\n\n{x}\n{formatting.RATIONALE_HEADER} R.\nAnswer:')
  plain = ('question: भारत की राजधानी क्या है? title: New Delhi context: New Delhi is the capital '
           'of India and a part of the National Capital Territory of Delhi.')
  assert formatting.format_inputs('xtreme_up_xqa', ex, 'plain') == plain
  assert formatting.format_inputs('xtreme_up_xqa', ex, 'rationale', rationale='R.') == plain + ' rationale: R.'
  xor = readers.read_split('xor_attriqa', XOR, 'train', ['ru'])[1]
  assert formatting.format_inputs('xor_attriqa', xor, 'plain') == (
      'question: Кто написал роман «Война и мир»? answer: Фёдор Достоевский '
      'passage: Роман «Война и мир» написан Львом Толстым.')
  assert xor_attriqa.target(xor) == 'no' and xtreme_up.target(ex) == 'New Delhi'
  assert xor_attriqa.postprocess(' Yes.') == 'yes' and xtreme_up.postprocess(' No Answer\n') == 'No Answer'


def test_fiat_rationales_joined_by_id(tmp_path):
  store_dir = write_store(tmp_path / 'store', 'xor_attriqa', XOR)
  assert len({r['i_beta_version'] for r in store.read_records(store_dir)}) == 5  # I_β differs per language
  td = pipeline.TaskData(XOR, store_dir, VOCAB)
  rows = pipeline.eval_examples(td, 'xor_attriqa_instruction_rationale', 'validation')
  assert [r['language'] for r in rows] == ['bn', 'fi', 'ja', 'ru', 'te']
  for r in rows:
    rationale = store_helpers.rationale_for(r['example'], 'xor_attriqa')
    assert f'{formatting.RATIONALE_HEADER} {rationale}\nAttributable (yes or no):' in r['inputs_pretokenized']
    assert r['inputs'] == VOCAB.encode(r['inputs_pretokenized'])
  assert [r['targets_pretokenized'] for r in rows] == ['yes', 'yes', 'yes', 'yes', 'yes']
  plain = pipeline.eval_examples(td, 'xor_attriqa_te_rationale', 'test')
  assert plain[1]['inputs_pretokenized'].endswith(
      f' rationale: {store_helpers.rationale_for(plain[1]["example"], "xor_attriqa")}')
  assert plain[1]['targets_pretokenized'] == 'no'


@pytest.fixture(scope='module')
def local_beta():
  """A tiny random β (our JAX model; kernels scaled so that it writes non-empty text for every prompt)."""
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.beta import backends  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  cfg = model_lib.tiny_config(vocab_size=VOCAB.vocab_size)
  return backends.LocalBeta(model_lib.Transformer(cfg), {'params': helpers.tiny_params(cfg, seed=0)}, VOCAB,
                            identity='local:tiny-gain-3', batch_size=32, max_len=None)


def test_fiat_trains_on_a_store_written_by_a_local_beta_with_per_language_i_beta(tmp_path, local_beta):
  """Each XOR-AttriQA language has its own I_β (its own exemplars): 5 versions in one store, one per language."""
  from fiat_jax.beta import backends  # pylint: disable=g-import-not-at-top
  files = store_helpers.prompt_files(str(tmp_path / 'prompts'), 'xor_attriqa')
  store_dir = store_helpers.write_store(tmp_path / 'store', 'xor_attriqa', XOR, local_beta,
                                        sampling=backends.Sampling(max_new_tokens=8), **files)
  records = store.read_records(store_dir)
  versions = {}
  for r in records:
    versions.setdefault(r['language'], set()).add(r['i_beta_version'])
  assert len(records) == 30 and all(len(v) == 1 for v in versions.values())
  assert len(set.union(*versions.values())) == 5
  td = pipeline.TaskData(XOR, store_dir, VOCAB)
  rows = pipeline.eval_examples(td, 'xor_attriqa_instruction_rationale', 'train')
  by_id = {r['example_id']: r for r in records if r['split'] == 'train'}
  assert len(rows) == 10
  for row in rows:
    assert f'{formatting.RATIONALE_HEADER} {by_id[row["id"]]["rationale"].strip()}\n' in row['inputs_pretokenized']


def test_missing_rationales_are_counted_and_listed(tmp_path):
  train = readers.read_split('xor_attriqa', XOR, 'train', ['fi'])
  skip = {train[0]['id']: None, train[1]['id']: None}  # β fails on these two
  store_dir = write_store(tmp_path / 'store', 'xor_attriqa', XOR, replies=skip)
  td = pipeline.TaskData(XOR, store_dir, VOCAB)
  pipeline.eval_examples(td, 'xor_attriqa_bn_instruction_rationale', 'train')  # bn is complete.
  with pytest.raises(readers.DataError) as e:
    pipeline.eval_examples(td, 'xor_attriqa_fi_instruction_rationale', 'train')
  assert "2 of 2 examples have no 'rationale' in the store" in str(e.value)
  assert train[0]['id'] in str(e.value) and train[1]['id'] in str(e.value)
  assert 'β failed on it (scripted: no reply)' in str(e.value)
  write_store(store_dir, 'xor_attriqa', XOR)  # β answers them now: the store is read again
  assert len(pipeline.eval_examples(td, 'xor_attriqa_fi_instruction_rationale', 'train')) == 2
  # A record with an empty rationale is missing too, never an empty string.
  empty = write_store(tmp_path / 'empty', 'xor_attriqa', XOR, replies={train[0]['id']: 'Answer: yes'})
  td = pipeline.TaskData(XOR, empty, VOCAB)
  with pytest.raises(readers.DataError, match=f"1 of 2 examples have no 'rationale' in the store: {train[0]['id']}"):
    pipeline.eval_examples(td, 'xor_attriqa_fi_instruction_rationale', 'train')


@pytest.mark.parametrize('change', ['beta', 'i_beta'])
def test_mixed_i_beta_or_beta_in_one_language_is_an_error_naming_them(tmp_path, change):
  files = store_helpers.prompt_files(str(tmp_path / 'prompts'), 'xor_attriqa')
  store_dir = write_store(tmp_path / 'store', 'xor_attriqa', XOR, splits=('train', 'validation'), **files)
  # The test split's rationales come from another β or I_β: the train task must refuse too.
  other = dict(beta_name='other') if change == 'beta' else {}
  other_files = files if change == 'beta' else store_helpers.prompt_files(str(tmp_path / 'prompts'), 'xor_attriqa',
                                                                           tag=' v2')
  write_store(store_dir, 'xor_attriqa', XOR, splits=('test',), **other, **other_files)
  td = pipeline.TaskData(XOR, store_dir, VOCAB)
  with pytest.raises(readers.DataError, match='must come from one β, I_β and sampling') as e:
    pipeline.eval_examples(td, 'xor_attriqa_bn_instruction_rationale', 'train')
  text = str(e.value)
  assert all(f'{lang}: ' in text for lang in readers.XOR_ATTRIQA_LANGUAGES)
  if change == 'beta':
    assert "β 'scripted:other'" in text and "β 'scripted:scripted'" in text
  else:
    versions = {r['i_beta_version'] for r in store.read_records(store_dir) if r['language'] == 'ja'}
    assert len(versions) == 2 and all(f'I_β version {v}' in text for v in versions)
  # ja: the fixture's test split repeats its 2 train and 1 validation examples, so each run's records cover all 6.
  assert re.search(r'ja: β [^|]*\(6 examples\); β [^|]*\(6 examples\) \|', text), text


def test_distilled_cot_rationale_is_a_training_target_only(tmp_path):
  store_dir = write_store(tmp_path / 'store', 'xtreme_up_xqa', XQA, splits=('train',))
  td = pipeline.TaskData(XQA, store_dir, VOCAB, languages=['mr'])
  rows = [dict(r, inputs=r['inputs_pretokenized'], targets=r['targets_pretokenized'], example=json.loads(r['example']))
          for r in pipeline.tokenized(td, 'xtreme_up_xqa_mr_distilled_cot', 'train')]
  assert [(r['kind'], r['inputs'][:12]) for r in rows] == [
      ('label', '[label] Answ'), ('rationale', '[rationale] '),
      ('label', '[label] Answ'), ('rationale', '[rationale] ')]
  assert rows[0]['targets'] == 'Mumbai'
  assert rows[1]['targets'] == store_helpers.rationale_for(rows[1]['example'], 'xtreme_up_xqa')
  assert formatting.RATIONALE_HEADER not in rows[1]['inputs']  # No rationale in the inputs.
  # Validation needs no rationale (none is stored for it) and has label outputs only.
  val = pipeline.eval_examples(td, 'xtreme_up_xqa_indic_distilled_cot', 'validation')
  assert [r['targets_pretokenized'] for r in val] == ['Shivneri Fort', 'Mumbai']


def test_seqio_task_tokenizes_and_carries_metrics():
  task = pipeline.task(pipeline.TaskData(XOR, vocabulary=VOCAB, languages=['bn']), 'xor_attriqa_bn_plain')
  ex = next(task.get_dataset(None, split='test', shuffle=False).as_numpy_iterator())
  assert ex['inputs_pretokenized'].decode().startswith('question: বাংলাদেশের রাজধানী')
  assert list(ex['inputs']) == VOCAB.encode(ex['inputs_pretokenized'].decode())
  assert list(ex['targets']) == VOCAB.encode('yes') + [VOCAB.eos_id]
  assert task.predict_metric_fns == [xor_attriqa.metric_fn] and task.score_metric_fns == [xor_attriqa.score_metric_fn]


def test_seqio_evaluator_scores_as_fiat_evaluate_and_fiat_score_do():
  """A seqio.Evaluator runs the task's own postprocess and metric fns: the numbers `fiat evaluate`
  (evaluation.evaluate's definition.score over τ's postprocessed outputs) and `fiat score` give."""
  pipeline.register(pipeline.TaskData(XOR, vocabulary=VOCAB))
  outputs, scores = ['Yes', 'no.', 'hmm'], [0.0, 1.0, 2.0]  # hmm: no label word, counted wrong
  evaluator = seqio.Evaluator('xor_attriqa_bn_plain', seqio.DecoderFeatureConverter(pack=False), eval_split='test',
                              async_compute_metrics=False)
  result, _ = evaluator.evaluate(
      compute_metrics=True, predict_fn=lambda ds, *_: [(i, VOCAB.encode(outputs[i])) for i in range(3)],
      score_fn=lambda ds, *_: [(i, scores[i]) for i in range(3)])
  examples = readers.read_split('xor_attriqa', XOR, 'test', ['bn'])
  assert [ex['label'] for ex in examples] == [True, False, True]
  expected = xor_attriqa.flat(xor_attriqa.score(
      examples, [xor_attriqa.tau_prediction(xor_attriqa.postprocess(o)) for o in outputs], scores, n_resamples=1))
  assert result.result()['xor_attriqa_bn_plain'] == expected == {'accuracy': pytest.approx(200 / 3),
                                                                     'auc_pr': pytest.approx(250 / 3)}


@pytest.mark.parametrize('recipe', formatting.RECIPES)
def test_tau_example_formats_as_the_task_does(tmp_path, recipe):
  """`fiat infer` / `fiat evaluate --reliance` format one example with experiment.tau_example: the task's exact
  inputs, also when the passage is cut (distilled CoT's '[label] ' prefix counts against inputs_length)."""
  from fiat_jax import experiment  # pylint: disable=g-import-not-at-top
  store_dir = write_store(tmp_path / 'store', 'xor_attriqa', XOR,
                          replies=lambda ex: f'It reads {ex["id"]}.\nAnswer: no\n')
  ingredients = {'instruction_rationale': {}, 'instruction': {'rationale': 'none'}, 'rationale': {'instruction': False},
                 'plain': {'rationale': 'none', 'instruction': False}, 'distilled_cot': {'rationale': 'distilled'}}
  tau_recipe = experiment.Recipe(rationale_field='raw', **ingredients[recipe])
  assert tau_recipe.data_recipe == recipe
  lengths = {'instruction_rationale': 740, 'instruction': 650, 'rationale': 255, 'plain': 205, 'distilled_cot': 650}
  exp = experiment.Experiment(dataset='xor_attriqa', inputs_length=lengths[recipe])  # a few passages are cut
  td = pipeline.TaskData(XOR, store_dir, VOCAB, exp.inputs_length, rationale_field='raw')
  rows = pipeline.eval_examples(td, f'xor_attriqa_{recipe}', 'test')
  assert pipeline.truncation_stats(td, f'xor_attriqa_{recipe}', 'test')['truncated'] == (
      5 if recipe == 'distilled_cot' else 4)
  raw = [r['example'] for r in rows]
  stored = store.select(store_dir, 'xor_attriqa', raw).by_id(raw)
  rationales = [stored[ex['id']]['raw'] if recipe in formatting.RATIONALE_INPUT_RECIPES else None for ex in raw]
  for row, ex, rationale in zip(rows, raw, rationales):
    mine = experiment.tau_example(exp, tau_recipe, VOCAB, ex, rationale)
    assert (mine['inputs_pretokenized'], mine['inputs']) == (row['inputs_pretokenized'], row['inputs'])
