"""Passage-first truncation, fingerprints, evaluation examples."""
import os
import shutil

import pytest
import seqio
import sentencepiece as spm

from fiat_jax.data import formatting
from fiat_jax.data import pipeline
from fiat_jax.data import readers

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XQA = os.path.join(TESTDATA, 'xtreme_up')
VOCAB = seqio.ByteVocabulary()


def _task_data(data_dir=XQA, inputs_length=None):
  return pipeline.TaskData(data_dir, vocabulary=VOCAB, inputs_length=inputs_length)


def test_passage_is_cut_first_from_its_end():
  td = _task_data(inputs_length=150)
  rows = pipeline.tokenized(td, 'xtreme_up_xqa_hi_plain', 'train')
  stats = pipeline.truncation_stats(td, 'xtreme_up_xqa_hi_plain', 'train')
  originals = readers.read_split('xtreme_up_xqa', XQA, 'train', ['hi'])
  cuts = []
  for row, ex in zip(rows, originals):
    full = formatting.format_inputs('xtreme_up_xqa', ex, 'plain')
    n = len(VOCAB.encode(row['inputs_pretokenized']))
    assert n <= 150 and row['tokens_cut'] == len(full.encode('utf-8')) - 150
    head = f'question: {ex["question"]} title: {ex["title"]} context: '
    assert row['inputs_pretokenized'].startswith(head)  # Question and title intact.
    assert ex['context'].startswith(row['inputs_pretokenized'][len(head):])  # A prefix of the passage.
    # Bytes are tokens and the passages are ASCII: exactly the excess is cut.
    assert len(VOCAB.encode(full)) - n == len(full.encode('utf-8')) - 150
    cuts.append(len(full.encode('utf-8')) - 150)
  assert cuts == [37, 43, 29]
  assert stats == {'examples': 3, 'truncated': 3, 'mean_tokens_cut': pytest.approx(109 / 3)}
  mixture = pipeline.truncation_stats(td, 'xtreme_up_xqa_indic_plain', 'train')
  assert mixture['examples'] == 7 and mixture['truncated'] == 7
  td = _task_data(inputs_length=60)
  with pytest.raises(readers.DataError, match=r'xtreme_up_xqa_hi_plain train example .* without any passage, '
                                              r'more than inputs_length=60'):
    pipeline.tokenized(td, 'xtreme_up_xqa_hi_plain', 'train')


def test_truncation_with_sentencepiece(tmp_path):
  lines = [ex['context'] + ' ' + ex['question'] for ex in readers.read_split('xtreme_up_xqa', XQA, 'train')]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=300, character_coverage=1.0, model_type='bpe',
                                 hard_vocab_limit=False)
  vocab = seqio.SentencePieceVocabulary(str(tmp_path / 'sp.model'))
  passage = 'New Delhi is the capital of India and a part of the National Capital Territory of Delhi.'
  render = lambda p: f'Question: भारत की राजधानी? Passage: {p} Answer:'
  full = len(vocab.encode(render(passage)))
  text, cut = formatting.truncate_passage(render, passage, vocab, full - 10, 'here')
  assert len(vocab.encode(text)) <= full - 10 and cut == full - len(vocab.encode(text)) >= 10
  assert text.startswith('Question: भारत की राजधानी? Passage: New') and text.endswith(' Answer:')
  assert formatting.truncate_passage(render, passage, vocab, full, 'here') == (render(passage), 0)


def test_fingerprint_and_eval_examples(tmp_path):
  td = _task_data()
  fp = pipeline.fingerprint(td, 'xtreme_up_xqa_full_plain', 'train')
  assert len(fp) == 16 and fp == pipeline.fingerprint(td, 'xtreme_up_xqa_full_plain', 'train')
  assert fp != pipeline.fingerprint(td, 'xtreme_up_xqa_full_plain', 'validation')
  rows = pipeline.eval_examples(td, 'xtreme_up_xqa_hi_plain', 'test')
  assert [r['targets_pretokenized'] for r in rows] == ['No Answer', 'the Mughal emperor Shah Jahan', 'New Delhi']
  assert set(rows[0]) == {'task', 'id', 'language', 'inputs_pretokenized', 'targets_pretokenized', 'inputs',
                          'example'}
  assert rows[0]['example']['title'] == 'Yamuna' and rows[0]['inputs'] == VOCAB.encode(rows[0]['inputs_pretokenized'])
  # Changed data: a different fingerprint (a resumed run would refuse it).
  copy = tmp_path / 'xtreme_up'
  shutil.copytree(XQA, copy)
  path = copy / 'xtreme_up_v1.1' / 'qa_cross_lang' / 'train' / 'hi.jsonl'
  path.write_text(path.read_text(encoding='utf-8').replace('New Delhi', 'Delhi'), encoding='utf-8')
  td = _task_data(str(copy))
  assert pipeline.fingerprint(td, 'xtreme_up_xqa_full_plain', 'train') != fp
