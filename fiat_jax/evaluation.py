"""`fiat evaluate` and the evaluations during training: greedy decoding -> the task's postprocess -> its metrics
(per-language tables, bootstrap intervals), label-word scores for AUC-PR; the rationale-reliance analysis."""
import json
import os

import gin
import jax
import numpy as np

from fiat_jax.beta import rationales as beta_run
from fiat_jax.beta import store
from fiat_jax import cli
from fiat_jax.data import pipeline
from fiat_jax.data import readers
from fiat_jax import experiment
from fiat_jax.model import decoding
from fiat_jax.model import transformer as model_lib
from fiat_jax import run_files
import tasks


# ---- Decoding-based evaluation: greedy decode -> task postprocess -> metrics; label-word scores for AUC-PR ---

def decode(model, variables, vocab, examples: list[dict], dataset: str, *, max_decode_tokens: int,
           batch_size: int, bos_id: int) -> dict:
  """τ's postprocessed answers and scores: logp(yes) - logp(no) where the task scores label words, else the
  answer's logprob."""
  definition = tasks.definition(dataset)
  prompts = [[bos_id] + list(ex['inputs']) for ex in examples]
  res = decoding.generate(model, variables, prompts, max_new_tokens=max_decode_tokens, eos_id=vocab.eos_id,
                          pad_id=vocab.pad_id, batch_size=batch_size)
  raw = [vocab.decode(t) for t in res.tokens]
  if definition.SCORE_WORDS:  # logp(first word) - logp(second word): the score-based metric's input
    label = lambda word: list(vocab.encode(word)) + [vocab.eos_id]
    first, second = (decoding.score(model, variables, prompts, [label(word)] * len(prompts), vocab.pad_id,
                                    batch_size) for word in definition.SCORE_WORDS)
    scores = [float(a - b) for a, b in zip(first, second)]
  else:
    scores = [float(sum(lp)) for lp in res.logprobs]
  return {'predictions': [definition.postprocess(r) for r in raw], 'raw': raw, 'scores': scores}


def evaluate(model, variables, vocab, examples: list[dict], dataset: str, *, max_decode_tokens: int,
             batch_size: int, bos_id: int, bootstrap: int, seed: int) -> dict:
  """decode + the task's metrics (metrics.py) with per-language tables and bootstrap intervals."""
  out = decode(model, variables, vocab, examples, dataset, max_decode_tokens=max_decode_tokens,
               batch_size=batch_size, bos_id=bos_id)
  definition = tasks.definition(dataset)
  preds = [definition.tau_prediction(p) for p in out['predictions']]  # None: no answer, counted wrong
  result = definition.score([ex['example'] for ex in examples], preds, out['scores'], seed=seed,
                            n_resamples=max(bootstrap, 1))
  return dict(out, result=result, unparsed=sum(p is None for p in preds))


def flat(result: dict) -> dict:
  """The headline numbers of a task's score result as {name: float} (what the trainer logs)."""
  return tasks.definition(result['task']).flat(result)


def headline(out: dict) -> dict:
  """What `fiat train` prints of a run's metrics: its name and directory, the test figures, the selection."""
  test, exp = out.get('test'), out.get('experiment', {})
  run_dir = os.path.join(exp['runs_root'], exp['setting'], exp['name']) if exp.get('runs_root') else None
  return {'run': exp.get('name'), 'run_dir': run_dir, **(flat(test) if test else {}), 'best': out.get('best'),
          'selected_step': out.get('selected_step')}


def write_predictions(path: str, examples: list[dict], out: dict) -> None:
  """One line per example: id, language, prediction, target, score (the report's bootstrap input)."""
  if jax.process_index() != 0:
    return
  run_files.write_atomic(path, ''.join(
      json.dumps({'id': ex['id'], 'language': ex['language'], 'prediction': pred, 'target': ex['targets_pretokenized'],
                  'score': score}, ensure_ascii=False) + '\n'
      for ex, pred, score in zip(examples, out['predictions'], out['scores'])))


def scores_fn(exp: experiment.Experiment, model, vocab, split_examples):
  """evaluate(step, variables) for the trainer: decoding-based metrics on a split, flattened to numbers."""
  def evaluate_fn(step, variables):
    del step
    out = evaluate(model, variables, vocab, split_examples, exp.dataset, max_decode_tokens=exp.max_decode_tokens,
                   batch_size=exp.eval_batch_size, bos_id=exp.bos_id, bootstrap=0, seed=exp.seed)
    return flat(out['result'])
  return evaluate_fn


# ---- `fiat evaluate`: a trained run on a split; the rationale-reliance analysis ------------------------------

@gin.configurable(denylist=['exp', 'recipe'])
def evaluate_run(exp: experiment.Experiment, recipe: experiment.Recipe, split: str = 'test',
                 rationales: str = 'stored') -> dict:
  """Scores a trained run on `split`; rationales 'empty' / 'shuffled' (another example's, same language)
  measure how much τ leans on β. Writes run_dir/metrics_{split}_{rationales}.json."""
  if recipe.method == 'icl':
    return beta_run.icl_baseline(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir, split=split,
                                 languages=exp.languages)
  if rationales != 'stored' and recipe.rationale != 'input':
    raise ValueError(f'evaluate_run.rationales={rationales!r} needs a recipe with rationales as inputs')
  exp, cfg, variables, vocab = experiment.load_tau(exp, recipe)
  model = model_lib.Transformer(cfg)
  if rationales == 'stored':
    examples = pipeline.eval_examples(*experiment.task_data(exp, recipe, vocab), split)
  else:
    raw = readers.read_split(exp.dataset, exp.data_dir, split, exp.languages)
    stored = store.select(exp.store_dir or '', exp.dataset, raw).by_id(raw)
    texts = pipeline.stored_rationales(raw, stored, f'{exp.store_dir} {split}', recipe.rationale_field)
    texts = replace_rationales(raw, texts, rationales, exp.seed)
    examples = [experiment.tau_example(exp, recipe, vocab, ex, r) for ex, r in zip(raw, texts)]
  out = evaluate(model, variables, vocab, examples, exp.dataset, max_decode_tokens=exp.max_decode_tokens,
                 batch_size=exp.eval_batch_size, bos_id=exp.bos_id, bootstrap=exp.bootstrap, seed=exp.seed)
  result = {'split': split, 'rationales': rationales, 'result': out['result'], 'unparsed': out['unparsed']}
  run_files.write_json(os.path.join(exp.run_dir, f'metrics_{split}_{rationales}.json'), experiment.finite(result),
                       ensure_ascii=False)
  return result


def replace_rationales(examples: list[dict], rationales: list[str], variant: str, seed: int) -> list[str]:
  """'empty': no rationale; 'shuffled': each example gets another example's rationale of its language."""
  if variant == 'empty':
    return [''] * len(rationales)
  if variant != 'shuffled':
    raise ValueError(f'rationales={variant!r}: expected stored, empty or shuffled')
  rng = np.random.default_rng(seed)
  out = list(rationales)
  by_lang = {}
  for i, ex in enumerate(examples):
    by_lang.setdefault(ex['language'], []).append(i)
  for idx in by_lang.values():
    if len(idx) > 1:  # a cyclic shift of a permutation: nobody keeps their own
      perm = rng.permutation(idx)
      for a, b in zip(perm, np.roll(perm, 1)):
        out[a] = rationales[b]
  return out


# ---- Command line --------------------------------------------------------------------------------------------

def evaluate_main(argv: list[str]) -> int:
  """`fiat evaluate --gin_file=<the run's files> [--reliance]`: scores the trained run again on a split."""
  args = cli.parse_gin(argv, 'evaluate')
  exp, recipe = experiment.Experiment(), experiment.Recipe()
  variants = ('stored', 'empty', 'shuffled') if args.reliance else (gin.query_parameter('evaluate_run.rationales')
                                                                     if cli.is_bound('evaluate_run.rationales')
                                                                     else 'stored',)
  for variant in variants:
    result = cli.name_missing_macros(lambda v=variant: evaluate_run(exp, recipe, rationales=v))
    print(json.dumps(experiment.finite({'rationales': variant, **flat(result.get('result', result))}),
                     allow_nan=False))
  return 0
