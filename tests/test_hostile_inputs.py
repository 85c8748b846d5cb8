"""Hostile input to the readers and to `fiat score`: bytes that are not UTF-8, repeated keys, languages that
contradict their file, null ids, predictions in another order or with ids gold does not have."""
import json
import os
import re
import shutil

import pytest

from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax.data import readers
from fiat_jax.data import scoring

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XOR_TEST = os.path.join(TESTDATA, 'xor_attriqa', 'in-language', 'ja.jsonl')  # labels: True, False, True
XQA = os.path.join(TESTDATA, 'xtreme_up')


def _lines(path):
  with open(path, encoding='utf-8') as f:
    return [line for line in f.read().splitlines() if line.strip()]


def _write(path, lines, encoding='utf-8'):
  with open(path, 'wb') as f:
    f.write(b''.join((line if isinstance(line, bytes) else line.encode(encoding)) + b'\n' for line in lines))
  return str(path)


def _xqa_copy(tmp_path, lang='hi', lines=None):
  """A release folder holding one test file (`lines` replace the fixture's)."""
  folder = tmp_path / 'xtreme_up_v1.1' / 'qa_cross_lang' / 'test'
  folder.mkdir(parents=True)
  src = os.path.join(XQA, 'xtreme_up_v1.1', 'qa_cross_lang', 'test', f'{lang}.jsonl')
  if lines is None:
    shutil.copy(src, folder / f'{lang}.jsonl')
  else:
    _write(folder / f'{lang}.jsonl', lines)
  return str(tmp_path)


# ---- Readers -----------------------------------------------------------------------------------------------------

def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
  lines = [line.encode() for line in _lines(XOR_TEST)]
  lines[2] = lines[2].replace(b'"query": "', b'"query": "\xff', 1)  # e.g. a file saved in a legacy code page
  path = _write(tmp_path / 'ja.jsonl', lines)
  with pytest.raises(readers.DataError, match=r'ja.jsonl:3: not UTF-8 \(byte 0xff is byte 12 of the line\)'):
    readers.read_file('xor_attriqa', path)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
  lines = _lines(XOR_TEST)
  path = _write(tmp_path / 'ja.jsonl', [b'\xef\xbb\xbf' + lines[0].encode()] + [x.encode() for x in lines[1:]])
  assert [ex['label'] for ex in readers.read_file('xor_attriqa', path)] == [True, False, True]


def test_a_repeated_key_is_an_error_naming_line_and_field(tmp_path):
  lines = _lines(XOR_TEST)
  twice = lines[2][:-1] + ', "ais": "False"}'  # json.loads would keep the last: a silently flipped label
  path = _write(tmp_path / 'ja.jsonl', lines[:2] + [twice])
  with pytest.raises(readers.DataError, match=r"ja.jsonl:3: field 'ais': appears twice in one object"):
    readers.read_file('xor_attriqa', path)


def test_query_language_must_be_the_language_of_its_test_file(tmp_path):
  lines = _lines(XOR_TEST)
  moved = tmp_path / 'in-language'
  moved.mkdir()
  path = _write(moved / 'bn.jsonl', lines)  # Japanese queries in the Bengali test file
  with pytest.raises(readers.DataError, match=r"bn.jsonl:1: field 'query_language': 'ja' in the 'bn' file"):
    readers.read_file('xor_attriqa', path)
  assert len(readers.read_file('xor_attriqa', _write(tmp_path / 'mine.jsonl', lines))) == 3  # not a language file


@pytest.mark.parametrize('value, expected', [(None, None), ('', None), (True, None), ([1], None), (7, '7'),
                                             ('q-1', 'q-1')])
def test_ids_are_strings_or_integers(tmp_path, value, expected):
  line = json.loads(_lines(XOR_TEST)[0]) | {'id': value}
  path = _write(tmp_path / 'ja.jsonl', [json.dumps(line, ensure_ascii=False)])
  if expected is None:
    with pytest.raises(readers.DataError, match=r"ja.jsonl:1: field 'id': expected a non-empty string or an "
                                                r"integer, got " + json.dumps(value).replace('[', r'\[')):
      readers.read_file('xor_attriqa', path)
  else:
    assert readers.read_file('xor_attriqa', path)[0]['id'] == expected


def test_infer_inputs_with_a_null_id_are_refused(tmp_path):
  from fiat_jax import inference  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path / 'in.jsonl', [json.dumps({'id': None, 'language': 'hi', 'question': 'q', 'title': 't',
                                                    'context': 'c'})])
  with pytest.raises(readers.DataError, match=r"in.jsonl:1: field 'id': expected a non-empty string"):
    inference.read_inputs(path, 'xtreme_up_xqa')


# ---- fiat score --------------------------------------------------------------------------------------------------

def _score(capsys, task, gold, rows, tmp_path, *extra):
  preds = _write(tmp_path / 'p.jsonl', [json.dumps(r, ensure_ascii=False) for r in rows])
  code = scoring.main(['--task', task, '--gold', gold, '--predictions', preds, '--bootstrap', '5', *extra])
  out, err = capsys.readouterr()
  return code, (json.loads(out) if code == 0 else err)


def test_score_joins_predictions_on_id_not_line_order(tmp_path, capsys):
  gold_dir = _xqa_copy(tmp_path / 'gold')
  gold = readers.read_split('xtreme_up_xqa', gold_dir, 'test')
  rows = [{'id': ex['id'], 'prediction': ex['target']} for ex in reversed(gold)]
  code, out = _score(capsys, 'xtreme_up_xqa', gold_dir, rows, tmp_path)
  assert code == 0 and out['per_language']['hi'] == {'f1': 100.0, 'em': 100.0, 'n': 3}
  no_ids = [{'prediction': r['prediction']} for r in rows]  # the same, without ids: line order is all there is
  code, out = _score(capsys, 'xtreme_up_xqa', gold_dir, no_ids, tmp_path)
  assert code == 0 and out['per_language']['hi']['f1'] < 50


@pytest.mark.parametrize('fault, message', [
    ('unknown', r"p.jsonl:2: field 'id': 'not-gold' is not a gold example"),
    ('duplicate', r"p.jsonl:3: field 'id': '\w+' again \(first on line 1\)"),
    ('missing', r"p.jsonl:2: field 'id': missing \(other lines have one"),
    ('absent', r'no prediction for 1 of 3 gold examples'),
])
def test_score_refuses_ids_that_do_not_join(tmp_path, capsys, fault, message):
  gold_dir = _xqa_copy(tmp_path / 'gold')
  rows = [{'id': ex['id'], 'prediction': ex['target']} for ex in readers.read_split('xtreme_up_xqa', gold_dir, 'test')]
  if fault == 'unknown':
    rows[1]['id'] = 'not-gold'
  elif fault == 'duplicate':
    rows[2]['id'] = rows[0]['id']
  elif fault == 'missing':
    del rows[1]['id']
  else:
    rows = rows[:2]
  code, err = _score(capsys, 'xtreme_up_xqa', gold_dir, rows, tmp_path)
  assert code == 1 and err.startswith('fiat score: error: ') and re.search(message, err), err


def test_score_accepts_the_gold_files_own_label_strings(tmp_path, capsys):
  raw = [json.loads(line)['ais'] for line in _lines(XOR_TEST)]
  rows = [{'prediction': 'True' if a in (True, 'True') else 'False'} for a in raw]
  code, out = _score(capsys, 'xor_attriqa', XOR_TEST, rows, tmp_path)
  assert code == 0 and out['overall']['accuracy'] == 100.0
  code, out = _score(capsys, 'xor_attriqa', XOR_TEST, [{'prediction': 'false'}] * 3, tmp_path)
  assert code == 0 and out['overall']['accuracy'] == pytest.approx(100 / 3)


def test_score_names_the_line_of_bytes_that_are_not_utf8(tmp_path, capsys):
  preds = _write(tmp_path / 'p.jsonl', [b'{"prediction": "yes"}', b'{"prediction": "\xff"}', b'{"prediction": "no"}'])
  assert scoring.main(['--task', 'xor_attriqa', '--gold', XOR_TEST, '--predictions', preds]) == 1
  assert 'p.jsonl:2: not UTF-8 (byte 0xff is byte 17 of the line)' in capsys.readouterr().err


# ---- gin bindings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('binding, message', [
    ("TrainConfig.num_steps='100'", "TrainConfig.num_steps: '100' (str) is not int"),
    ('TrainConfig.batch_size=8.0', 'TrainConfig.batch_size: 8.0 (float) is not int'),
    ('OptimConfig.learning_rate=True', 'OptimConfig.learning_rate: True (bool) is not float'),
    ("Experiment.languages='bn'", "Experiment.languages: 'bn' (str) is not Optional[Sequence[str]]"),
    ("Recipe.peft='no'", "Recipe.peft: 'no' (str) is not bool"),
])
def test_gin_values_of_the_wrong_type_fail_when_built_naming_class_field_value_and_type(binding, message):
  import gin  # pylint: disable=g-import-not-at-top
  from fiat_jax import cli  # pylint: disable=g-import-not-at-top
  from fiat_jax import experiment  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim
  from fiat_jax.training import train
  gin.clear_config()
  cli.parse_gin([f'--gin.{binding}'], 'test')
  try:
    with pytest.raises(TypeError, match=re.escape(message)):
      experiment.Experiment(), experiment.Recipe(), train.TrainConfig()
  finally:
    gin.clear_config()
  assert train.TrainConfig(num_steps=3, optim=optim.OptimConfig(learning_rate=1)).num_steps == 3
