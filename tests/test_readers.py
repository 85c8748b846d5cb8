"""Readers of the released files: layouts, canonical dicts, ids, strict errors, TFDS builders."""
import hashlib
import os
import tarfile
import zipfile

import pytest
import tensorflow_datasets as tfds

from fiat_jax.data import readers
from fiat_jax.data import tfds_builders

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XOR = os.path.join(TESTDATA, 'xor_attriqa')
XQA = os.path.join(TESTDATA, 'xtreme_up')
BROKEN = os.path.join(TESTDATA, 'broken')


def _lines(path):
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def test_xor_attriqa_train_canonical_dicts():
  examples = readers.read_split('xor_attriqa', XOR, 'train')
  assert [ex['language'] for ex in examples] == ['bn', 'bn', 'fi', 'fi', 'ja', 'ja', 'ru', 'ru', 'te', 'te']
  assert [ex['label'] for ex in examples] == [True, False] * 5  # JSON booleans and "True"/"False".
  first, second = examples[0], examples[1]
  assert set(first) == {'id', 'language', 'question', 'answer', 'passage', 'label', 'raw'}
  assert first['question'] == 'বাংলাদেশের রাজধানী কোথায়?' and first['answer'] == 'ঢাকা'
  # Retrieved in the query's language -> passage_in_language; retrieved in English -> passage_en.
  assert first['passage'] == first['raw']['passage_in_language'] != first['raw']['passage_en']
  assert second['raw']['passage_retrieved_language'] == 'en'
  assert second['passage'] == 'Rabindranath Tagore received the Nobel Prize in Literature in 1913.'
  assert second['raw']['ais'] == 'False' and second['raw']['intrepetability_vote'] == 1.0
  line = _lines(os.path.join(XOR, 'in-language', 'train.jsonl'))[0]
  assert first['id'] == hashlib.sha256(line.encode('utf-8')).hexdigest()[:16]
  assert len({ex['id'] for ex in examples}) == 10


def test_xor_attriqa_splits_and_language_filter():
  assert len(readers.read_split('xor_attriqa', XOR, 'validation')) == 5
  test = readers.read_split('xor_attriqa', XOR, 'test')
  assert len(test) == 15 and sum(ex['label'] for ex in test) == 10
  ja = readers.read_split('xor_attriqa', XOR, 'test', languages=['ja'])
  assert [ex['question'][:3] for ex in ja] == ['日本の', '富士山', '源氏物']
  # The zip's wrapper folder is found too; in-english/ is never read.
  assert readers.split_files('xor_attriqa', TESTDATA, 'validation') == [
      (os.path.join(TESTDATA, 'xor_attriqa', 'in-language', 'val.jsonl'), None)]


def test_xtreme_up_layout_and_fields():
  train = readers.read_split('xtreme_up_xqa', XQA, 'train')
  langs = list(dict.fromkeys(ex['language'] for ex in train))
  assert langs == ['as', 'hi', 'mr', 'bn', 'fi', 'ja', 'ru', 'te']  # Release order of languages.
  assert len(train) == 17
  assert sum(ex['target'] == readers.NO_ANSWER for ex in train) == 6
  hi = [ex for ex in train if ex['language'] == 'hi']
  assert hi[1]['target'] == 'the Mughal emperor Shah Jahan' and hi[1]['title'] == 'Taj Mahal'
  assert set(hi[0]) == {'id', 'language', 'question', 'title', 'context', 'target', 'raw'}
  # The extracted tarball root works as data_dir too.
  same = readers.read_split('xtreme_up_xqa', os.path.join(XQA, 'xtreme_up_v1.1'), 'train', ['hi'])
  assert [ex['id'] for ex in same] == [ex['id'] for ex in hi]
  assert len(readers.read_split('xtreme_up_xqa', XQA, 'validation')) == 16


def test_read_pattern_users_copy():
  examples = readers.read_pattern('xor_attriqa', os.path.join(XOR, 'in-language', '[bf]*.jsonl'))
  assert [ex['language'] for ex in examples] == ['bn'] * 3 + ['fi'] * 3
  with pytest.raises(readers.DataError, match='no file matches'):
    readers.read_pattern('xor_attriqa', os.path.join(XOR, 'nothing-*.jsonl'))


@pytest.mark.parametrize('name, line, field, message', [
    ('xor_malformed_json.jsonl', 2, None, 'malformed JSON'),
    ('xor_missing_field.jsonl', 2, 'passage_en', 'missing'),
    ('xor_bad_bool.jsonl', 3, 'ais', "expected true/false or \"True\"/\"False\", got 'yes'"),
    ('xor_unknown_language.jsonl', 1, 'query_language', "unknown language 'sv'"),
])
def test_broken_xor_files_name_file_line_field(name, line, field, message):
  path = os.path.join(BROKEN, name)
  with pytest.raises(readers.DataError) as e:
    readers.read_file('xor_attriqa', path)
  text = str(e.value)
  assert text.startswith(f'{path}:{line}: ')
  assert message in text
  if field:
    assert f"field '{field}'" in text


def test_broken_empty_and_xtreme_up_files():
  with pytest.raises(readers.DataError, match='empty file'):
    readers.read_file('xor_attriqa', os.path.join(BROKEN, 'xor_empty.jsonl'))
  bad_target = os.path.join(BROKEN, 'qa_cross_lang', 'train', 'hi.jsonl')
  with pytest.raises(readers.DataError, match=rf"^{bad_target}:2: field 'target': expected a string"):
    readers.read_file('xtreme_up_xqa', bad_target)
  # A language file that is not an XTREME-UP language.
  with pytest.raises(readers.DataError, match=r"xx\.jsonl: unknown language 'xx'"):
    readers.read_split('xtreme_up_xqa', BROKEN, 'train')
  with pytest.raises(readers.DataError, match='no in-language/ folder'):
    readers.read_split('xor_attriqa', BROKEN, 'train')


def test_empty_split_and_conflicting_ids(tmp_path):
  folder = tmp_path / 'in-language'
  folder.mkdir()
  (folder / 'val.jsonl').write_text('\n')
  with pytest.raises(readers.DataError, match='val.jsonl: empty file'):
    readers.read_split('xor_attriqa', str(tmp_path), 'validation')
  examples = [{'id': 'a', 'raw': {'x': 1}}, {'id': 'a', 'raw': {'x': 1}}]
  readers.check_ids(examples, 'here')  # Exact duplicates are allowed (logged).
  with pytest.raises(readers.DataError, match="here: id 'a' names two different examples"):
    readers.check_ids(examples + [{'id': 'a', 'raw': {'x': 2}}], 'here')
  with pytest.raises(readers.DataError, match="unknown language 'de'"):
    readers.read_split('xtreme_up_xqa', XQA, 'train', languages=['de'])


def _build(builder_cls, tmp_path, manual):
  builder = builder_cls(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def test_tfds_xor_attriqa_from_manual_zip(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  with zipfile.ZipFile(manual / 'xor_attriqa.zip', 'w') as z:
    for root, _, files in os.walk(XOR):
      for name in files:
        path = os.path.join(root, name)
        z.write(path, os.path.join('xor_attriqa', os.path.relpath(path, XOR)))
  builder = _build(tfds_builders.XorAttriqa, tmp_path, manual)
  assert {s: builder.info.splits[s].num_examples for s in readers.SPLITS} == {
      'train': 10, 'validation': 5, 'test': 15}
  from_tfds = tfds_builders.read_split_tfds('xor_attriqa', str(tmp_path / 'tfds'), 'test')
  from_files = readers.read_split('xor_attriqa', XOR, 'test')
  assert from_tfds == from_files  # Same dicts, same (release) order.


def test_tfds_xtreme_up_from_manual_tgz(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  with tarfile.open(manual / 'xtreme-up-v1.1.jsonl.tgz', 'w:gz') as t:
    t.add(os.path.join(XQA, 'xtreme_up_v1.1'), arcname='xtreme_up_v1.1')
  _build(tfds_builders.XtremeUpXqa, tmp_path, manual)
  from_tfds = tfds_builders.read_split_tfds('xtreme_up_xqa', str(tmp_path / 'tfds'), 'validation',
                                            languages=['ja', 'ru'])
  from_files = readers.read_split('xtreme_up_xqa', XQA, 'validation', languages=['ja', 'ru'])
  assert from_tfds == from_files and len(from_tfds) == 4
  with pytest.raises(readers.DataError, match='is not prepared'):
    tfds_builders.read_split_tfds('xtreme_up_xqa', str(tmp_path / 'empty'), 'train')
