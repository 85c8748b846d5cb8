"""seqio tasks of every data set, language and recipe (registered by `import tasks`): the release as source, the
named preprocessors attach_rationales and format_with_i_tau, then tokenize / append_eos; passage-first truncation.
Where they read (release, store, vocabulary, inputs length) is TaskData's, at get_dataset time. The training
batches over these examples are batches.py's."""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from fiat_jax import config_check
from fiat_jax.data import readers
from fiat_jax.beta import store

# Which ingredients each recipe's inputs carry (docs/paper_rows.md; Table 3 rows are combinations).
RECIPES = ('fiat', 'no_cot', 'no_instruction', 'finetune', 'distilled_cot')
INSTRUCTION_RECIPES = frozenset({'fiat', 'no_cot', 'distilled_cot'})
RATIONALE_INPUT_RECIPES = frozenset({'fiat', 'no_instruction'})
RATIONALE_RECIPES = RATIONALE_INPUT_RECIPES | {'distilled_cot'}  # Need the rationale store.
# Distilled CoT (Hsieh et al. 2023): task prefixes; the rationale is a training target only.
LABEL_PREFIX = '[label] '
RATIONALE_PREFIX = '[rationale] '
RATIONALE_HEADER = 'Reasoning (written by a larger model; it may be wrong):'
# Distilled CoT's two training targets, as decoder_task_ids (the loss averages each over its own tokens).
TASK_IDS = {'label': 0, 'rationale': 1}
# Which field of a store record becomes ŷ_β: the parsed reasoning, or β's whole output (reasoning and answer).
RATIONALE_FIELDS = ('rationale', 'raw')
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'tasks',
                           'prompts')
SOURCES = ('files', 'tfds')
# Text features every registered task yields next to inputs / targets.
TEXT_FEATURES = ('id', 'language', 'kind', 'example')


def canonical_example(features: Mapping[str, Any]) -> dict:
  """The canonical example a task's row carries (its 'example' feature, JSON): what the metrics score against."""
  value = features['example']
  return json.loads(value.decode('utf-8') if isinstance(value, bytes) else value)


def _tasks():
  """The tasks package (imported here, not at the top: `import tasks` registers its seqio tasks through this module)."""
  import tasks  # pylint: disable=g-import-not-at-top
  return tasks


def _definition(dataset: str):
  """tasks/<dataset>.py: the data set's fields, cue, target and metrics."""
  return _tasks().definition(dataset)


@gin.configurable(module='fiat_jax.data.pipeline')
@dataclasses.dataclass(frozen=True)
@config_check.typed
class TaskData:
  """What the registered tasks read when a dataset is built: bind it in gin, or data.use(...) for one run.

  Attributes:
    data_dir: the extracted release (source='files') or a TFDS data dir (source='tfds').
    store_dir: the rationale store; needed by fiat, no_instruction and distilled_cot.
    vocabulary: the τ tokenizer.
    inputs_length: input token budget; longer inputs lose the end of their passage (counted).
    languages: the languages a mixture takes; None: those present in the train split.
    rationale_field: the store record field that becomes ŷ_β: 'rationale' (the reasoning) or 'raw' (β's whole
      output, reasoning and final answer).
  """
  data_dir: Optional[str] = None
  store_dir: Optional[str] = None
  vocabulary: Optional[seqio.Vocabulary] = None
  inputs_length: Optional[int] = None
  languages: Optional[Sequence[str]] = None
  source: str = 'files'
  rationale_field: str = 'rationale'

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f'TaskData.source={self.source!r}: expected one of {SOURCES}')
    if self.rationale_field not in RATIONALE_FIELDS:
      raise ValueError(f'TaskData.rationale_field={self.rationale_field!r}: expected one of {RATIONALE_FIELDS}')
    if self.languages is not None:
      object.__setattr__(self, 'languages', tuple(self.languages))

  def key(self) -> tuple:
    """What the caches are keyed on (vocabularies compare by identity: some are not hashable)."""
    return (self.data_dir, self.store_dir, id(self.vocabulary), self.inputs_length, self.languages, self.source,
            self.rationale_field)


_USED: list[Optional[TaskData]] = [None]
_TOKENIZED: dict[tuple, tuple[TaskData, list[dict]]] = {}


def use(task_data: Optional[TaskData]) -> None:
  """The TaskData every task reads from now on, over gin's (None: gin's again)."""
  _USED[0] = task_data


def task_data() -> TaskData:
  """data.use's TaskData, else the one gin binds."""
  return _USED[0] if _USED[0] is not None else TaskData()  # pylint: disable=no-value-for-parameter


def _required(td: TaskData, field: str, why: str):
  value = getattr(td, field)
  if value is None:
    raise ValueError(f'TaskData.{field} is not set ({why}): bind --gin.TaskData.{field}=... or pass it to '
                     f'data.use(TaskData(...))')
  return value


class TaskVocabulary(seqio.Vocabulary):
  """TaskData's vocabulary, looked up when used: the tasks exist before a run knows its τ's tokenizer."""

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return _required(task_data(), 'vocabulary', 'the tasks tokenize with it')

  bos_id = property(lambda self: self.resolved.bos_id)
  eos_id = property(lambda self: self.resolved.eos_id)
  unk_id = property(lambda self: self.resolved.unk_id)
  pad_id = property(lambda self: self.resolved.pad_id)
  vocab_size = property(lambda self: self.resolved.vocab_size)
  _base_vocab_size = property(lambda self: self.resolved.vocab_size)

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  _encode, _decode, _encode_tf, _decode_tf = encode, decode, encode_tf, decode_tf

  def __eq__(self, other):
    return isinstance(other, TaskVocabulary)

  def __hash__(self):
    return hash(TaskVocabulary)


def load_i_tau(dataset: str) -> str:
  """The I_tau instruction text of a data set, from tasks/prompts/."""
  path = os.path.join(PROMPTS_DIR, _definition(dataset).I_TAU_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: I_tau file of {dataset} not found')
  with open(path, encoding='utf-8') as f:
    text = f.read().strip()
  if not text:
    raise ValueError(f'{path}: empty I_tau')
  return text


def format_inputs(dataset: str, example: dict, recipe: str, i_tau: Optional[str] = None,
                  rationale: Optional[str] = None, passage: Optional[str] = None) -> str:
  """x formatted for one recipe: [I_tau ; x ; rationale] (fiat) down to plain x (finetune)."""
  definition = _definition(dataset)
  values = {field: example[field] for field, _ in definition.FIELDS}
  if passage is not None:
    values[definition.PASSAGE_FIELD] = passage
  if recipe in INSTRUCTION_RECIPES:
    lines = [i_tau, ''] + [f'{name}: {values[field]}' for field, name in definition.FIELDS]
    if recipe == 'fiat':
      lines.append(f'{RATIONALE_HEADER} {rationale}')
    return '\n'.join(lines + [definition.CUE])
  if recipe not in RECIPES:
    raise ValueError(f'unknown recipe {recipe!r}; expected one of {RECIPES}')
  parts = [f'{field}: {values[field]}' for field, _ in definition.FIELDS]
  if recipe == 'no_instruction':
    parts.append(f'rationale: {rationale}')
  return ' '.join(parts)


def truncate_passage(render: Callable[[str], str], passage: str, vocabulary: seqio.Vocabulary,
                     max_tokens: Optional[int], where: str) -> tuple[str, int]:
  """render(passage) within max_tokens, cutting only the passage, from its end; (text, tokens cut)."""
  text = render(passage)
  full = len(vocabulary.encode(text))
  if max_tokens is None or full <= max_tokens:
    return text, 0
  passage_ids = vocabulary.encode(passage)
  keep = len(passage_ids) - (full - max_tokens)
  while keep >= 0:
    text = render(vocabulary.decode(passage_ids[:keep]))
    length = len(vocabulary.encode(text))
    if length <= max_tokens:
      return text, full - length
    keep -= length - max_tokens  # Token counts are not additive at the cut: cut more.
  without = len(vocabulary.encode(render('')))
  raise readers.DataError(
      f'{where}: the inputs need {without} tokens without any passage, more than inputs_length='
      f'{max_tokens}; the instruction, question and rationale are never cut: raise inputs_length')


def render_inputs(dataset: str, recipe: str, example: dict, rationale: Optional[str], vocabulary: seqio.Vocabulary,
                  inputs_length: Optional[int], where: str, *, i_tau: Optional[str] = None,
                  kind: str = 'label') -> tuple[str, int]:
  """The inputs of one task row (distilled CoT: of its 'label' or 'rationale' output), passage cut from its end to
  fit inputs_length: (text, tokens cut). The seqio tasks and `fiat infer` / `fiat evaluate` both format with it."""
  distilled = recipe == 'distilled_cot'
  prefix = (RATIONALE_PREFIX if kind == 'rationale' else LABEL_PREFIX) if distilled else ''
  rationale = None if rationale is None else rationale.strip()
  render = lambda p: prefix + format_inputs(dataset, example, 'no_cot' if distilled else recipe, i_tau, rationale,
                                            passage=p)
  return truncate_passage(render, example[_definition(dataset).PASSAGE_FIELD], vocabulary, inputs_length, where)


@functools.lru_cache(maxsize=None)
def _raw_split(dataset: str, data_dir: str, source: str, split: str) -> list[dict]:
  if source == 'tfds':
    from fiat_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.read_split_tfds(dataset, data_dir, split)
  return readers.read_split(dataset, data_dir, split)


def _store_state(store_dir: Optional[str]) -> tuple:
  """The store's files with their sizes and times: a store appended to since it was read is read again."""
  if not store_dir or not os.path.isdir(store_dir):
    return ()
  return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(store_dir) if e.is_file()))


@functools.lru_cache(maxsize=None)
def _rationale_records(dataset: str, data_dir: str, source: str, rationale_dir: str,
                       state: tuple = ()) -> dict[str, dict[str, dict]]:
  """Store records per split and example id, chosen by store.select over every split at once: one β, I_β
  version and sampling per language (I_β differs per language), the input as β saw it. An example without a
  record maps to {'missing': why}. state: _store_state(rationale_dir), the cache's key."""
  del state
  if not os.path.isdir(rationale_dir):
    raise readers.DataError(f'{rationale_dir}: rationale store not found')
  splits = {split: _raw_split(dataset, data_dir, source, split) for split in readers.SPLITS}
  chosen = store.select(rationale_dir, dataset, [ex for exs in splits.values() for ex in exs])
  by_split, start = {}, 0
  for split, exs in splits.items():
    by_split[split] = {ex['id']: chosen.records[start + j] or {'missing': chosen.missing[start + j]}
                       for j, ex in enumerate(exs)}
    start += len(exs)
  return by_split


def stored_rationales(examples: Sequence[dict], records: Mapping[str, dict], where: str,
                      field: str = 'rationale') -> list[str]:
  """The stored ŷ_β (record[field]: 'rationale', or β's whole output 'raw') of every example, joined by id;
  any missing one is an error naming the ids."""
  if field not in RATIONALE_FIELDS:
    raise ValueError(f'rationale field {field!r}: expected one of {RATIONALE_FIELDS}')
  missing = [ex['id'] for ex in examples
             if not isinstance(records.get(ex['id'], {}).get(field), str)
             or not records[ex['id']][field].strip()]
  if missing:
    shown = ', '.join(missing[:20]) + (' ...' if len(missing) > 20 else '')
    why = dict.fromkeys(records.get(i, {}).get('missing', f'an empty {field!r}') for i in missing)
    raise readers.DataError(f'{where}: {len(missing)} of {len(examples)} examples have no '
                            f'{field!r} in the store: {shown} (why: {"; ".join(why)})')
  return [records[ex['id']][field].strip() for ex in examples]


# ---- The seqio tasks: source -> attach_rationales -> format_with_i_tau -> tokenize -> append_eos ---------------

def _rows(ds: tf.data.Dataset) -> list[dict]:
  return [{k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in ex.items()}
          for ex in ds.as_numpy_iterator()]


def _dataset(rows: list[dict], features: Sequence[str], ints: Sequence[str] = ()) -> tf.data.Dataset:
  columns = {k: tf.constant([r[k] for r in rows], tf.string) for k in features}
  columns.update({k: tf.constant([r[k] for r in rows], tf.int64) for k in ints})
  return tf.data.Dataset.from_tensor_slices(columns)


def release_source(task: str, dataset: str, language: str, split: str, shuffle_files: bool = False,
                   seed: Optional[int] = None) -> tf.data.Dataset:
  """One language's examples of a split of the release (TaskData.data_dir): id, language, split and the canonical
  example as JSON."""
  del shuffle_files, seed  # One small in-memory split; batches.train_batches shuffles per epoch.
  td = task_data()
  data_dir = _required(td, 'data_dir', f'{task} reads the release')
  rows = [{'id': ex['id'], 'language': ex['language'], 'split': split, 'example': json.dumps(ex, ensure_ascii=False)}
          for ex in _raw_split(dataset, data_dir, td.source, split) if ex['language'] == language]
  return _dataset(rows, ('id', 'language', 'split', 'example'))


def attach_rationales(ds: tf.data.Dataset, *, task: str, dataset: str, recipe: str) -> tf.data.Dataset:
  """Adds 'rationale': the store's ŷ_β (TaskData.store_dir, store.select's choice) joined by example id; a missing
  one is an error naming the id. Recipes without ŷ_β, and distilled CoT outside train, get ''."""
  rows = _rows(ds)
  td = task_data()
  needed = [r for r in rows if recipe in RATIONALE_INPUT_RECIPES or (recipe == 'distilled_cot'
                                                                       and r['split'] == 'train')]
  found = {}
  if needed:
    store_dir = _required(td, 'store_dir', f'recipe {recipe!r} needs the rationale store')
    records = _rationale_records(dataset, _required(td, 'data_dir', 'the store is joined to the release'),
                                 td.source, store_dir, _store_state(store_dir))
    for split in dict.fromkeys(r['split'] for r in needed):
      of_split = [r for r in needed if r['split'] == split]
      texts = stored_rationales(of_split, records[split], f'{task} {split}', td.rationale_field)
      found.update({(r['split'], r['id']): t for r, t in zip(of_split, texts)})
  for r in rows:
    r['rationale'] = found.get((r['split'], r['id']), '')
  return _dataset(rows, ('id', 'language', 'split', 'example', 'rationale'))


def format_with_i_tau(ds: tf.data.Dataset, *, task: str, dataset: str, recipe: str) -> tf.data.Dataset:
  """inputs = the recipe's format ([I_τ ; x ; ŷ_β] down to plain x), passage cut from its end to TaskData's
  inputs_length (tokens_cut counts it); targets = the task's target. Distilled CoT adds a rationale row on train."""
  td = task_data()
  vocab = _required(td, 'vocabulary', 'truncation counts tokens')
  definition = _definition(dataset)
  distilled = recipe == 'distilled_cot'
  i_tau = load_i_tau(dataset) if recipe in INSTRUCTION_RECIPES else None
  out = []
  for row in _rows(ds):
    ex, rationale = json.loads(row['example']), row['rationale'] or None
    outputs = [('label', definition.target(ex))]
    if rationale is not None and distilled:
      outputs.append(('rationale', rationale))
    for kind, target in outputs:
      text, cut = render_inputs(dataset, recipe, ex, rationale, vocab, td.inputs_length,
                                f'{task} {row["split"]} example {ex["id"]}', i_tau=i_tau, kind=kind)
      out.append({'id': row['id'], 'language': row['language'], 'kind': kind, 'example': row['example'],
                  'inputs': text, 'targets': target, 'tokens_cut': cut})
  return _dataset(out, TEXT_FEATURES + ('inputs', 'targets'), ('tokens_cut',))


def _train_size(task: seqio.Task) -> float:
  """Mixing rate: examples-proportional (a mixture is its tasks' concatenation)."""
  dataset, language, recipe = _TASKS[task.name]
  td = task_data()
  data_dir = _required(td, 'data_dir', 'mixing rates count the train examples')
  n = sum(ex['language'] == language for ex in _raw_split(dataset, data_dir, td.source, 'train'))
  return float(n * (2 if recipe == 'distilled_cot' else 1))


_TASKS: dict[str, tuple[str, str, str]] = {}  # task name -> (dataset, language, recipe)
_MIXTURES: dict[str, tuple[str, tuple[str, ...]]] = {}  # mixture name -> (dataset, its tasks)


def register(definition) -> list[str]:
  """Registers {dataset}_{lang}_{recipe} for every language and recipe and {mixture}_{recipe} for the data set's
  mixtures (tasks/__init__.py does, once); returns the names."""
  dataset, names = definition.DATASET, []
  vocab = TaskVocabulary()
  features = {'inputs': seqio.Feature(vocab, add_eos=False), 'targets': seqio.Feature(vocab, add_eos=True)}
  for recipe in RECIPES:
    for lang in definition.LANGUAGES:
      name = f'{dataset}_{lang}_{recipe}'
      step = dict(task=name, dataset=dataset, recipe=recipe)
      if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(functools.partial(release_source, name, dataset, lang),
                                                  splits=readers.SPLITS),
            preprocessors=[functools.partial(attach_rationales, **step), functools.partial(format_with_i_tau, **step),
                           seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features=features, postprocess_fn=definition.postprocess,
            metric_fns=list(definition.METRIC_FNS) + list(definition.SCORE_METRIC_FNS))
      _TASKS[name] = (dataset, lang, recipe)
      names.append(name)
    for mixture, languages in definition.MIXTURES.items():
      name, members = f'{mixture}_{recipe}', tuple(f'{dataset}_{lang}_{recipe}' for lang in languages)
      if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, list(members), default_rate=_train_size)
      _MIXTURES[name] = (dataset, members)
      names.append(name)
  return names


def task_names(task_or_mixture: str) -> list[str]:
  """The tasks behind a task or mixture name, in order; a mixture takes TaskData.languages, else the languages
  present in the train split."""
  _tasks()  # registers them all, once
  if task_or_mixture in _TASKS:
    return [task_or_mixture]
  if task_or_mixture not in _MIXTURES:
    raise ValueError(f'{task_or_mixture!r} is no task or mixture of `import tasks`')
  dataset, members = _MIXTURES[task_or_mixture]
  td = task_data()
  if td.languages is None:
    present = {ex['language'] for ex in _raw_split(dataset, _required(td, 'data_dir', 'the release'), td.source,
                                                   'train')}
  else:
    unknown = [lang for lang in td.languages if lang not in _definition(dataset).LANGUAGES]
    if unknown:
      raise ValueError(f'TaskData.languages: unknown language(s) {unknown} for {dataset}')
    present = set(td.languages)
  return [name for name in members if _TASKS[name][1] in present]


def tokenized(task_or_mixture: str, split: str) -> list[dict]:
  """Token ids (and text features) of every example through the seqio tasks (mixtures: concatenated)."""
  if split not in readers.SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {readers.SPLITS}')
  td = task_data()
  key = (task_or_mixture, split, td.key(), _store_state(td.store_dir))
  if key not in _TOKENIZED:
    out = []
    for name in task_names(task_or_mixture):
      ds = seqio.get_mixture_or_task(name).get_dataset(
          sequence_length=None, split=split, shuffle=False, num_epochs=1)
      rows = [{k: ex[k].decode('utf-8') for k in TEXT_FEATURES + ('inputs_pretokenized', 'targets_pretokenized')}
              | {'task': name, 'inputs': ex['inputs'].astype(np.int32), 'targets': ex['targets'].astype(np.int32),
                 'tokens_cut': int(ex['tokens_cut'])} for ex in ds.as_numpy_iterator()]
      if not rows:
        raise readers.DataError(f'{td.data_dir}: {name} {split}: no {_TASKS[name][1]} examples')
      cut = [r['tokens_cut'] for r in rows if r['tokens_cut']]
      logging.info('%s %s: %d of %d inputs truncated (passage cut from its end), %.1f tokens cut on average',
                   name, split, len(cut), len(rows), float(np.mean(cut)) if cut else 0.0)
      out.extend(rows)
    _TOKENIZED[key] = (td, out)  # td keeps the vocabulary its id names alive
  return _TOKENIZED[key][1]


def truncation_stats(task_or_mixture: str, split: str) -> dict:
  """How many inputs were truncated and by how many tokens on average."""
  rows = tokenized(task_or_mixture, split)
  cut = [r['tokens_cut'] for r in rows if r['tokens_cut']]
  return {'examples': len(rows), 'truncated': len(cut),
          'mean_tokens_cut': float(np.mean(cut)) if cut else 0.0}


def fingerprint(task_or_mixture: str, split: str) -> str:
  """sha256 (first 16 hex) of the ordered examples' ids and token ids."""
  h = hashlib.sha256()
  for ex in tokenized(task_or_mixture, split):
    h.update(json.dumps([ex['id'], ex['inputs'].tolist(), ex['targets'].tolist()]).encode())
  return h.hexdigest()[:16]


def eval_examples(task_or_mixture: str, split: str) -> list[dict[str, Any]]:
  """Examples for decoding-based evaluation (label outputs only: no rationale target)."""
  vocab = task_data().vocabulary
  return [{'task': r['task'], 'id': r['id'], 'language': r['language'], 'inputs_pretokenized': r['inputs_pretokenized'],
           'targets_pretokenized': r['targets_pretokenized'], 'inputs': vocab.encode(r['inputs_pretokenized']),
           'example': json.loads(r['example'])} for r in tokenized(task_or_mixture, split) if r['kind'] == 'label']
