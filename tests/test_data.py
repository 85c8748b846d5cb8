"""Passage-first truncation, per-host deterministic resumable batches, fingerprints."""
import os
import shutil

import numpy as np
import pytest
import seqio
import sentencepiece as spm

from fiat_jax import data
from fiat_jax import readers

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
XQA = os.path.join(TESTDATA, 'xtreme_up')
VOCAB = seqio.ByteVocabulary()
LENGTHS = {'inputs': 256, 'targets': 40}


def _register(data_dir=XQA, inputs_length=None):
  data.use(data.TaskData(data_dir, vocabulary=VOCAB, inputs_length=inputs_length))


def test_passage_is_cut_first_from_its_end():
  _register(inputs_length=150)
  rows = data._tokenized('xtreme_up_xqa_hi_finetune', 'train')
  stats = data.truncation_stats('xtreme_up_xqa_hi_finetune', 'train')
  originals = readers.read_split('xtreme_up_xqa', XQA, 'train', ['hi'])
  cuts = []
  for row, ex in zip(rows, originals):
    full = data.format_inputs('xtreme_up_xqa', ex, 'finetune')
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
  mixture = data.truncation_stats('xtreme_up_xqa_indic_finetune', 'train')
  assert mixture['examples'] == 7 and mixture['truncated'] == 7
  _register(inputs_length=60)
  with pytest.raises(readers.DataError, match=r'xtreme_up_xqa_hi_finetune train example .* without any passage, '
                                              r'more than inputs_length=60'):
    data._tokenized('xtreme_up_xqa_hi_finetune', 'train')


def test_truncation_with_sentencepiece(tmp_path):
  lines = [ex['context'] + ' ' + ex['question'] for ex in readers.read_split('xtreme_up_xqa', XQA, 'train')]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=300, character_coverage=1.0, model_type='bpe',
                                 hard_vocab_limit=False)
  vocab = seqio.SentencePieceVocabulary(str(tmp_path / 'sp.model'))
  passage = 'New Delhi is the capital of India and a part of the National Capital Territory of Delhi.'
  render = lambda p: f'Question: भारत की राजधानी? Passage: {p} Answer:'
  full = len(vocab.encode(render(passage)))
  text, cut = data.truncate_passage(render, passage, vocab, full - 10, 'here')
  assert len(vocab.encode(text)) <= full - 10 and cut == full - len(vocab.encode(text)) >= 10
  assert text.startswith('Question: भारत की राजधानी? Passage: New') and text.endswith(' Answer:')
  assert data.truncate_passage(render, passage, vocab, full, 'here') == (render(passage), 0)


def _example_tokens(name, split, index):
  ex = data._tokenized(name, split)[index]
  return np.concatenate([ex['inputs'], ex['targets']])


def test_batches_are_prefix_lm_features_in_shuffled_order():
  _register()
  it = data.train_batches('xtreme_up_xqa_full_finetune', 'train', LENGTHS, 4, seed=7)
  batches = [next(it) for _ in range(6)]
  assert set(batches[0]) == {'decoder_input_tokens', 'decoder_target_tokens',
                             'decoder_loss_weights', 'decoder_causal_attention'}
  assert batches[0]['decoder_target_tokens'].shape == (4, 296)
  order = data._local_order(17, 7, 0, 1, 0)
  for batch in batches:  # 24 rows: more than one epoch of 17 examples.
    for row in range(4):
      index = next(order)
      tokens = _example_tokens('xtreme_up_xqa_full_finetune', 'train', index)
      n_in = len(data._tokenized('xtreme_up_xqa_full_finetune', 'train')[index]['inputs'])
      np.testing.assert_array_equal(batch['decoder_target_tokens'][row, :len(tokens)], tokens)
      assert batch['decoder_loss_weights'][row].sum() == len(tokens) - n_in  # Loss on targets only.
      assert batch['decoder_causal_attention'][row, :n_in].all()  # Bidirectional over inputs.
  again = data.train_batches('xtreme_up_xqa_full_finetune', 'train', LENGTHS, 4, seed=7)
  for batch in batches:
    np.testing.assert_array_equal(next(again)['decoder_target_tokens'], batch['decoder_target_tokens'])


def test_epochs_reshuffle_shards_are_disjoint_and_resume_is_exact():
  first_two_epochs = list(zip(range(14), data._local_order(7, 1, 0, 1, 0)))
  epoch0 = [i for k, i in first_two_epochs[:7]]
  epoch1 = [i for k, i in first_two_epochs[7:]]
  assert sorted(epoch0) == sorted(epoch1) == list(range(7)) and epoch0 != epoch1
  host0 = [i for _, i in zip(range(4), data._local_order(7, 1, 0, 2, 0))]
  host1 = [i for _, i in zip(range(3), data._local_order(7, 1, 1, 2, 0))]
  assert sorted(host0 + host1) == list(range(7))  # One epoch split over two hosts.
  assert host0 + host1 != epoch0 and [host0[0], host1[0], host0[1]] == epoch0[:3]
  _register()
  for pack, lengths in ((False, LENGTHS), (True, {'inputs': 512, 'targets': 64})):
    kw = dict(seed=3, pack=pack, shard_index=1, num_shards=2)
    fresh = data.train_batches('xtreme_up_xqa_indic_finetune', 'train', lengths, 2, **kw)
    expected = [next(fresh) for _ in range(5)][3:]
    resumed = data.train_batches('xtreme_up_xqa_indic_finetune', 'train', lengths, 2, start_step=3, **kw)
    for batch in expected:
      got = next(resumed)
      assert set(got) == set(batch)
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key])
    if pack:
      assert {'decoder_segment_ids', 'decoder_positions'} <= set(batch)
      assert batch['decoder_segment_ids'].max() >= 2  # Several examples share a row.
  with pytest.raises(ValueError, match=r'shard_index=2 not in \[0, num_shards=2\)'):
    data.train_batches('xtreme_up_xqa_indic_finetune', 'train', LENGTHS, 2, seed=0, shard_index=2, num_shards=2)


def test_too_long_examples_are_an_error_not_a_silent_trim():
  _register()
  with pytest.raises(readers.DataError, match=r'7 examples longer than feature_lengths') as e:
    data.train_batches('xtreme_up_xqa_indic_finetune', 'train', {'inputs': 50, 'targets': 40}, 2, seed=0)
  assert 'set TaskData.inputs_length' in str(e.value)


def test_fingerprint_and_eval_examples(tmp_path):
  _register()
  fp = data.fingerprint('xtreme_up_xqa_full_finetune', 'train')
  assert len(fp) == 16 and fp == data.fingerprint('xtreme_up_xqa_full_finetune', 'train')
  assert fp != data.fingerprint('xtreme_up_xqa_full_finetune', 'validation')
  rows = data.eval_examples('xtreme_up_xqa_hi_finetune', 'test')
  assert [r['targets_pretokenized'] for r in rows] == ['No Answer', 'the Mughal emperor Shah Jahan', 'New Delhi']
  assert set(rows[0]) == {'task', 'id', 'language', 'inputs_pretokenized', 'targets_pretokenized', 'inputs',
                          'example'}
  assert rows[0]['example']['title'] == 'Yamuna' and rows[0]['inputs'] == VOCAB.encode(rows[0]['inputs_pretokenized'])
  # Changed data: a different fingerprint (a resumed run would refuse it).
  copy = tmp_path / 'xtreme_up'
  shutil.copytree(XQA, copy)
  path = copy / 'xtreme_up_v1.1' / 'qa_cross_lang' / 'train' / 'hi.jsonl'
  path.write_text(path.read_text(encoding='utf-8').replace('New Delhi', 'Delhi'), encoding='utf-8')
  _register(str(copy))
  assert data.fingerprint('xtreme_up_xqa_full_finetune', 'train') != fp


def test_rationale_targets_are_cut_and_counted_and_rows_carry_their_task():
  examples = [{'id': 'a', 'kind': 'label', 'inputs': [5, 6, 7], 'targets': [8, 1]},
              {'id': 'b', 'kind': 'rationale', 'inputs': [5, 6], 'targets': list(range(10, 30)) + [1]},
              {'id': 'c', 'kind': 'rationale', 'inputs': [9], 'targets': [11, 12, 1]}]
  lengths = {'inputs': 4, 'targets': 6}
  batch = next(data.feature_batches(examples, lengths, 3, seed=0))
  order = [next(o) for o in [data._local_order(3, 0, 0, 1, 0)] for _ in range(3)]
  for row, i in enumerate(order):
    ex = examples[i]
    assert (batch['decoder_task_ids'][row] == data.TASK_IDS[ex['kind']]).all()
    kept = ex['targets'][:6]  # the 21-token rationale keeps its first 6 tokens (no EOS: it goes on)
    n_in = len(ex['inputs'])
    np.testing.assert_array_equal(batch['decoder_target_tokens'][row, n_in:n_in + len(kept)], kept)
    assert batch['decoder_loss_weights'][row].sum() == len(kept)
  assert data._cut_rationale_targets(examples, 6)[1] == {'rationale_targets': 2, 'truncated': 1,
                                                         'mean_tokens_cut': 15.0}
  plain = next(data.feature_batches([dict(ex, kind='label') for ex in examples[:1]], lengths, 1, seed=0))
  assert 'decoder_task_ids' not in plain  # single-task data: the loss stays one token mean
  with pytest.raises(readers.DataError, match='1 examples longer than feature_lengths'):  # labels are never cut
    data.feature_batches([dict(examples[1], kind='label')], lengths, 1, seed=0)
  with pytest.raises(ValueError, match=r'need unpacked rows \(pack=False\)'):
    data.feature_batches(examples, lengths, 1, seed=0, pack=True)
  with pytest.raises(ValueError, match=r"example kinds \['answer'\]"):
    data.feature_batches([dict(examples[0], kind='answer')], lengths, 1, seed=0)


def test_batches_of_a_distilled_task_follow_the_stream_order(tmp_path):
  import store_helpers  # pylint: disable=g-import-not-at-top
  replies = store_helpers.replies_by_id('xtreme_up_xqa', XQA, lambda ex: 'R' * 50 + '\nAnswer: ' + ex['target'])
  store_helpers.write_store(tmp_path / 'store', 'xtreme_up_xqa', XQA, store_helpers.ScriptedBeta(replies=replies),
                            splits=('train',))  # `fiat rationales`, β writing a 50-byte rationale
  data.use(data.TaskData(XQA, str(tmp_path / 'store'), VOCAB, languages=['hi']))
  name = 'xtreme_up_xqa_hi_distilled_cot'
  tokenized = data._tokenized(name, 'train')
  assert [ex['kind'] for ex in tokenized] == ['label', 'rationale'] * 3
  it = data.train_batches(name, 'train', {'inputs': 1024, 'targets': 32}, 2, seed=4, start_step=1)
  order = data._local_order(6, 4, 0, 1, 2)
  for batch in (next(it), next(it)):
    for row in range(2):
      ex = tokenized[next(order)]
      assert batch['decoder_task_ids'][row, 0] == data.TASK_IDS[ex['kind']]
      assert batch['decoder_loss_weights'][row].sum() == min(len(ex['targets']), 32)
  assert data.rationale_target_truncation(name, 'train', 32) == {'rationale_targets': 3, 'truncated': 3,
                                                                  'mean_tokens_cut': 19.0}  # 50 + EOS - 32
