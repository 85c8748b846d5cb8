"""`fiat infer`: Algorithm 2. JSON lines in, JSON lines out: for each input, β's rationale (from the store, else
asked of the backend and stored), then the answer of the tuned τ (θ'_τ = θ_τ ⊕ θ_PEFT, merged) and its score."""
import json
import os
from typing import Optional

import gin
import jax

from fiat_jax.beta import backends
from fiat_jax.beta import rationales as beta_run
from fiat_jax.beta import store
from fiat_jax import cli
from fiat_jax.data import readers
from fiat_jax import evaluation
from fiat_jax import experiment
from fiat_jax.model import transformer as model_lib
import tasks


def read_inputs(path: str, dataset: str) -> list[dict]:
  """JSON lines with the canonical input fields (+ language, optional id); errors name the line and field."""
  fields = [f for f, _ in tasks.definition(dataset).FIELDS]
  rows = []
  for line_no, line, ex in readers.jsonl_objects(path):
    for field in fields + ['language']:
      if not isinstance(ex.get(field), str) or not ex[field].strip():
        raise readers.DataError(f'{path}:{line_no}: field {field!r}: missing or not a non-empty string')
    if ex['language'] not in readers.LANGUAGES[dataset]:
      raise readers.DataError(f'{path}:{line_no}: field \'language\': unknown language {ex["language"]!r} '
                              f'for {dataset}')
    ex['id'] = readers.parse_id(ex, line, path, line_no)
    rows.append(ex)
  if not rows:
    raise readers.DataError(f'{path}: no input lines')
  return rows


@gin.configurable(denylist=['exp', 'recipe'])
def infer(exp: experiment.Experiment, recipe: experiment.Recipe, input_file: str = gin.REQUIRED,
          output_file: str = gin.REQUIRED, beta: Optional[experiment.Beta] = None, split: str = 'infer') -> dict:
  """Algorithm 2: y = argmax P(y | x, ŷ_β; θ'_τ, I_τ) for each input line; β asked only for unstored inputs."""
  beta = beta or experiment.Beta()
  inputs = read_inputs(input_file, exp.dataset)
  rationales, sources = [None] * len(inputs), [None] * len(inputs)
  if recipe.rationale == 'input':
    # A bound β pins the lookup to its identity and I_β; else the store must hold one β and I_β per language.
    pins = {}
    if beta.backend is not None:
      pins = dict(beta=beta.backend.identity, i_beta_texts=i_beta_of(exp, beta, inputs, split)[1])
    for i, r in enumerate(store.select(store_dir_of(exp), exp.dataset, inputs, **pins).records):
      if r is not None:
        rationales[i], sources[i] = r[recipe.rationale_field], 'store'
    todo = [i for i, r in enumerate(rationales) if r is None]
    if todo:
      asked = ask_beta(exp, beta, [inputs[i] for i in todo], split, recipe.rationale_field)
      for i, r in zip(todo, asked):
        rationales[i], sources[i] = r, 'beta'
  exp, cfg, variables, vocab = experiment.load_tau(exp, recipe)
  merged, merged_cfg = experiment.merge(cfg, variables)  # θ'_τ = θ_τ ⊕ θ_PEFT
  model = model_lib.Transformer(merged_cfg)
  examples = [experiment.tau_example(exp, recipe, vocab, ex, r) for ex, r in zip(inputs, rationales)]
  out = evaluation.decode(model, {'params': merged}, vocab, examples, exp.dataset,
                          max_decode_tokens=exp.max_decode_tokens, batch_size=exp.eval_batch_size, bos_id=exp.bos_id)
  os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  with open(output_file, 'w', encoding='utf-8') as f:
    for ex, r, src, pred, score in zip(inputs, rationales, sources, out['predictions'], out['scores']):
      f.write(json.dumps({'id': ex['id'], 'language': ex['language'], 'rationale': r, 'rationale_source': src,
                          'prediction': pred, 'score': score}, ensure_ascii=False) + '\n')
  return {'n': len(inputs), 'asked_beta': sum(s == 'beta' for s in sources),
          'from_store': sum(s == 'store' for s in sources), 'output_file': output_file}


def store_dir_of(exp: experiment.Experiment) -> str:
  """Where `fiat infer` reads and appends β's rationales: the run's store, else one in the run directory."""
  return exp.store_dir or os.path.join(exp.run_dir, 'infer_store')


def i_beta_of(exp: experiment.Experiment, beta: experiment.Beta, examples: list[dict], split: str):
  """β's I_β (messages, texts) per language, built as `fiat rationales` builds them."""
  train_examples = {}
  if exp.data_dir:
    train_examples['train'] = readers.read_split(exp.dataset, exp.data_dir, 'train', exp.languages)
  return beta_run.build_i_beta(exp.dataset, train_examples | {split: examples}, beta.instruction_file,
                               beta.exemplars_file)


def ask_beta(exp: experiment.Experiment, beta: experiment.Beta, examples: list[dict], split: str,
             field: str = 'rationale') -> list[str]:
  """β's rationales (record[field], as the run was trained on) for new inputs, appended to the store (so no
  input is ever asked twice)."""
  if beta.backend is None:
    raise ValueError(f'{len(examples)} inputs have no stored rationale and Beta.backend is not set: bind it '
                     f'(e.g. --gin.Beta.backend=@HttpBeta())')
  i_beta, texts = i_beta_of(exp, beta, examples, split)
  sampling = backends.Sampling()
  items = beta_run.plan(exp.dataset, {split: examples}, (split,), i_beta, texts, beta.backend.identity, sampling)
  out = [None] * len(items)
  with store.ShardWriter(store_dir_of(exp), jax.process_index()) as writer:
    for i, comp in beta.backend.map([(it.messages, it.seed) for it in items], sampling):
      record = beta_run.build_record(items[i], comp, exp.dataset, beta.backend.identity, sampling,
                                     type(beta.backend).__name__)
      writer.append(record)
      if record['error'] is not None:
        raise RuntimeError(f'β failed on input {items[i].example["id"]}: {record["error"]}')
      out[i] = record[field]
  return out


def main(argv: list[str]) -> int:
  """`fiat infer --gin_file=<the run's files> --gin.infer.input_file=IN --gin.infer.output_file=OUT`."""
  cli.parse_gin(argv, 'infer')
  print(json.dumps(cli.name_missing_macros(lambda: infer(experiment.Experiment(), experiment.Recipe()))))
  return 0
