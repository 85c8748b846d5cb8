"""What a run is: the gin-configured Experiment, Recipe and Beta, θ_τ (`tau_model`), τ's inputs and the files of
the run directory (provenance, metrics.json, the selected θ_PEFT and tau.json, read back by `load_tau`)."""
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

from fiat_jax import commands
from fiat_jax import config_check
from fiat_jax.data import formatting
from fiat_jax.data import pipeline
from fiat_jax.model import hf
from fiat_jax.model import lora as lora_lib
from fiat_jax.model import stacking
from fiat_jax.model import transformer as model_lib
from fiat_jax.model import vocab as vocab_lib
from fiat_jax import run_files

TRAINABLE_FILE = 'trainable.msgpack'  # the selected θ_PEFT (or all of θ_τ for full fine-tuning)
TAU_CONFIG_FILE = 'tau.json'  # the adapter config, base and selected step of TRAINABLE_FILE
METRICS_FILE = 'metrics.json'
# In TRAINABLE_FILE beside the tensors: the adapter they were trained with, so tau.json can be checked against them.
ADAPTER_KEY = 'adapter_config'


# ---- What a run is -------------------------------------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
@config_check.typed
class Recipe:
  """FIAT's ingredients (docs/paper_rows.md): Table 3's rows switch them off cumulatively; method 'icl' is β alone."""
  method: str = 'tau'  # tau: train τ | icl: β's few-shot CoT answers, nothing trained
  rationale: str = 'input'  # input: [I_τ; x; ŷ_β] | none | distilled: a second training target (Hsieh et al.)
  instruction: bool = True  # instruction-augmented tuning (I_τ)
  peft: bool = True  # LoRA only; False: every base parameter trains
  instruction_tuned_base: bool = True
  rationale_field: str = 'rationale'  # ŷ_β = the store record's parsed reasoning | raw: β's whole output

  def __post_init__(self):
    if self.rationale_field not in formatting.RATIONALE_FIELDS:
      raise ValueError(f'Recipe.rationale_field: {self.rationale_field!r} is not one of {formatting.RATIONALE_FIELDS}')
    if self.method not in ('tau', 'icl'):
      raise ValueError(f'Recipe.method: {self.method!r} is not tau or icl')
    if self.rationale not in ('input', 'none', 'distilled'):
      raise ValueError(f'Recipe.rationale: {self.rationale!r} is not input, none or distilled')
    if self.rationale == 'distilled' and not self.instruction:
      raise ValueError('Recipe: rationale=distilled needs instruction=True (formatting.py formats it with I_tau)')

  @property
  def data_recipe(self) -> str:
    """The data recipe (formatting.RECIPES: what τ's inputs carry) of these ingredients."""
    return formatting.data_recipe(self.rationale, self.instruction)


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
              tiny: bool = False, dtype: Optional[str] = None, kernels: Optional[str] = None,
              scan_layers: bool = True, seed: int = 0):
  """θ_τ: (cfg, params, vocabulary, path) from a Hugging Face checkpoint dir, or a random tiny model (tests).

  Args:
    instruction_tuned / base: checkpoint directories of the instruction-tuned and the plain τ.
    use_base: take `base` (the recipe's instruction_tuned_base=False).
    vocabulary: default: the checkpoint's own tokenizer (tokenizer.json, else tokenizer.model).
    expected: the architecture the run was configured for (a models/*.gin file's TAU_CONFIG); the checkpoint
      must match it.
    kernels: model.Config.kernels (attention.KERNELS); None keeps the default, 'auto' (by backend).
    scan_layers: model.Config.scan_layers: the layers as one scanned block, params stacked on "layers" (on by
      default: it compiles ~3x faster and does not slow the CPU step; benchmarks/README.md).
  """
  if tiny:
    vocabulary = vocabulary or byte_vocabulary()
    cfg = model_lib.tiny_config(vocab_size=vocabulary.vocab_size, scan_layers=scan_layers,
                                **({'kernels': kernels} if kernels else {}))
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
  cfg, params = hf.load(path, dtype=dtype, expected=expected, scan_layers=scan_layers)
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


# ---- τ's inputs: [I_τ ; x ; ŷ_β], as the recipe's seqio tasks (data/pipeline.py) or one example at a time ------

def task_data(exp: Experiment, recipe: Recipe, vocab: seqio.Vocabulary) -> tuple[pipeline.TaskData, str]:
  """Where the run's seqio tasks read (release, store, τ vocabulary, inputs length) and its mixture's name."""
  exp.require('dataset', 'mixture', 'data_dir')
  td = pipeline.TaskData(exp.data_dir, exp.store_dir if recipe.rationale != 'none' else None, vocab,
                         exp.inputs_length, exp.languages, rationale_field=recipe.rationale_field)
  return td, f'{exp.mixture}_{recipe.data_recipe}'


def tau_example(exp: Experiment, recipe: Recipe, vocab, example: dict, rationale: Optional[str]) -> dict:
  """One canonical example formatted for τ as the run's seqio tasks format it ([I_τ ; x ; ŷ_β], passage cut)."""
  return formatting.tau_example(exp.dataset, recipe.data_recipe, vocab, exp.inputs_length, example, rationale)


# ---- Run directory files -------------------------------------------------------------------------------------

def package_version() -> str:
  try:
    return importlib.metadata.version('fiat-jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown (fiat-jax is not installed; run from a source tree)'


def write_provenance(run_dir: str) -> None:
  """The resolved gin config and the versions, next to the results."""
  if jax.process_index() != 0:
    return
  run_files.write_atomic(os.path.join(run_dir, 'config.gin'), gin.config_str())
  run_files.write_json(os.path.join(run_dir, 'version.json'), {
      'fiat_jax': package_version(), 'jax': jax.__version__, 'flax': flax.__version__,
      'python': platform.python_version(), 'time': time.time(), 'processes': jax.process_count(),
      'devices': jax.device_count()})


def finite(tree):
  """NaN (an undefined figure) as null in JSON files."""
  if isinstance(tree, dict):
    return {k: finite(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return None if np.isnan(tree) else float(tree)
  return tree


def write_metrics(run_dir: str, exp: Experiment, recipe: Recipe, results: dict) -> dict:
  out = {'experiment': dataclasses.asdict(exp), 'recipe': dataclasses.asdict(recipe), **results}
  if jax.process_index() == 0:
    run_files.write_json(os.path.join(run_dir, METRICS_FILE), finite(out), ensure_ascii=False, default=str)
    run_files.write_atomic(os.path.join(run_dir, 'operative_config.gin'), gin.operative_config_str())
  return out


def adapter_record(model_cfg: model_lib.Config) -> dict:
  """What the tensors of TRAINABLE_FILE were trained with: mode, LoRA config and its scale."""
  lora = model_cfg.lora
  return {'mode': 'peft' if lora is not None else 'full',
          'lora': run_files.plain(dataclasses.asdict(lora)) if lora is not None else None,
          'scale': lora.scale if lora is not None else None}


def save_trainable(run_dir: str, trainable: dict, model_cfg: model_lib.Config) -> None:
  """TRAINABLE_FILE: the tensors and (under ADAPTER_KEY) adapter_record, written atomically."""
  if jax.process_index() == 0:
    tree = {**jax.tree_util.tree_map(np.asarray, trainable), ADAPTER_KEY: adapter_record(model_cfg)}
    run_files.write_atomic(os.path.join(run_dir, TRAINABLE_FILE), flax.serialization.msgpack_serialize(tree))


def read_trainable(path: str) -> tuple[dict, Optional[dict]]:
  """(tensors, adapter_record or None for files written before it existed) of a TRAINABLE_FILE."""
  if not os.path.exists(path):
    raise run_files.RunDirError(f'{path}: missing; {run_files.REBUILD} (or run `fiat train` first)')
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    tree = flax.serialization.msgpack_restore(raw)
    if not isinstance(tree, dict) or not tree:
      raise ValueError(f'holds {type(tree).__name__} {str(tree)[:40]!r}, not a tree of tensors')
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises ValueError, TypeError, its own errors)
    raise run_files.RunDirError(f'{path}: damaged ({len(raw)} bytes; {type(e).__name__}: {e}); '
                                f'{run_files.REBUILD}') from None
  record = tree.pop(ADAPTER_KEY, None)
  return tree, record


def write_tau_config(run_dir: str, model_cfg: model_lib.Config, base_path: str, recipe: Recipe, res, bos_id: int):
  """What `fiat evaluate` / `fiat infer` rebuild τ from: the adapter (rank, alpha, variant, targets), the base,
  the selected step; read back by load_tau, so a later gin change cannot silently alter the trained model."""
  if jax.process_index() != 0:
    return
  lora = dataclasses.asdict(model_cfg.lora) if model_cfg.lora is not None else None
  run_files.write_json(os.path.join(run_dir, TAU_CONFIG_FILE), {
      'mode': 'peft' if lora else 'full', 'lora': lora, 'base_path': base_path,
      'instruction_tuned_base': recipe.instruction_tuned_base, 'bos_id': bos_id,
      'selected_step': res.selected_step, 'best': res.best, 'steps': res.step})


def merge(model_cfg: model_lib.Config, variables: dict):
  """θ'_τ = θ_τ ⊕ θ_PEFT (nothing to merge after full fine-tuning): (merged params, their config)."""
  if model_cfg.lora is None:
    return variables['params'], model_cfg
  return lora_lib.merge(model_cfg, variables['params'], variables)


TAU_FIELDS = ('mode', 'lora', 'base_path', 'instruction_tuned_base', 'bos_id', 'selected_step')


def _tensor_shapes(tree) -> dict:
  return {'/'.join(map(str, k)): tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def tau_mismatches(saved: dict, record: Optional[dict], trained: dict, cfg: model_lib.Config, params) -> list[str]:
  """One line per field of tau.json (`saved`) that the tensors of TRAINABLE_FILE contradict: their adapter
  record (mode, each LoRA field, the scale), else the shapes tau.json's adapter would have on this base."""
  lines = []
  if record is not None:
    if saved['mode'] != record['mode']:
      lines.append(f'mode: tau.json {saved["mode"]!r}, {TRAINABLE_FILE} {record["mode"]!r}')
    for field in sorted(set(saved['lora'] or {}) | set(record['lora'] or {})):
      mine, theirs = (run_files.plain(d or {}).get(field) for d in (saved['lora'], record['lora']))
      if mine != theirs:
        lines.append(f'lora.{field}: tau.json {json.dumps(mine)}, {TRAINABLE_FILE} {json.dumps(theirs)}')
    if lines:
      return lines
  if saved['lora'] is None:
    expected = _tensor_shapes({'params': params})
  else:
    lora = lora_lib.LoraConfig(**saved['lora'])
    expected = _tensor_shapes(jax.eval_shape(lambda p: lora_lib.init(lora, p, jax.random.PRNGKey(0),
                                                                     tied=cfg.tie_embeddings), params))
  got = _tensor_shapes(trained)
  if set(expected) != set(got):
    extra, absent = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    field = 'mode' if saved['lora'] is None or 'params' in {k.split('/')[0] for k in got} else 'lora.variant'
    lines.append(f'{field}: tau.json ({saved["mode"]}, {json.dumps((saved["lora"] or {}).get("variant"))}) gives '
                 f'{len(expected)} tensors, {TRAINABLE_FILE} holds {len(got)}: it lacks {absent[:2]}, has '
                 f'{extra[:2]} besides')
  else:
    wrong = [k for k in expected if expected[k] != got[k]]
    if wrong:
      field = 'lora.rank' if saved['lora'] is not None else 'mode'
      lines.append(f'{field}: tau.json gives {wrong[0]} the shape {list(expected[wrong[0]])}, {TRAINABLE_FILE} '
                   f'holds {list(got[wrong[0]])} ({len(wrong)} tensors differ)')
  return lines


def load_tau(exp: Experiment, recipe: Recipe):
  """θ_τ plus the run's selected trained variables: (exp with τ's BOS, model_cfg, variables, vocab).

  tau.json must agree with the tensors of TRAINABLE_FILE (tau_mismatches); a damaged or missing run file is an
  error naming it and how to rebuild it from the checkpoints.
  """
  path = os.path.join(exp.run_dir, TRAINABLE_FILE)
  config_path = os.path.join(exp.run_dir, TAU_CONFIG_FILE)
  for needed in (path, config_path):
    if not os.path.exists(needed) and not os.path.isdir(os.path.join(exp.run_dir, 'checkpoints')):
      raise commands.UsageError(f'{needed}: no trained τ in this run directory; run `fiat train` with the same '
                                f'gin files first')
  saved = run_files.read_json(config_path)
  absent = [f for f in TAU_FIELDS if f not in saved]
  if absent:
    raise run_files.RunDirError(f'{config_path}: damaged (no field {", ".join(absent)}); {run_files.REBUILD}')
  trained, record = read_trainable(path)
  if saved['instruction_tuned_base'] != recipe.instruction_tuned_base:
    raise ValueError(f'{config_path}: the run trained instruction_tuned_base={saved["instruction_tuned_base"]}, '
                     f'but the gin files say Recipe.instruction_tuned_base={recipe.instruction_tuned_base}')
  cfg, params, vocab, base_path = tau_model(use_base=not saved['instruction_tuned_base'])
  if os.path.abspath(base_path) != os.path.abspath(saved['base_path']) and not base_path.startswith('tiny-'):
    logging.warning('%s: trained on the base %s, now loading %s', config_path, saved['base_path'], base_path)
  if exp.bos_id is None:
    exp = dataclasses.replace(exp, bos_id=saved['bos_id'])
  if stacking.is_scanned(trained) != cfg.scan_layers:
    raise commands.UsageError(
        f'{path}: the run trained with scan_layers={stacking.is_scanned(trained)} (its tensors are '
        f'{"stacked on layers" if stacking.is_scanned(trained) else "per layer"}), but τ is loaded with '
        f'tau_model.scan_layers={cfg.scan_layers}: bind --gin.tau_model.scan_layers={stacking.is_scanned(trained)}')
  try:
    lines = tau_mismatches(saved, record, trained, cfg, params)
  except (TypeError, ValueError) as e:  # a field LoraConfig refuses (unknown variant, rank 0, an unknown field)
    variant = saved['lora'].get('variant') if isinstance(saved['lora'], dict) else None
    if isinstance(variant, str) and variant not in lora_lib.VARIANTS:  # the file is fine: its module is not loaded
      raise commands.UsageError(
          f'{config_path}: the run trained the LoRA variant {variant!r}, which no module imported by this command '
          f'registers ({", ".join(lora_lib.VARIANTS)} are): pass the gin file that imports its module, as `fiat '
          f'train` had it (the run\'s config.gin starts with its imports)') from None
    lines = [f'lora: {e}']
  if lines:
    raise run_files.RunDirError(f'{config_path}: does not match the adapter saved in {path}:\n' +
                                '\n'.join(f'  {line}' for line in lines) +
                                f'\nRestore tau.json ({run_files.REBUILD})')
  if saved['lora'] is not None:
    cfg = dataclasses.replace(cfg, lora=lora_lib.LoraConfig(**saved['lora']))
    variables = {'params': params, **trained}
  else:
    variables = trained
  logging.info('τ of %s: the checkpoint of step %s (%s)', exp.run_dir, saved['selected_step'],
               'LoRA ' + json.dumps(saved['lora']) if saved['lora'] else 'fully fine-tuned')
  return exp, cfg, variables, vocab
