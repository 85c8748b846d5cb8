"""`fiat train`: Algorithm 1 (model building), in `build`: generate_rationales (β, stored once) -> τ's inputs
formatted with I_τ (the recipe's seqio tasks: experiment.task_data, data/pipeline.py) -> train.train (the gradient
w.r.t. the PEFT parameters only) -> merge when τ is exported. `fiat evaluate` is in evaluation.py; Algorithm 2
(inference, `fiat infer`) in inference.py: β's rationale (from the store, else from the backend) -> τ's inputs ->
greedy decoding with the merged θ'_τ -> answer and score.
"""
import contextlib
import dataclasses
import json
import logging
import os
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from fiat_jax.beta import rationales as beta_run
from fiat_jax import cli
from fiat_jax.data import pipeline
from fiat_jax.data import readers
from fiat_jax import evaluation
from fiat_jax import experiment
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib
from fiat_jax import run_files
from fiat_jax.training import batches as batches_lib
from fiat_jax.training import distributed
from fiat_jax.training import train


# ---- Algorithm 1 ---------------------------------------------------------------------------------------------

def generate_rationales(exp: experiment.Experiment, beta: experiment.Beta, splits: Sequence[str]) -> Optional[dict]:
  """ŷ_β = argmax P(y | x; θ_β, I_β) for every example of `splits`, appended once to the shared store."""
  exp.require('dataset', 'data_dir', 'store_dir')
  if beta.backend is None:
    if not os.path.isdir(exp.store_dir):
      raise ValueError(f'{exp.store_dir}: no rationale store, and Beta.backend is not set to ask β: run '
                       f'`fiat rationales` first or bind Beta.backend')
    return None
  result = beta_run.rationales(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir,
                               beta=beta.backend, splits=tuple(splits), languages=exp.languages,
                               instruction_file=beta.instruction_file, exemplars_file=beta.exemplars_file,
                               progress=jax.process_index() == 0)
  if result['stopped']:
    raise RuntimeError(f'rationales stopped: {result["stopped"]} ({result["done"]} stored in {exp.store_dir}, '
                       f'{result["failed"]} failed, {result["pending"]} not asked); fix that, then rerun')
  if result['failed'] or result['pending']:
    raise RuntimeError(f'rationales: {result["failed"]} failed and {result["pending"]} pending examples in '
                       f'{exp.store_dir}; rerun to retry them (stored ones are not asked again)')
  distributed.barrier('rationales')  # every process's shard is complete before anyone reads the store
  return result


def _subsample(examples: list[dict], per_language: Optional[int], seed: int) -> list[dict]:
  if per_language is None:
    return examples
  rng = np.random.default_rng(seed)
  by_lang = {}
  for ex in examples:
    by_lang.setdefault(ex['language'], []).append(ex)
  keep = set()
  for rows in by_lang.values():
    idx = rng.permutation(len(rows))[:per_language]
    keep.update(id(rows[i]) for i in idx)
  return [ex for ex in examples if id(ex) in keep]


def _run_train_config(tcfg: train.TrainConfig, recipe: experiment.Recipe, exp: experiment.Experiment):
  """tcfg with what the run sets (TrainConfig.SET_BY_RUN): its mode from Recipe.peft, its seed from Experiment.seed.
  A caller's TrainConfig that sets either to something else is an error naming it, not silently replaced."""
  derived = {'mode': 'peft' if recipe.peft else 'full', 'seed': exp.seed}
  defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
  for field, value in derived.items():
    given = getattr(tcfg, field)
    if given != defaults[field] and given != value:
      raise ValueError(f'TrainConfig.{field}={given!r} contradicts the run, which sets {value!r} '
                       f'({train.TrainConfig.SET_BY_RUN[field]})')
  return dataclasses.replace(tcfg, **derived)


@gin.configurable(denylist=['exp', 'recipe', 'allow_changed_settings'])
def build(exp: experiment.Experiment, recipe: experiment.Recipe, beta: Optional[experiment.Beta] = None,
          tcfg=None, allow_changed_settings: bool = False) -> dict:
  """Algorithm 1 for one recipe (or the ICL baseline): writes run_dir/metrics.json and returns it.

  The run directory must be writable and is held (run_files.lock) until the end: one `fiat train` at a time.
  """
  run_dir = exp.run_dir
  run_files.check_writable(run_dir)
  with (run_files.lock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext()):
    return _build(exp, recipe, beta or experiment.Beta(), tcfg, allow_changed_settings)


def _build(exp: experiment.Experiment, recipe: experiment.Recipe, beta: experiment.Beta, tcfg,
           allow_changed_settings: bool) -> dict:
  run_dir = exp.run_dir
  if recipe.method == 'icl':
    experiment.write_provenance(run_dir)
    logging.info('ICL: nothing to train; β answers the %s split alone', exp.test_split)
    generate_rationales(exp, beta, (exp.test_split,))
    result = beta_run.icl_baseline(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir,
                                   split=exp.test_split, languages=exp.languages, beta=beta.backend,
                                   instruction_file=beta.instruction_file, exemplars_file=beta.exemplars_file)
    return experiment.write_metrics(run_dir, exp, recipe, {'test': result})

  if recipe.rationale != 'none':  # Algorithm 1: generate expansions, explanations, reasoning.
    generate_rationales(exp, beta, readers.SPLITS)
  cfg, params, vocab, path = experiment.tau_model(use_base=not recipe.instruction_tuned_base)
  exp = experiment.resolve_bos(exp, path)
  td, task = experiment.task_data(exp, recipe, vocab)
  tcfg = _run_train_config(tcfg or train.TrainConfig(), recipe, exp)
  model_cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig() if recipe.peft else None)  # gin: LoraConfig.*
  model = model_lib.Transformer(model_cfg)
  lengths = {'inputs': exp.inputs_length, 'targets': exp.targets_length}
  rows = tcfg.batch_size // jax.process_count()
  batches = lambda start: batches_lib.train_batches(td, task, 'train', lengths, rows, seed=exp.seed,
                                                    shard_index=jax.process_index(), num_shards=jax.process_count(),
                                                    start_step=start, bos_id=exp.bos_id)
  val = _subsample(pipeline.eval_examples(td, task, exp.eval_split), exp.max_eval_examples, exp.seed)
  test = pipeline.eval_examples(td, task, exp.test_split)
  final = {}

  def final_eval(step, variables):
    out = evaluation.evaluate(model, variables, vocab, test, exp.dataset, max_decode_tokens=exp.max_decode_tokens,
                              batch_size=exp.eval_batch_size, bos_id=exp.bos_id, bootstrap=exp.bootstrap,
                              seed=exp.seed)
    final.update(out, step=step)
    return evaluation.flat(out['result'])

  # config.gin is written once the settings are checked against the recorded ones (a refused resume keeps it).
  res = train.train(tcfg, model_cfg, params, batches, pipeline.fingerprint(td, task, 'train'), run_dir, base_path=path,
                    evaluate=evaluation.scores_fn(exp, model, vocab, val), final_eval=final_eval,
                    settings={'run': {'recipe': dataclasses.asdict(recipe), 'experiment': dataclasses.asdict(exp)}},
                    allow_changed_settings=allow_changed_settings,
                    on_start=lambda: experiment.write_provenance(run_dir))
  if res.preempted:
    logging.warning('preempted at step %d: rerun the same command to resume', res.step)
    return {'preempted': True, 'step': res.step}
  # The checkpoint selected on validation, with the variant's frozen tensors (PiSSA's, VeRA's): θ_PEFT whole.
  adapter = {**res.trainable, **{k: v for k, v in res.frozen.items() if k != 'params'}}
  experiment.save_trainable(run_dir, jax.device_get(adapter), model_cfg)
  experiment.write_tau_config(run_dir, model_cfg, path, recipe, res, exp.bos_id)
  logging.info('run directory %s: the selected τ (step %d) is %s', run_dir, res.selected_step,
               experiment.TRAINABLE_FILE)
  evaluation.write_predictions(os.path.join(run_dir, f'predictions_{exp.test_split}.jsonl'), test, final)
  return experiment.write_metrics(run_dir, exp, recipe, {
      'test': final['result'], 'best': res.best, 'steps': res.step, 'selected_step': res.selected_step,
      'task': task,
      'truncation': dict(pipeline.truncation_stats(td, task, exp.test_split), train_rationale_targets=(
          batches_lib.rationale_target_truncation(td, task, 'train', exp.targets_length))),
      'unparsed': final['unparsed']})


# ---- Command line --------------------------------------------------------------------------------------------

def train_main(argv: list[str]) -> int:
  """`fiat train --gin_file=runs/<setting>/<row>.gin [--gin.NAME=VALUE] [--allow_changed_settings]`: Algorithm 1,
  metrics in the run dir."""
  args = cli.parse_gin(argv, 'train')
  out = cli.name_missing_macros(lambda: build(experiment.Experiment(), experiment.Recipe(),
                                              allow_changed_settings=args.allow_changed_settings))
  print(json.dumps(experiment.finite(evaluation.headline(out)), indent=1, allow_nan=False))
  return 0 if not out.get('preempted') else 3
