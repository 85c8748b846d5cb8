"""`fiat train | evaluate`: the gin entry points that put FIAT together (`fiat infer` is in infer.py).

Algorithm 1 (building), in `build`: generate_rationales (β, stored once) -> format_with_i_tau (the seqio task of
the recipe) -> train.train (the gradient w.r.t. the PEFT parameters only) -> lora.merge when τ is exported.
Algorithm 2 (inference), in infer.py: β's rationale (from the store, else from the backend) -> format_with_i_tau ->
greedy decoding with the merged θ'_τ -> answer and score.
"""
import dataclasses
import importlib.metadata
import importlib.util  # gin's include resolution needs it imported
import json
import logging
import os
import platform
import time
from typing import Optional, Sequence

import flax
import flax.linen as nn
import gin
import jax
import numpy as np
import seqio

from fiat_jax import cli
from fiat_jax import config_check
from fiat_jax import data
from fiat_jax import decoding
from fiat_jax import distributed
from fiat_jax import hf  # noqa: F401  (registers hf's configurables before gin parses; local_beta and tau_model load through it)
from fiat_jax import lora as lora_lib
from fiat_jax import model as model_lib
from fiat_jax import optim  # noqa: F401  (registers OptimConfig for the gin files)
from fiat_jax import readers
from fiat_jax import train
from fiat_jax import vocab as vocab_lib
from fiat_jax.beta import run as beta_run
from fiat_jax.beta import store
import tasks

TRAINABLE_FILE = 'trainable.msgpack'  # the selected θ_PEFT (or all of θ_τ for full fine-tuning)
TAU_CONFIG_FILE = 'tau.json'  # the adapter config, base and selected step of TRAINABLE_FILE
METRICS_FILE = 'metrics.json'


# ---- What a run is -------------------------------------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class Recipe:
  """FIAT's ingredients (FIDELITY.md): Table 3's rows switch them off cumulatively; method 'icl' is β alone."""
  method: str = 'tau'  # tau: train τ | icl: β's few-shot CoT answers, nothing trained
  rationale: str = 'input'  # input: [I_τ; x; ŷ_β] | none | distilled: a second training target (Hsieh et al.)
  instruction: bool = True  # instruction-augmented tuning (I_τ)
  peft: bool = True  # LoRA only; False: every base parameter trains
  instruction_tuned_base: bool = True
  rationale_field: str = 'rationale'  # ŷ_β = the store record's parsed reasoning | raw: β's whole output

  def __post_init__(self):
    if self.rationale_field not in data.RATIONALE_FIELDS:
      raise ValueError(f'Recipe.rationale_field: {self.rationale_field!r} is not one of {data.RATIONALE_FIELDS}')
    if self.method not in ('tau', 'icl'):
      raise ValueError(f'Recipe.method: {self.method!r} is not tau or icl')
    if self.rationale not in ('input', 'none', 'distilled'):
      raise ValueError(f'Recipe.rationale: {self.rationale!r} is not input, none or distilled')
    if self.rationale == 'distilled' and not self.instruction:
      raise ValueError('Recipe: rationale=distilled needs instruction=True (data.py formats it with I_tau)')

  @property
  def data_recipe(self) -> str:
    """The suffix of the seqio tasks (`import tasks`) that format these ingredients."""
    if self.rationale == 'distilled':
      return 'distilled_cot'
    return {('input', True): 'fiat', ('none', True): 'no_cot', ('input', False): 'no_instruction',
            ('none', False): 'finetune'}[(self.rationale, self.instruction)]


@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class Experiment:
  """One row of a table: the data set, the run's name and where things live."""
  dataset: Optional[str] = None  # xor_attriqa | xtreme_up_xqa
  mixture: Optional[str] = None  # task prefix: xor_attriqa, xtreme_up_xqa_indic, xtreme_up_xqa_full
  setting: Optional[str] = None  # report column: xor_attriqa | xtreme_up_indic | xtreme_up_full | miniature
  row: Optional[str] = None  # report row: icl, finetune, fiat, wo_cot, wo_instruction, wo_peft, distilled_cot
  tau_size: Optional[str] = None  # XS | S (None for ICL)
  name: Optional[str] = None  # run folder name
  data_dir: Optional[str] = None
  runs_root: Optional[str] = None  # the run writes runs_root/setting/name
  store_dir: Optional[str] = None  # the rationale store shared by every run of a data set
  languages: Optional[Sequence[str]] = None
  inputs_length: int = 1024
  targets_length: int = 32
  max_decode_tokens: int = 32
  eval_split: str = 'validation'
  test_split: str = 'test'
  max_eval_examples: Optional[int] = None  # per language, for the evaluations during training
  eval_batch_size: int = 16
  bos_id: Optional[int] = None  # the first decoder input token; None: the τ checkpoint's bos_token_id
  bootstrap: int = 1000
  seed: int = 0

  def require(self, *fields):
    for f in fields:
      if getattr(self, f) in (None, ''):
        raise ValueError(f'Experiment.{f} is not set: bind --gin.Experiment.{f}=... (or the macro the run '
                         f'file names for it)')

  @property
  def run_dir(self) -> str:
    self.require('runs_root', 'setting', 'name')
    return os.path.join(self.runs_root, self.setting, self.name)


@gin.configurable
def byte_vocabulary() -> seqio.Vocabulary:
  return seqio.ByteVocabulary()


@gin.configurable
def sentencepiece_vocabulary(path: str = gin.REQUIRED) -> seqio.Vocabulary:
  """A SentencePiece model file (e.g. a checkpoint's tokenizer.model) as a seqio vocabulary."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'sentencepiece_vocabulary.path: {path} not found')
  return seqio.SentencePieceVocabulary(path)


@gin.configurable
def tau_model(instruction_tuned: Optional[str] = None, base: Optional[str] = None, *, use_base: bool = False,
              vocabulary: Optional[seqio.Vocabulary] = None, expected: Optional[model_lib.Config] = None,
              tiny: bool = False, dtype: Optional[str] = None, kernels: Optional[str] = None, seed: int = 0):
  """θ_τ: (cfg, params, vocabulary, path) from a Hugging Face checkpoint dir, or a random tiny model (tests).

  Args:
    instruction_tuned / base: checkpoint directories of the instruction-tuned and the plain τ.
    use_base: take `base` (the recipe's instruction_tuned_base=False).
    vocabulary: default: the checkpoint's own tokenizer (tokenizer.json, else tokenizer.model).
    expected: the architecture the run was configured for (a models/*.gin file's TAU_CONFIG); the checkpoint
      must match it.
    kernels: model.Config.kernels ('fused' on CPU, 'xla_attention' for GPUs / TPUs, 'reference'); None keeps
      the default.
  """
  if tiny:
    vocabulary = vocabulary or byte_vocabulary()
    cfg = model_lib.tiny_config(vocab_size=vocabulary.vocab_size, **({'kernels': kernels} if kernels else {}))
    key = jax.random.PRNGKey(seed + (1 if use_base else 0))
    return cfg, nn.meta.unbox(model_lib.init_params(cfg, key)), vocabulary, f'tiny-random-{int(use_base)}'
  path = base if use_base else instruction_tuned
  if not path:
    which, macro = ('base', 'BASE') if use_base else ('instruction_tuned', 'IT')
    raise ValueError(f'tau_model.{which} is not set: bind the run\'s τ checkpoint (--gin.TAU_XS_{macro}=... or '
                     f'--gin.TAU_S_{macro}=..., or a gin_configs/models/ file with --gin.TAU_CHECKPOINT=...)')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tau_model: checkpoint directory {path} not found')
  vocabulary = vocabulary or vocab_lib.vocabulary(path)
  cfg, params = hf.load(path, dtype=dtype, expected=expected)
  if kernels:
    cfg = dataclasses.replace(cfg, kernels=kernels)
  if cfg.vocab_size < vocabulary.vocab_size:
    raise ValueError(f'{path}: the model has {cfg.vocab_size} embeddings but the vocabulary has '
                     f'{vocabulary.vocab_size} ids: bind tau_model.vocabulary to the checkpoint\'s tokenizer')
  return cfg, params, vocabulary, path


def resolve_bos(exp: 'Experiment', tau_path: str) -> 'Experiment':
  """Experiment.bos_id None: the τ checkpoint's own BOS (config.json bos_token_id; 0 for a tiny random τ)."""
  if exp.bos_id is not None:
    return exp
  bos = 0
  if os.path.isfile(os.path.join(tau_path, 'config.json')):
    bos = hf.read_json(os.path.join(tau_path, 'config.json')).get('bos_token_id')
    if not isinstance(bos, int):
      raise ValueError(f'{tau_path}/config.json has no integer bos_token_id ({bos!r}): bind --gin.Experiment.bos_id')
  return dataclasses.replace(exp, bos_id=bos)


@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class Beta:
  """β and I_β: the backend (None: use what the store holds) and the prompt files (None: tasks/prompts/)."""
  backend: object = None
  instruction_file: Optional[str] = None
  exemplars_file: Optional[str] = None


# ---- Decoding-based evaluation: greedy decode -> task postprocess -> metrics; label-word scores for AUC-PR ----

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
  test, exp = out.get('test'), out.get('experiment', {})
  run_dir = os.path.join(exp['runs_root'], exp['setting'], exp['name']) if exp.get('runs_root') else None
  return {'run': exp.get('name'), 'run_dir': run_dir, **(flat(test) if test else {}), 'best': out.get('best'),
          'selected_step': out.get('selected_step')}


def finite(tree):
  """NaN (an undefined figure) as null in JSON files."""
  if isinstance(tree, dict):
    return {k: finite(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return None if np.isnan(tree) else float(tree)
  return tree


def write_predictions(path: str, examples: list[dict], out: dict) -> None:
  """One line per example: id, language, prediction, target, score (the report's bootstrap input)."""
  if jax.process_index() != 0:
    return
  with open(path, 'w', encoding='utf-8') as f:
    for ex, pred, score in zip(examples, out['predictions'], out['scores']):
      f.write(json.dumps({'id': ex['id'], 'language': ex['language'], 'prediction': pred,
                          'target': ex['targets_pretokenized'], 'score': score}, ensure_ascii=False) + '\n')


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


# ---- Algorithm 1 ---------------------------------------------------------------------------------------------

def generate_rationales(exp: Experiment, beta: Beta, splits: Sequence[str]) -> Optional[dict]:
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


def format_with_i_tau(exp: Experiment, recipe: Recipe, vocab: seqio.Vocabulary) -> str:
  """Points the seqio tasks that format [I_τ ; x ; ŷ_β] -> y (`import tasks`) at the run's release, store, τ
  vocabulary and inputs length; returns the recipe's mixture name."""
  exp.require('dataset', 'mixture', 'data_dir')
  data.use(data.TaskData(exp.data_dir, exp.store_dir if recipe.rationale != 'none' else None, vocab,
                         exp.inputs_length, exp.languages, rationale_field=recipe.rationale_field))
  return f'{exp.mixture}_{recipe.data_recipe}'


def merge(model_cfg: model_lib.Config, variables: dict):
  """θ'_τ = θ_τ ⊕ θ_PEFT (nothing to merge after full fine-tuning): (merged params, their config)."""
  if model_cfg.lora is None:
    return variables['params'], model_cfg
  return lora_lib.merge(model_cfg, variables['params'], variables)


def _scores_fn(exp: Experiment, model, vocab, split_examples):
  """evaluate(step, variables) for the trainer: decoding-based metrics on a split, flattened to numbers."""
  def evaluate_fn(step, variables):
    del step
    out = evaluate(model, variables, vocab, split_examples, exp.dataset,
                              max_decode_tokens=exp.max_decode_tokens, batch_size=exp.eval_batch_size,
                              bos_id=exp.bos_id, bootstrap=0, seed=exp.seed)
    return flat(out['result'])
  return evaluate_fn


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


@gin.configurable(denylist=['exp', 'recipe'])
def build(exp: Experiment, recipe: Recipe, beta: Optional[Beta] = None, tcfg=None) -> dict:
  """Algorithm 1 for one recipe (or the ICL baseline): writes run_dir/metrics.json and returns it."""
  beta = beta or Beta()
  run_dir = exp.run_dir
  os.makedirs(run_dir, exist_ok=True)
  write_provenance(run_dir)
  if recipe.method == 'icl':
    logging.info('ICL: nothing to train; β answers the %s split alone', exp.test_split)
    generate_rationales(exp, beta, (exp.test_split,))
    result = beta_run.icl_baseline(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir,
                                   split=exp.test_split, languages=exp.languages, beta=beta.backend,
                                   instruction_file=beta.instruction_file, exemplars_file=beta.exemplars_file)
    return write_metrics(run_dir, exp, recipe, {'test': result})

  if recipe.rationale != 'none':  # Algorithm 1: generate expansions, explanations, reasoning.
    generate_rationales(exp, beta, readers.SPLITS)
  cfg, params, vocab, path = tau_model(use_base=not recipe.instruction_tuned_base)
  exp = resolve_bos(exp, path)
  task = format_with_i_tau(exp, recipe, vocab)
  tcfg = tcfg or train.TrainConfig()
  tcfg = dataclasses.replace(tcfg, mode='peft' if recipe.peft else 'full', seed=exp.seed)
  model_cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig() if recipe.peft else None)  # gin: LoraConfig.*
  model = model_lib.Transformer(model_cfg)
  lengths = {'inputs': exp.inputs_length, 'targets': exp.targets_length}
  rows = tcfg.batch_size // jax.process_count()
  batches = lambda start: data.train_batches(task, 'train', lengths, rows, seed=exp.seed,
                                             shard_index=jax.process_index(), num_shards=jax.process_count(),
                                             start_step=start, bos_id=exp.bos_id)
  val = _subsample(data.eval_examples(task, exp.eval_split), exp.max_eval_examples, exp.seed)
  test = data.eval_examples(task, exp.test_split)
  final = {}

  def final_eval(step, variables):
    out = evaluate(model, variables, vocab, test, exp.dataset, max_decode_tokens=exp.max_decode_tokens,
                              batch_size=exp.eval_batch_size, bos_id=exp.bos_id, bootstrap=exp.bootstrap,
                              seed=exp.seed)
    final.update(out, step=step)
    return flat(out['result'])

  res = train.train(tcfg, model_cfg, params, batches, data.fingerprint(task, 'train'), run_dir, base_path=path,
                    evaluate=_scores_fn(exp, model, vocab, val), final_eval=final_eval)
  if res.preempted:
    logging.warning('preempted at step %d: rerun the same command to resume', res.step)
    return {'preempted': True, 'step': res.step}
  # The checkpoint selected on validation, with the variant's frozen tensors (PiSSA's, VeRA's): θ_PEFT whole.
  adapter = {**res.trainable, **{k: v for k, v in res.frozen.items() if k != 'params'}}
  save_trainable(run_dir, jax.device_get(adapter))
  write_tau_config(run_dir, model_cfg, path, recipe, res, exp.bos_id)
  logging.info('run directory %s: the selected τ (step %d) is %s', run_dir, res.selected_step, TRAINABLE_FILE)
  write_predictions(os.path.join(run_dir, f'predictions_{exp.test_split}.jsonl'), test, final)
  return write_metrics(run_dir, exp, recipe, {
      'test': final['result'], 'best': res.best, 'steps': res.step, 'selected_step': res.selected_step,
      'task': task,
      'truncation': dict(data.truncation_stats(task, exp.test_split), train_rationale_targets=(
          data.rationale_target_truncation(task, 'train', exp.targets_length))), 'unparsed': final['unparsed']})


# ---- Run directory files ---------------------------------------------------------------------------------------

def package_version() -> str:
  try:
    return importlib.metadata.version('fiat-jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown (fiat-jax is not installed; run from a source tree)'


def write_provenance(run_dir: str) -> None:
  """The resolved gin config and the versions, next to the results."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(run_dir, 'config.gin'), 'w', encoding='utf-8') as f:
    f.write(gin.config_str())
  with open(os.path.join(run_dir, 'version.json'), 'w', encoding='utf-8') as f:
    json.dump({'fiat_jax': package_version(), 'jax': jax.__version__, 'flax': flax.__version__,
               'python': platform.python_version(), 'time': time.time(), 'processes': jax.process_count(),
               'devices': jax.device_count()}, f, indent=1)


def write_metrics(run_dir: str, exp: Experiment, recipe: Recipe, results: dict) -> dict:
  out = {'experiment': dataclasses.asdict(exp), 'recipe': dataclasses.asdict(recipe), **results}
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, METRICS_FILE), 'w', encoding='utf-8') as f:
      json.dump(finite(out), f, indent=1, ensure_ascii=False, default=str)
    with open(os.path.join(run_dir, 'operative_config.gin'), 'w', encoding='utf-8') as f:
      f.write(gin.operative_config_str())
  return out


def save_trainable(run_dir: str, trainable: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, TRAINABLE_FILE), 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, trainable)))


def write_tau_config(run_dir: str, model_cfg: model_lib.Config, base_path: str, recipe: Recipe, res, bos_id: int):
  """What `fiat evaluate` / `fiat infer` rebuild τ from: the adapter (rank, alpha, variant, targets), the base,
  the selected step; read back by load_tau, so a later gin change cannot silently alter the trained model."""
  if jax.process_index() != 0:
    return
  lora = dataclasses.asdict(model_cfg.lora) if model_cfg.lora is not None else None
  with open(os.path.join(run_dir, TAU_CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump({'mode': 'peft' if lora else 'full', 'lora': lora, 'base_path': base_path,
               'instruction_tuned_base': recipe.instruction_tuned_base, 'bos_id': bos_id,
               'selected_step': res.selected_step, 'best': res.best, 'steps': res.step}, f, indent=1)


def load_tau(exp: Experiment, recipe: Recipe):
  """θ_τ plus the run's selected trained variables: (exp with τ's BOS, model_cfg, variables, vocab)."""
  path = os.path.join(exp.run_dir, TRAINABLE_FILE)
  config_path = os.path.join(exp.run_dir, TAU_CONFIG_FILE)
  for needed in (path, config_path):
    if not os.path.exists(needed):
      raise FileNotFoundError(f'{needed}: no trained τ in this run directory; run `fiat train` with the same '
                              f'gin files first')
  with open(config_path, encoding='utf-8') as f:
    saved = json.load(f)
  if saved['instruction_tuned_base'] != recipe.instruction_tuned_base:
    raise ValueError(f'{config_path}: the run trained instruction_tuned_base={saved["instruction_tuned_base"]}, '
                     f'but the gin files say Recipe.instruction_tuned_base={recipe.instruction_tuned_base}')
  cfg, params, vocab, base_path = tau_model(use_base=not saved['instruction_tuned_base'])
  if os.path.abspath(base_path) != os.path.abspath(saved['base_path']) and not base_path.startswith('tiny-'):
    logging.warning('%s: trained on the base %s, now loading %s', config_path, saved['base_path'], base_path)
  if exp.bos_id is None:
    exp = dataclasses.replace(exp, bos_id=saved['bos_id'])
  with open(path, 'rb') as f:
    trained = flax.serialization.msgpack_restore(f.read())
  if saved['lora'] is not None:
    lora = {k: tuple(v) if isinstance(v, list) else v for k, v in saved['lora'].items()}
    cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(**lora))
    variables = {'params': params, **trained}
  else:
    variables = trained
  logging.info('τ of %s: the checkpoint of step %s (%s)', exp.run_dir, saved['selected_step'],
               'LoRA ' + json.dumps(saved['lora']) if saved['lora'] else 'fully fine-tuned')
  return exp, cfg, variables, vocab


# ---- `fiat evaluate`: a trained run on a split; the rationale-reliance analysis --------------------------------

@gin.configurable(denylist=['exp', 'recipe'])
def evaluate_run(exp: Experiment, recipe: Recipe, split: str = 'test', rationales: str = 'stored') -> dict:
  """Scores a trained run on `split`; rationales 'empty' / 'shuffled' (another example's, same language)
  measure how much τ leans on β. Writes run_dir/metrics_{split}_{rationales}.json."""
  if recipe.method == 'icl':
    return beta_run.icl_baseline(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir, split=split,
                                 languages=exp.languages)
  if rationales != 'stored' and recipe.rationale != 'input':
    raise ValueError(f'evaluate_run.rationales={rationales!r} needs a recipe with rationales as inputs')
  exp, cfg, variables, vocab = load_tau(exp, recipe)
  model = model_lib.Transformer(cfg)
  if rationales == 'stored':
    examples = data.eval_examples(format_with_i_tau(exp, recipe, vocab), split)
  else:
    raw = readers.read_split(exp.dataset, exp.data_dir, split, exp.languages)
    stored = store.select(exp.store_dir or '', exp.dataset, raw).by_id(raw)
    texts = data.stored_rationales(raw, stored, f'{exp.store_dir} {split}', recipe.rationale_field)
    texts = replace_rationales(raw, texts, rationales, exp.seed)
    examples = [tau_example(exp, recipe, vocab, ex, r) for ex, r in zip(raw, texts)]
  out = evaluate(model, variables, vocab, examples, exp.dataset, max_decode_tokens=exp.max_decode_tokens,
                            batch_size=exp.eval_batch_size, bos_id=exp.bos_id, bootstrap=exp.bootstrap,
                            seed=exp.seed)
  result = {'split': split, 'rationales': rationales, 'result': out['result'], 'unparsed': out['unparsed']}
  with open(os.path.join(exp.run_dir, f'metrics_{split}_{rationales}.json'), 'w', encoding='utf-8') as f:
    json.dump(finite(result), f, indent=1, ensure_ascii=False)
  return result


def tau_example(exp: Experiment, recipe: Recipe, vocab, example: dict, rationale: Optional[str]) -> dict:
  """One canonical example formatted for τ as data.py does ([I_τ ; x ; ŷ_β], passage cut to fit)."""
  definition = tasks.definition(exp.dataset)
  i_tau = data.load_i_tau(exp.dataset) if recipe.instruction else None
  text, _ = data.render_inputs(exp.dataset, recipe.data_recipe, example, rationale, vocab, exp.inputs_length,
                               f'example {example["id"]}', i_tau=i_tau)
  target = definition.target(example) if ('label' in example or 'target' in example) else None
  return {'id': example['id'], 'language': example['language'], 'inputs': vocab.encode(text),
          'inputs_pretokenized': text, 'targets_pretokenized': target, 'example': example}


# ---- Command lines ----------------------------------------------------------------------------------------------

def train_main(argv: list[str]) -> int:
  """`fiat train --gin_file=runs/<setting>/<row>.gin [--gin.NAME=VALUE]`: Algorithm 1, metrics in the run dir."""
  cli.parse_gin(argv, 'fiat train')
  out = cli.name_missing_macros(lambda: build(Experiment(), Recipe()))
  print(json.dumps(finite(headline(out)), indent=1, allow_nan=False))
  return 0 if not out.get('preempted') else 3


def evaluate_main(argv: list[str]) -> int:
  """`fiat evaluate --gin_file=<the run's files> [--reliance]`: scores the trained run again on a split."""
  args = cli.parse_gin(argv, 'fiat evaluate', lambda ap: ap.add_argument(
      '--reliance', action='store_true', help='also with empty and with shuffled rationales (how much τ uses β)'))
  exp, recipe = Experiment(), Recipe()
  variants = ('stored', 'empty', 'shuffled') if args.reliance else (gin.query_parameter('evaluate_run.rationales')
                                                                     if cli.is_bound('evaluate_run.rationales')
                                                                     else 'stored',)
  for variant in variants:
    result = cli.name_missing_macros(lambda v=variant: evaluate_run(exp, recipe, rationales=v))
    print(json.dumps(finite({'rationales': variant, **flat(result.get('result', result))}), allow_nan=False))
  return 0
