"""Strict readers for the released XOR-AttriQA and XTREME-UP cross-lingual QA files."""
import collections
import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

from absl import logging


def _gfile():
  """tf.io.gfile (local, gs:// and other file systems), imported on first use: TensorFlow takes seconds to load."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def canonical_example(features: dict[str, Any]) -> dict:
  """The canonical example a task's row carries (its 'example' feature, JSON): what the metrics score against."""
  value = features['example']
  return json.loads(value.decode('utf-8') if isinstance(value, bytes) else value)


def exists(path: str) -> bool:
  """Whether a local path or a file-system URL (gs://...) exists; local paths without importing TensorFlow."""
  return os.path.exists(path) if '://' not in path else _gfile().exists(path)


def isdir(path: str) -> bool:
  """Whether a local path or a file-system URL is a directory; local paths without importing TensorFlow."""
  return os.path.isdir(path) if '://' not in path else _gfile().isdir(path)


DATASETS = ('xor_attriqa', 'xtreme_up_xqa')
SPLITS = ('train', 'validation', 'test')

# Where users download the releases (the TFDS builders fetch these too).
XOR_ATTRIQA_URL = 'https://storage.googleapis.com/gresearch/xor_attriqa/xor_attriqa.zip'
XTREME_UP_URL = 'https://storage.googleapis.com/xtreme-up/xtreme-up-v1.1.jsonl.tgz'

XOR_ATTRIQA_LANGUAGES = ('bn', 'fi', 'ja', 'ru', 'te')
XTREME_UP_INDIC = ('as', 'bho', 'brx', 'gbm', 'gom', 'gu', 'hi', 'hne', 'kn', 'mai',
                   'ml', 'mni', 'mr', 'mwr', 'or', 'pa', 'ps', 'sa', 'ta', 'ur')
XTREME_UP_LANGUAGES = XTREME_UP_INDIC + ('ar', 'bn', 'fi', 'ja', 'ko', 'ru', 'te')
# Left out of XTREME-UP's headline mean (the benchmark's high-resource languages).
XTREME_UP_HIGH_RESOURCE = ('hi', 'ar', 'fi', 'ja', 'ko', 'ru')
LANGUAGES = {'xor_attriqa': XOR_ATTRIQA_LANGUAGES, 'xtreme_up_xqa': XTREME_UP_LANGUAGES}

# XOR-AttriQA `in-language/` files: one train and one validation file holding
# all languages, and one test file per language.
XOR_ATTRIQA_SETTING = 'in-language'
XOR_ATTRIQA_FILES = {'train': ('train.jsonl',), 'validation': ('val.jsonl',),
                     'test': tuple(f'{lang}.jsonl' for lang in XOR_ATTRIQA_LANGUAGES)}
XOR_ATTRIQA_STRING_FIELDS = ('query', 'query_language', 'prediction', 'passage_in_language',
                             'passage_en', 'passage_retrieved_language')
XTREME_UP_TASK_DIR = 'qa_cross_lang'
XTREME_UP_ROOT = 'xtreme_up_v1.1'  # The folder the release tarball extracts to.
XTREME_UP_STRING_FIELDS = ('question', 'title', 'context', 'target')
NO_ANSWER = 'No Answer'


class DataError(ValueError):
  """Bad input data; the message names the file, the line and the field."""


class _DuplicateKey(ValueError):
  pass


def _object(pairs: list) -> dict:
  """A JSON object whose keys are all different (json.loads would silently keep the last of a repeated key)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(key)
    out[key] = value
  return out


def jsonl_objects(path: str) -> Iterator[tuple[int, str, dict]]:
  """(line number, line, object) for each non-blank line of a UTF-8 JSON-lines file (local or any tf.io.gfile
  path); a line that is not UTF-8, not a JSON object or repeats a key is a DataError naming the file and line."""
  if not _gfile().exists(path):
    raise DataError(f'{path}: file not found')
  with _gfile().GFile(path, 'rb') as f:
    for line_no, data in enumerate(f, start=1):
      try:
        line = data.decode('utf-8-sig' if line_no == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        _fail(path, line_no, None, f'not UTF-8 (byte {data[e.start]:#04x} is byte {e.start + 1} of the line); '
              f'the files must be UTF-8 encoded')
      line = line.rstrip('\r\n')
      if not line.strip():
        continue
      try:
        obj = json.loads(line, object_pairs_hook=_object)
      except _DuplicateKey as e:
        _fail(path, line_no, str(e), 'appears twice in one object (which one is meant is ambiguous)')
      except json.JSONDecodeError as e:
        _fail(path, line_no, None, f'malformed JSON ({e.msg} at column {e.colno})')
      if not isinstance(obj, dict):
        _fail(path, line_no, None, f'expected a JSON object, got {type(obj).__name__}')
      yield line_no, line, obj


def _fail(path: str, line: int, field: Optional[str], msg: str):
  where = f'{path}:{line}' if line else path
  raise DataError(f'{where}: field {field!r}: {msg}' if field else f'{where}: {msg}')


def example_id(raw_line: str) -> str:
  """Content hash id of one raw JSON line (first 16 hex of its sha256)."""
  return hashlib.sha256(raw_line.encode('utf-8')).hexdigest()[:16]


def parse_id(raw: dict, raw_line: str, path: str, line: int) -> str:
  """The line's 'id' (a non-empty string, or an integer as its digits), else its content hash."""
  if 'id' not in raw:
    return example_id(raw_line)
  value = raw['id']
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str) or not value.strip():
    _fail(path, line, 'id', f'expected a non-empty string or an integer, got {json.dumps(value)}')
  return value


def parse_bool(value: Any, path: str, line: int, field: str) -> bool:
  """JSON true/false or the strings "True"/"False"; anything else is an error."""
  if isinstance(value, bool):
    return value
  if value in ('True', 'False'):
    return value == 'True'
  _fail(path, line, field, f'expected true/false or "True"/"False", got {value!r}')


def _string(raw: dict, field: str, path: str, line: int) -> str:
  if field not in raw:
    _fail(path, line, field, 'missing')
  if not isinstance(raw[field], str):
    _fail(path, line, field, f'expected a string, got {type(raw[field]).__name__}')
  return raw[field]


def _check_language(language: str, dataset: str, path: str, line: int, field: Optional[str]):
  if language not in LANGUAGES[dataset]:
    _fail(path, line, field, f'unknown language {language!r} for {dataset} '
          f'(known: {", ".join(LANGUAGES[dataset])})')


def _xor_attriqa_example(raw: dict, raw_line: str, path: str, line: int, file_language: Optional[str]) -> dict:
  for field in XOR_ATTRIQA_STRING_FIELDS:
    _string(raw, field, path, line)
  if 'ais' not in raw:
    _fail(path, line, 'ais', 'missing')
  language = raw['query_language']
  _check_language(language, 'xor_attriqa', path, line, 'query_language')
  if file_language is not None and language != file_language:
    _fail(path, line, 'query_language', f'{language!r} in the {file_language!r} file (each test file holds one '
          f'language)')
  # The paper's setting: the in-language passage when it was retrieved in the
  # query's language, else the English one.
  in_language = raw['passage_retrieved_language'] == language
  return {
      'id': parse_id(raw, raw_line, path, line),
      'language': language,
      'question': raw['query'],
      'answer': raw['prediction'],
      'passage': raw['passage_in_language'] if in_language else raw['passage_en'],
      'label': parse_bool(raw['ais'], path, line, 'ais'),
      'raw': raw,
  }


def _xtreme_up_example(raw: dict, raw_line: str, path: str, line: int, language: str) -> dict:
  example = {'id': parse_id(raw, raw_line, path, line), 'language': language}
  for field in XTREME_UP_STRING_FIELDS:
    example[field] = _string(raw, field, path, line)
  example['raw'] = raw
  return example


def read_file(dataset: str, path: str, language: Optional[str] = None) -> list[dict]:
  """Parses one released JSONL file into canonical example dicts (blank lines skipped).

  For XTREME-UP the language is the file's base name unless given; an XOR-AttriQA file named after a language
  (a test file: bn.jsonl) must hold that language only.
  """
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
  stem = os.path.basename(path).split('.')[0]
  if dataset == 'xtreme_up_xqa':
    language = language or stem
    _check_language(language, dataset, path, 0, None)
  elif language is None and stem in XOR_ATTRIQA_LANGUAGES:
    language = stem
  examples = []
  for line_no, raw_line, raw in jsonl_objects(path):
    if dataset == 'xor_attriqa':
      examples.append(_xor_attriqa_example(raw, raw_line, path, line_no, language))
    else:
      examples.append(_xtreme_up_example(raw, raw_line, path, line_no, language))
  if not examples:
    raise DataError(f'{path}: empty file (no examples)')
  return examples


def _locate(data_dir: str, marker: str, wrappers: Sequence[str]) -> str:
  """The folder holding `marker`: data_dir itself or a release wrapper folder inside it."""
  for root in (data_dir,) + tuple(os.path.join(data_dir, w) for w in wrappers):
    if _gfile().isdir(os.path.join(root, marker)):
      return os.path.join(root, marker)
  raise DataError(f'{data_dir}: no {marker}/ folder (looked in {data_dir} and '
                  f'{", ".join(wrappers)}); extract the release there')


def split_files(dataset: str, data_dir: str, split: str,
                languages: Optional[Iterable[str]] = None) -> list[tuple[str, Optional[str]]]:
  """(path, language or None) of the released files holding one split."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  if dataset == 'xor_attriqa':
    folder = _locate(data_dir, XOR_ATTRIQA_SETTING, ('xor_attriqa',))
    names = XOR_ATTRIQA_FILES[split]
    if split == 'test' and languages is not None:
      names = tuple(f'{lang}.jsonl' for lang in languages)
    return [(os.path.join(folder, name), None) for name in names]
  if dataset == 'xtreme_up_xqa':
    folder = os.path.join(_locate(data_dir, XTREME_UP_TASK_DIR, (XTREME_UP_ROOT,)), split)
    if languages is None:
      present = sorted(os.path.basename(p)[:-len('.jsonl')]
                       for p in _gfile().glob(os.path.join(folder, '*.jsonl')))
      for lang in present:
        _check_language(lang, dataset, os.path.join(folder, f'{lang}.jsonl'), 0, None)
      missing = [lang for lang in XTREME_UP_LANGUAGES if lang not in present]
      if missing:
        logging.warning('xtreme_up_xqa %s: no file for %s in %s', split, ', '.join(missing), folder)
      languages = [lang for lang in XTREME_UP_LANGUAGES if lang in present]
    absent = [lang for lang in languages if not _gfile().exists(os.path.join(folder, f'{lang}.jsonl'))]
    if absent:
      present = sorted(os.path.basename(p)[:-len('.jsonl')] for p in _gfile().glob(os.path.join(folder, '*.jsonl')))
      raise DataError(f'{folder}: no file for the requested languages {absent} (the run\'s Experiment.languages); '
                      f'this split has {present}')
    return [(os.path.join(folder, f'{lang}.jsonl'), lang) for lang in languages]
  raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')


def check_ids(examples: Sequence[dict], where: str) -> None:
  """Ids must join rationales unambiguously: one id never names two different examples."""
  seen = {}
  duplicates = 0
  for ex in examples:
    other = seen.setdefault(ex['id'], ex)
    if other is not ex:
      if other['raw'] != ex['raw']:
        raise DataError(f'{where}: id {ex["id"]!r} names two different examples')
      duplicates += 1
  if duplicates:
    logging.warning('%s: %d exact duplicate examples (same id)', where, duplicates)


def log_counts(dataset: str, split: str, examples: Sequence[dict]) -> dict[str, int]:
  """Logs and returns the number of examples per language."""
  counts = dict(sorted(collections.Counter(ex['language'] for ex in examples).items()))
  logging.info('%s %s: %d examples; per language: %s', dataset, split, len(examples),
               ', '.join(f'{k}={v}' for k, v in counts.items()))
  return counts


def read_split(dataset: str, data_dir: str, split: str,
               languages: Optional[Iterable[str]] = None) -> list[dict]:
  """Canonical examples of one split of a release extracted under data_dir."""
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
  if languages is not None:
    languages = list(languages)
    for lang in languages:
      _check_language(lang, dataset, data_dir, 0, 'languages')
  examples = []
  for path, lang in split_files(dataset, data_dir, split, languages):
    examples.extend(read_file(dataset, path, lang))
  if languages is not None:
    examples = [ex for ex in examples if ex['language'] in languages]
  if not examples:
    raise DataError(f'{data_dir}: {dataset} split {split!r} has no examples'
                    + (f' for languages {languages}' if languages else ''))
  check_ids(examples, f'{data_dir} {dataset} {split}')
  log_counts(dataset, split, examples)
  return examples


def read_pattern(dataset: str, file_pattern: str,
                 languages: Optional[Iterable[str]] = None) -> list[dict]:
  """Canonical examples from the files matching a glob (users' own copies, same format)."""
  paths = sorted(_gfile().glob(file_pattern))
  if not paths:
    raise DataError(f'{file_pattern}: no file matches')
  examples = [ex for p in paths for ex in read_file(dataset, p)]
  if languages is not None:
    languages = set(languages)
    examples = [ex for ex in examples if ex['language'] in languages]
  if not examples:
    raise DataError(f'{file_pattern}: no examples' + (f' for {sorted(languages)}' if languages else ''))
  check_ids(examples, file_pattern)
  log_counts(dataset, file_pattern, examples)
  return examples
