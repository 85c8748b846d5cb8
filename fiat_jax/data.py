"""seqio helpers: I_tau formatting, rationale attachment, passage-first truncation, per-host input."""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from fiat_jax import readers
from fiat_jax.beta import store
import tasks

# Which ingredients each recipe's inputs carry (FIDELITY.md; Table 3 rows are combinations).
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
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(tasks.__file__)), 'prompts')
SOURCES = ('files', 'tfds')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Everything that defines one registered task's examples (the vocabulary is kept aside)."""
  name: str
  dataset: str
  language: str
  recipe: str
  data_dir: str
  rationale_dir: Optional[str]
  inputs_length: Optional[int]
  source: str
  rationale_field: str = 'rationale'


_SPECS: dict[str, TaskSpec] = {}
_VOCABS: dict[str, seqio.Vocabulary] = {}
_MIXTURES: dict[str, tuple[str, ...]] = {}
_ROWS: dict[tuple[str, str], tuple[list[dict], dict]] = {}
_TOKENIZED: dict[tuple[str, str], list[dict]] = {}


def load_i_tau(dataset: str) -> str:
  """The I_tau instruction text of a data set, from tasks/prompts/."""
  path = os.path.join(PROMPTS_DIR, tasks.definition(dataset).I_TAU_FILE)
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
  definition = tasks.definition(dataset)
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


@functools.lru_cache(maxsize=None)
def _raw_split(dataset: str, data_dir: str, source: str, split: str) -> list[dict]:
  if source == 'tfds':
    from fiat_jax import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.read_split_tfds(dataset, data_dir, split)
  return readers.read_split(dataset, data_dir, split)


@functools.lru_cache(maxsize=None)
def _rationale_records(dataset: str, data_dir: str, source: str,
                       rationale_dir: str) -> dict[str, dict[str, dict]]:
  """Store records per split and example id, chosen by store.select over every split at once: one β, I_β
  version and sampling per language (I_β differs per language), the input as β saw it. An example without a
  record maps to {'missing': why}."""
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


def attach_rationales(examples: Sequence[dict], records: Mapping[str, dict], where: str,
                      field: str = 'rationale') -> list[str]:
  """The stored ŷ_β (record[field]: 'rationale', or β's whole output 'raw') of every example, joined by id;
  any missing one is an error."""
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


def _task_rows(name: str, split: str) -> tuple[list[dict], dict]:
  """Formatted (and truncated) text examples of one task and split, with truncation counts."""
  if split not in readers.SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {readers.SPLITS}')
  if (name, split) in _ROWS:
    return _ROWS[(name, split)]
  spec, vocab = _SPECS[name], _VOCABS[name]
  definition = tasks.definition(spec.dataset)
  where = f'{name} {split}'
  examples = [ex for ex in _raw_split(spec.dataset, spec.data_dir, spec.source, split)
              if ex['language'] == spec.language]
  if not examples:
    raise readers.DataError(f'{spec.data_dir}: {where}: no {spec.language} examples')
  distilled = spec.recipe == 'distilled_cot'
  rationales = [None] * len(examples)
  if spec.recipe in RATIONALE_INPUT_RECIPES or (distilled and split == 'train'):
    records = _rationale_records(spec.dataset, spec.data_dir, spec.source, spec.rationale_dir)
    rationales = attach_rationales(examples, records[split], where, spec.rationale_field)
  i_tau = load_i_tau(spec.dataset) if spec.recipe in INSTRUCTION_RECIPES else None
  rows, cuts = [], []
  for ex, rationale in zip(examples, rationales):
    outputs = [('label', LABEL_PREFIX if distilled else '', definition.target(ex))]
    if rationale is not None and distilled:
      outputs.append(('rationale', RATIONALE_PREFIX, rationale))
    for kind, prefix, target in outputs:
      render = lambda p, prefix=prefix, ex=ex, r=rationale: prefix + format_inputs(
          spec.dataset, ex, 'no_cot' if distilled else spec.recipe, i_tau, r, passage=p)
      text, cut = truncate_passage(render, ex[definition.PASSAGE_FIELD], vocab, spec.inputs_length,
                                   f'{where} example {ex["id"]}')
      rows.append({'id': ex['id'], 'language': ex['language'], 'kind': kind, 'inputs': text,
                   'targets': target, 'example': ex})
      cuts.append(cut)
  cut = [c for c in cuts if c]
  stats = {'examples': len(rows), 'truncated': len(cut),
           'mean_tokens_cut': float(np.mean(cut)) if cut else 0.0}
  logging.info('%s: %d of %d inputs truncated (passage cut from its end), %.1f tokens cut on '
               'average', where, stats['truncated'], stats['examples'], stats['mean_tokens_cut'])
  _ROWS[(name, split)] = (rows, stats)
  return rows, stats


def _dataset_fn(name: str, split: str, shuffle_files: bool, seed: Optional[int] = None):
  del shuffle_files, seed  # One in-memory source; train_batches shuffles per epoch.
  rows, _ = _task_rows(name, split)
  return tf.data.Dataset.from_tensor_slices(
      {k: [r[k] for r in rows] for k in ('id', 'language', 'kind', 'inputs', 'targets')})


def _train_size(task: seqio.Task) -> float:
  """Mixing rate: examples-proportional (a mixture is its tasks' concatenation)."""
  return float(len(_task_rows(task.name, 'train')[0]))


def _clear_caches() -> None:
  _ROWS.clear()
  _TOKENIZED.clear()
  _raw_split.cache_clear()
  _rationale_records.cache_clear()


def _add_task(spec: TaskSpec, vocabulary: seqio.Vocabulary) -> bool:
  """Registers one task; False when it was already registered with the same arguments."""
  if spec.name in _SPECS:
    if _SPECS[spec.name] == spec and _VOCABS[spec.name] == vocabulary:
      return False
    logging.warning('re-registering task %s with different arguments', spec.name)
    _clear_caches()
  if spec.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(spec.name)
  definition = tasks.definition(spec.dataset)
  _SPECS[spec.name], _VOCABS[spec.name] = spec, vocabulary
  seqio.TaskRegistry.add(
      spec.name,
      source=seqio.FunctionDataSource(functools.partial(_dataset_fn, spec.name),
                                      splits=readers.SPLITS),
      output_features={'inputs': seqio.Feature(vocabulary, add_eos=False),
                       'targets': seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      postprocess_fn=definition.postprocess,
      metric_fns=list(definition.METRIC_FNS) + list(definition.SCORE_METRIC_FNS))
  return True


def _add_mixture(name: str, members: Sequence[str], refresh: bool) -> None:
  """Registers a mixture; refresh re-creates it (seqio mixtures hold their Task objects)."""
  if not refresh and _MIXTURES.get(name) == tuple(members) and name in seqio.MixtureRegistry.names():
    return
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(members), default_rate=_train_size)
  _MIXTURES[name] = tuple(members)


@gin.configurable(module='fiat_jax.data')
def register_tasks(dataset: str, data_dir: str, vocabulary: seqio.Vocabulary,
                   rationale_dir: Optional[str] = None, *, recipes: Sequence[str] = RECIPES,
                   languages: Optional[Sequence[str]] = None, inputs_length: Optional[int] = None,
                   source: str = 'files', rationale_field: str = 'rationale') -> list[str]:
  """Registers {dataset}_{lang}_{recipe} tasks and the data set's mixtures; returns the names.

  Args:
    data_dir: the extracted release (source='files') or a TFDS data dir (source='tfds').
    rationale_dir: the rationale store; needed by fiat, no_instruction and distilled_cot.
    languages: default: the languages present in the train split.
    inputs_length: input token budget; longer inputs lose the end of their passage.
    rationale_field: the store record field that becomes ŷ_β: 'rationale' (the reasoning) or 'raw' (β's whole
      output, reasoning and final answer).
  Idempotent: the same arguments again change nothing.
  """
  definition = tasks.definition(dataset)
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; expected one of {SOURCES}')
  if rationale_field not in RATIONALE_FIELDS:
    raise ValueError(f'rationale_field={rationale_field!r}: expected one of {RATIONALE_FIELDS}')
  for recipe in recipes:
    if recipe not in RECIPES:
      raise ValueError(f'unknown recipe {recipe!r}; expected one of {RECIPES}')
    if rationale_dir is None and recipe in RATIONALE_RECIPES:
      raise ValueError(f'recipe {recipe!r} needs rationale_dir (the rationale store)')
  if languages is None:
    present = {ex['language'] for ex in _raw_split(dataset, data_dir, source, 'train')}
    languages = [lang for lang in definition.LANGUAGES if lang in present]
  for lang in languages:
    if lang not in definition.LANGUAGES:
      raise ValueError(f'unknown language {lang!r} for {dataset}')
  names, changed = [], set()
  for recipe in recipes:
    for lang in languages:
      name = f'{dataset}_{lang}_{recipe}'
      if _add_task(TaskSpec(name, dataset, lang, recipe, data_dir,
                            rationale_dir if recipe in RATIONALE_RECIPES else None,
                            inputs_length, source, rationale_field), vocabulary):
        changed.add(name)
      names.append(name)
    for mixture, mixture_languages in definition.MIXTURES.items():
      members = [f'{dataset}_{lang}_{recipe}' for lang in mixture_languages if lang in languages]
      if members:
        _add_mixture(f'{mixture}_{recipe}', members, refresh=bool(changed & set(members)))
        names.append(f'{mixture}_{recipe}')
  return names


def task_names(task_or_mixture: str) -> list[str]:
  """The registered tasks behind a task or mixture name, in order."""
  if task_or_mixture in _MIXTURES:
    return list(_MIXTURES[task_or_mixture])
  if task_or_mixture in _SPECS:
    return [task_or_mixture]
  raise ValueError(f'{task_or_mixture!r} is not registered by fiat_jax.data.register_tasks')


def truncation_stats(task_or_mixture: str, split: str) -> dict:
  """How many inputs were truncated and by how many tokens on average."""
  stats = [_task_rows(name, split)[1] for name in task_names(task_or_mixture)]
  truncated = sum(s['truncated'] for s in stats)
  cut = sum(s['truncated'] * s['mean_tokens_cut'] for s in stats)
  return {'examples': sum(s['examples'] for s in stats), 'truncated': truncated,
          'mean_tokens_cut': cut / truncated if truncated else 0.0}


def _tokenized(task_or_mixture: str, split: str) -> list[dict]:
  """Token ids of every example through the seqio tasks (mixtures: concatenated)."""
  if (task_or_mixture, split) not in _TOKENIZED:
    out = []
    for name in task_names(task_or_mixture):
      ds = seqio.get_mixture_or_task(name).get_dataset(
          sequence_length=None, split=split, shuffle=False, num_epochs=1)
      out.extend({'id': ex['id'].decode('utf-8'), 'kind': ex['kind'].decode('utf-8'),
                  'inputs': ex['inputs'].astype(np.int32), 'targets': ex['targets'].astype(np.int32)}
                 for ex in ds.as_numpy_iterator())
    _TOKENIZED[(task_or_mixture, split)] = out
  return _TOKENIZED[(task_or_mixture, split)]


def rationale_target_truncation(task_or_mixture: str, split: str, targets_length: int) -> dict:
  """How many rationale targets (distilled CoT) train_batches cuts to targets_length, by how many tokens."""
  return _cut_rationale_targets(_tokenized(task_or_mixture, split), targets_length)[1]


def _cut_rationale_targets(examples: Sequence[Mapping[str, Any]], targets_length: int
                           ) -> tuple[list[Mapping[str, Any]], dict]:
  """Rationale targets longer than targets_length keep their first targets_length tokens (as seqio's trim
  does: no EOS, the rationale goes on); label targets are never cut. (examples, counts)."""
  out, cuts = [], []
  for ex in examples:
    over = len(ex['targets']) - targets_length
    if ex.get('kind') == 'rationale' and over > 0:
      ex = dict(ex, targets=ex['targets'][:targets_length])
      cuts.append(over)
    out.append(ex)
  rationales = sum(ex.get('kind') == 'rationale' for ex in examples)
  return out, {'rationale_targets': rationales, 'truncated': len(cuts),
               'mean_tokens_cut': float(np.mean(cuts)) if cuts else 0.0}


def fingerprint(task_or_mixture: str, split: str) -> str:
  """sha256 (first 16 hex) of the ordered examples' ids and token ids."""
  h = hashlib.sha256()
  for ex in _tokenized(task_or_mixture, split):
    h.update(json.dumps([ex['id'], ex['inputs'].tolist(), ex['targets'].tolist()]).encode())
  return h.hexdigest()[:16]


def _local_order(n: int, seed: int, shard_index: int, num_shards: int, start: int) -> Iterator[int]:
  """Example indices of this host's positions start, start+1, ... in the shuffled epoch stream.

  The global stream is epoch after epoch, each a permutation drawn from (seed, epoch);
  host h takes the stream positions h, h + num_shards, h + 2 num_shards, ...
  """
  epoch, perm, k = -1, None, start
  while True:
    e, i = divmod(shard_index + k * num_shards, n)
    if e != epoch:
      epoch, perm = e, np.random.default_rng([seed, e]).permutation(n)
    yield int(perm[i])
    k += 1


def train_batches(task_or_mixture: str, split: str, feature_lengths: Mapping[str, int],
                  batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1,
                  start_step: int = 0, pack: bool = False, bos_id: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite per-host batches of a registered task's split (feature_batches over its tokenized examples)."""
  return feature_batches(_tokenized(task_or_mixture, split), feature_lengths, batch_size, seed=seed,
                         shard_index=shard_index, num_shards=num_shards, start_step=start_step, pack=pack,
                         bos_id=bos_id, where=f'{task_or_mixture} {split}')


def feature_batches(examples: Sequence[Mapping[str, Any]], feature_lengths: Mapping[str, int], batch_size: int,
                    *, seed: int, shard_index: int = 0, num_shards: int = 1, start_step: int = 0,
                    pack: bool = False, bos_id: int = 0, where: str = 'examples'
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite per-host batches of seqio.DecoderFeatureConverter features (prefix LM) from token examples
  ({'id'?, 'kind'?, 'inputs', 'targets'} id lists).

  batch_size is this host's. Reshuffled every epoch from seed; deterministic; start_step
  skips exactly that many batches (resume). When some example is of kind 'rationale' (distilled CoT), rationale
  targets are cut to the targets length (counted and logged) and every batch carries decoder_task_ids [B, L]
  (data.TASK_IDS of each row's kind), which the trainer's loss averages per task.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index={shard_index} not in [0, num_shards={num_shards})')
  if batch_size < 1 or start_step < 0:
    raise ValueError(f'need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}')
  kinds = [ex.get('kind', 'label') for ex in examples]
  unknown = sorted(set(kinds) - set(TASK_IDS))
  if unknown:
    raise ValueError(f'{where}: example kinds {unknown} are not among {sorted(TASK_IDS)}')
  multitask = 'rationale' in kinds
  if multitask:
    if pack:
      raise ValueError(f'{where}: label and rationale targets (distilled CoT) need unpacked rows (pack=False): '
                       f'the per-task loss reads one task per row')
    examples, cut = _cut_rationale_targets(examples, feature_lengths['targets'])
    logging.info('%s: %d of %d rationale targets cut to %d tokens, %.1f tokens cut on average', where,
                 cut['truncated'], cut['rationale_targets'], feature_lengths['targets'], cut['mean_tokens_cut'])
  too_long = [i for i, ex in enumerate(examples) if len(ex['inputs']) > feature_lengths['inputs']
              or len(ex['targets']) > feature_lengths['targets']]
  if too_long:
    ex = examples[too_long[0]]
    raise readers.DataError(
        f'{where}: {len(too_long)} examples longer than feature_lengths '
        f'{dict(feature_lengths)} (first: {ex.get("id", too_long[0])}, inputs {len(ex["inputs"])}, targets '
        f'{len(ex["targets"])} tokens); register with inputs_length to cut passages, or raise them')
  start = 0 if pack else start_step * batch_size

  def generate():
    for i in _local_order(len(examples), seed, shard_index, num_shards, start):
      yield {'inputs': examples[i]['inputs'], 'targets': examples[i]['targets']}

  spec = tf.TensorSpec([None], tf.int32)
  ds = tf.data.Dataset.from_generator(generate, output_signature={'inputs': spec, 'targets': spec})
  ds = seqio.DecoderFeatureConverter(pack=pack, bos_id=bos_id)(ds, dict(feature_lengths))
  ds = ds.batch(batch_size, drop_remainder=True)
  if pack:  # Packed rows hold a varying number of examples: skip by counting.
    ds = ds.skip(start_step)
  if not multitask:
    return ds.as_numpy_iterator()
  task_ids = np.array([TASK_IDS[k] for k in kinds], np.int32)
  order = _local_order(len(examples), seed, shard_index, num_shards, start)

  def with_task_ids(batches):  # unpacked rows are the examples in stream order
    for batch in batches:
      rows = task_ids[[next(order) for _ in range(batch_size)]]
      yield dict(batch, decoder_task_ids=np.broadcast_to(
          rows[:, None], batch['decoder_target_tokens'].shape).copy())
  return with_task_ids(ds.as_numpy_iterator())


def eval_examples(task_or_mixture: str, split: str) -> list[dict[str, Any]]:
  """Examples for decoding-based evaluation (label outputs only: no rationale target)."""
  out = []
  for name in task_names(task_or_mixture):
    vocab = _VOCABS[name]
    for row in _task_rows(name, split)[0]:
      if row['kind'] != 'label':
        continue
      out.append({'task': name, 'id': row['id'], 'language': row['language'],
                  'inputs_pretokenized': row['inputs'], 'targets_pretokenized': row['targets'],
                  'inputs': vocab.encode(row['inputs']), 'example': row['example']})
  return out
