"""The seqio tasks of every data set, language and data recipe, built for a TaskData: the release as source, the
named preprocessors attach_rationales and format_with_i_tau (formatting.py), then tokenize / append_eos.

A TaskData says where the tasks read (release, store, vocabulary, inputs length); every function here takes it
explicitly. `register(task_data)` adds the tasks and mixtures to seqio's registries for T5X-style use
(`seqio.get_mixture_or_task(...)`). The training batches over these examples are training/batches.py's.
"""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from fiat_jax.beta import store
from fiat_jax import config_check
from fiat_jax.data import formatting
from fiat_jax.data import readers
import tasks

SOURCES = ('files', 'tfds')
# Text features every task yields next to inputs / targets.
TEXT_FEATURES = ('id', 'language', 'kind', 'example')


@gin.configurable(module='fiat_jax.data.pipeline')
@dataclasses.dataclass(frozen=True)
@config_check.typed
class TaskData:
  """Where the tasks read when a dataset is built (bind it in gin, or build one per run: experiment.task_data).

  Attributes:
    data_dir: the extracted release (source='files') or a TFDS data dir (source='tfds').
    store_dir: the rationale store; needed by the data recipes formatting.RATIONALE_RECIPES.
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
    if self.rationale_field not in formatting.RATIONALE_FIELDS:
      raise ValueError(f'TaskData.rationale_field={self.rationale_field!r}: expected one of '
                       f'{formatting.RATIONALE_FIELDS}')
    if self.languages is not None:
      object.__setattr__(self, 'languages', tuple(self.languages))

  def key(self) -> tuple:
    """What the caches are keyed on (vocabularies compare by identity: some are not hashable)."""
    return (self.data_dir, self.store_dir, id(self.vocabulary), self.inputs_length, self.languages, self.source,
            self.rationale_field)

  def required(self, field: str, why: str):
    """The field's value; a clear error naming it when it is not set."""
    value = getattr(self, field)
    if value is None:
      raise ValueError(f'TaskData.{field} is not set ({why}): bind --gin.TaskData.{field}=... or pass it to '
                       f'TaskData(...)')
    return value


def _index() -> tuple[dict, dict]:
  """Every task name -> (dataset, language, data recipe) and mixture name -> (dataset, its tasks)."""
  task_index, mixture_index = {}, {}
  for definition in tasks.DEFINITIONS.values():
    for recipe in formatting.RECIPES:
      for lang in definition.LANGUAGES:
        task_index[f'{definition.DATASET}_{lang}_{recipe}'] = (definition.DATASET, lang, recipe)
      for mixture, languages in definition.MIXTURES.items():
        mixture_index[f'{mixture}_{recipe}'] = (definition.DATASET,
                                                tuple(f'{definition.DATASET}_{lang}_{recipe}' for lang in languages))
  return task_index, mixture_index


_TASKS, _MIXTURES = _index()
NAMES = tuple(_TASKS) + tuple(_MIXTURES)  # every task and mixture name
_TOKENIZED: dict[tuple, tuple[TaskData, list[dict]]] = {}


@functools.lru_cache(maxsize=None)
def _raw_split(dataset: str, data_dir: str, source: str, split: str) -> list[dict]:
  if source == 'tfds':  # tensorflow_datasets takes seconds to load: only this source needs it
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
  if field not in formatting.RATIONALE_FIELDS:
    raise ValueError(f'rationale field {field!r}: expected one of {formatting.RATIONALE_FIELDS}')
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


def release_source(td: TaskData, task: str, dataset: str, language: str, split: str, shuffle_files: bool = False,
                   seed: Optional[int] = None) -> tf.data.Dataset:
  """One language's examples of a split of the release (td.data_dir): id, language, split and the canonical example
  as JSON."""
  del shuffle_files, seed  # One small in-memory split; batches.train_batches shuffles per epoch.
  data_dir = td.required('data_dir', f'{task} reads the release')
  rows = [{'id': ex['id'], 'language': ex['language'], 'split': split, 'example': json.dumps(ex, ensure_ascii=False)}
          for ex in _raw_split(dataset, data_dir, td.source, split) if ex['language'] == language]
  return _dataset(rows, ('id', 'language', 'split', 'example'))


def attach_rationales(ds: tf.data.Dataset, *, td: TaskData, task: str, dataset: str, recipe: str) -> tf.data.Dataset:
  """Adds 'rationale': the store's ŷ_β (td.store_dir, store.select's choice) joined by example id; a missing one is
  an error naming the id. Recipes without ŷ_β, and distilled CoT outside train, get ''."""
  rows = _rows(ds)
  needed = [r for r in rows if recipe in formatting.RATIONALE_INPUT_RECIPES
            or (recipe == 'distilled_cot' and r['split'] == 'train')]
  found = {}
  if needed:
    store_dir = td.required('store_dir', f'data recipe {recipe!r} needs the rationale store')
    records = _rationale_records(dataset, td.required('data_dir', 'the store is joined to the release'),
                                 td.source, store_dir, _store_state(store_dir))
    for split in dict.fromkeys(r['split'] for r in needed):
      of_split = [r for r in needed if r['split'] == split]
      texts = stored_rationales(of_split, records[split], f'{task} {split}', td.rationale_field)
      found.update({(r['split'], r['id']): t for r, t in zip(of_split, texts)})
  for r in rows:
    r['rationale'] = found.get((r['split'], r['id']), '')
  return _dataset(rows, ('id', 'language', 'split', 'example', 'rationale'))


def format_with_i_tau(ds: tf.data.Dataset, *, td: TaskData, task: str, dataset: str, recipe: str) -> tf.data.Dataset:
  """inputs = the data recipe's format ([I_τ ; x ; ŷ_β] down to plain x), passage cut from its end to
  td.inputs_length (tokens_cut counts it); targets = the task's target. Distilled CoT adds a rationale row on train."""
  vocab = td.required('vocabulary', 'truncation counts tokens')
  definition = tasks.definition(dataset)
  distilled = recipe == 'distilled_cot'
  i_tau = formatting.load_i_tau(dataset) if recipe in formatting.INSTRUCTION_RECIPES else None
  out = []
  for row in _rows(ds):
    ex, rationale = json.loads(row['example']), row['rationale'] or None
    outputs = [('label', definition.target(ex))]
    if rationale is not None and distilled:
      outputs.append(('rationale', rationale))
    for kind, target in outputs:
      text, cut = formatting.render_inputs(dataset, recipe, ex, rationale, vocab, td.inputs_length,
                                           f'{task} {row["split"]} example {ex["id"]}', i_tau=i_tau, kind=kind)
      out.append({'id': row['id'], 'language': row['language'], 'kind': kind, 'example': row['example'],
                  'inputs': text, 'targets': target, 'tokens_cut': cut})
  return _dataset(out, TEXT_FEATURES + ('inputs', 'targets'), ('tokens_cut',))


def task(td: TaskData, name: str) -> seqio.Task:
  """The seqio task `name` ({dataset}_{lang}_{data recipe}) reading td: source -> attach_rationales ->
  format_with_i_tau -> tokenize -> append_eos."""
  if name not in _TASKS:
    raise ValueError(f'{name!r} is no task of fiat_jax.data.pipeline.NAMES')
  dataset, lang, recipe = _TASKS[name]
  definition = tasks.definition(dataset)
  vocab = td.required('vocabulary', 'the tasks tokenize with it')
  step = dict(td=td, task=name, dataset=dataset, recipe=recipe)
  return seqio.Task(
      name, source=seqio.FunctionDataSource(functools.partial(release_source, td, name, dataset, lang),
                                            splits=readers.SPLITS),
      preprocessors=[functools.partial(attach_rationales, **step), functools.partial(format_with_i_tau, **step),
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={'inputs': seqio.Feature(vocab, add_eos=False), 'targets': seqio.Feature(vocab, add_eos=True)},
      postprocess_fn=definition.postprocess,
      metric_fns=list(definition.METRIC_FNS) + list(definition.SCORE_METRIC_FNS))


def _train_size(td: TaskData, t: seqio.Task) -> float:
  """Mixing rate: examples-proportional (a mixture is its tasks' concatenation)."""
  dataset, language, recipe = _TASKS[t.name]
  data_dir = td.required('data_dir', 'mixing rates count the train examples')
  n = sum(ex['language'] == language for ex in _raw_split(dataset, data_dir, td.source, 'train'))
  return float(n * (2 if recipe == 'distilled_cot' else 1))


def register(td: TaskData) -> list[str]:
  """Adds every task and mixture, reading td, to seqio's registries (replacing earlier ones of the same names), as
  T5X users expect of `seqio.get_mixture_or_task(...)`; returns the names."""
  for name in NAMES:
    for registry in (seqio.MixtureRegistry, seqio.TaskRegistry):
      if name in registry.names():
        registry.remove(name)
  for name in _TASKS:
    seqio.TaskRegistry.add_provider(name, task(td, name))
  for name, (_, members) in _MIXTURES.items():
    seqio.MixtureRegistry.add(name, list(members), default_rate=functools.partial(_train_size, td))
  return list(NAMES)


def task_names(td: TaskData, task_or_mixture: str) -> list[str]:
  """The tasks behind a task or mixture name, in order; a mixture takes td.languages, else the languages present in
  the train split."""
  if task_or_mixture in _TASKS:
    return [task_or_mixture]
  if task_or_mixture not in _MIXTURES:
    raise ValueError(f'{task_or_mixture!r} is no task or mixture of fiat_jax.data.pipeline.NAMES')
  dataset, members = _MIXTURES[task_or_mixture]
  if td.languages is None:
    present = {ex['language'] for ex in _raw_split(dataset, td.required('data_dir', 'the release'), td.source,
                                                   'train')}
  else:
    unknown = [lang for lang in td.languages if lang not in tasks.definition(dataset).LANGUAGES]
    if unknown:
      raise ValueError(f'TaskData.languages: unknown language(s) {unknown} for {dataset}')
    present = set(td.languages)
  return [name for name in members if _TASKS[name][1] in present]


def tokenized(td: TaskData, task_or_mixture: str, split: str) -> list[dict]:
  """Token ids (and text features) of every example through the seqio tasks (mixtures: concatenated)."""
  if split not in readers.SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {readers.SPLITS}')
  key = (task_or_mixture, split, td.key(), _store_state(td.store_dir))
  if key not in _TOKENIZED:
    out = []
    for name in task_names(td, task_or_mixture):
      ds = task(td, name).get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
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


def truncation_stats(td: TaskData, task_or_mixture: str, split: str) -> dict:
  """How many inputs were truncated and by how many tokens on average."""
  rows = tokenized(td, task_or_mixture, split)
  cut = [r['tokens_cut'] for r in rows if r['tokens_cut']]
  return {'examples': len(rows), 'truncated': len(cut),
          'mean_tokens_cut': float(np.mean(cut)) if cut else 0.0}


def fingerprint(td: TaskData, task_or_mixture: str, split: str) -> str:
  """sha256 (first 16 hex) of the ordered examples' ids and token ids."""
  h = hashlib.sha256()
  for ex in tokenized(td, task_or_mixture, split):
    h.update(json.dumps([ex['id'], ex['inputs'].tolist(), ex['targets'].tolist()]).encode())
  return h.hexdigest()[:16]


def eval_examples(td: TaskData, task_or_mixture: str, split: str) -> list[dict[str, Any]]:
  """Examples for decoding-based evaluation (label outputs only: no rationale target)."""
  vocab = td.required('vocabulary', 'evaluation tokenizes the inputs')
  return [{'task': r['task'], 'id': r['id'], 'language': r['language'], 'inputs_pretokenized': r['inputs_pretokenized'],
           'targets_pretokenized': r['targets_pretokenized'], 'inputs': vocab.encode(r['inputs_pretokenized']),
           'example': json.loads(r['example'])} for r in tokenized(td, task_or_mixture, split) if r['kind'] == 'label']
