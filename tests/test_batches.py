"""Per-host batches: prefix-LM features in the shuffled epoch order, disjoint shards, exact resumption, the
rationale-target cut."""
import os

import numpy as np
import pytest
import seqio

from fiat_jax.data import formatting
from fiat_jax.data import pipeline
from fiat_jax.data import readers
from fiat_jax.training import batches

XQA = os.path.join(os.path.dirname(__file__), 'testdata', 'xtreme_up')
VOCAB = seqio.ByteVocabulary()
LENGTHS = {'inputs': 256, 'targets': 40}


def _task_data(data_dir=XQA, inputs_length=None):
  return pipeline.TaskData(data_dir, vocabulary=VOCAB, inputs_length=inputs_length)


def _example_tokens(td, name, split, index):
  ex = pipeline.tokenized(td, name, split)[index]
  return np.concatenate([ex['inputs'], ex['targets']])


def test_batches_are_prefix_lm_features_in_shuffled_order():
  td = _task_data()
  it = batches.train_batches(td, 'xtreme_up_xqa_full_plain', 'train', LENGTHS, 4, seed=7)
  steps = [next(it) for _ in range(6)]
  assert set(steps[0]) == {'decoder_input_tokens', 'decoder_target_tokens',
                           'decoder_loss_weights', 'decoder_causal_attention'}
  assert steps[0]['decoder_target_tokens'].shape == (4, 296)
  order = batches._local_order(17, 7, 0, 1, 0)
  for batch in steps:  # 24 rows: more than one epoch of 17 examples.
    for row in range(4):
      index = next(order)
      tokens = _example_tokens(td, 'xtreme_up_xqa_full_plain', 'train', index)
      n_in = len(pipeline.tokenized(td, 'xtreme_up_xqa_full_plain', 'train')[index]['inputs'])
      np.testing.assert_array_equal(batch['decoder_target_tokens'][row, :len(tokens)], tokens)
      assert batch['decoder_loss_weights'][row].sum() == len(tokens) - n_in  # Loss on targets only.
      assert batch['decoder_causal_attention'][row, :n_in].all()  # Bidirectional over inputs.
  again = batches.train_batches(td, 'xtreme_up_xqa_full_plain', 'train', LENGTHS, 4, seed=7)
  for batch in steps:
    np.testing.assert_array_equal(next(again)['decoder_target_tokens'], batch['decoder_target_tokens'])


def test_epochs_reshuffle_shards_are_disjoint_and_resume_is_exact():
  first_two_epochs = list(zip(range(14), batches._local_order(7, 1, 0, 1, 0)))
  epoch0 = [i for k, i in first_two_epochs[:7]]
  epoch1 = [i for k, i in first_two_epochs[7:]]
  assert sorted(epoch0) == sorted(epoch1) == list(range(7)) and epoch0 != epoch1
  host0 = [i for _, i in zip(range(4), batches._local_order(7, 1, 0, 2, 0))]
  host1 = [i for _, i in zip(range(3), batches._local_order(7, 1, 1, 2, 0))]
  assert sorted(host0 + host1) == list(range(7))  # One epoch split over two hosts.
  assert host0 + host1 != epoch0 and [host0[0], host1[0], host0[1]] == epoch0[:3]
  td = _task_data()
  for pack, lengths in ((False, LENGTHS), (True, {'inputs': 512, 'targets': 64})):
    kw = dict(seed=3, pack=pack, shard_index=1, num_shards=2)
    fresh = batches.train_batches(td, 'xtreme_up_xqa_indic_plain', 'train', lengths, 2, **kw)
    expected = [next(fresh) for _ in range(5)][3:]
    resumed = batches.train_batches(td, 'xtreme_up_xqa_indic_plain', 'train', lengths, 2, start_step=3, **kw)
    for batch in expected:
      got = next(resumed)
      assert set(got) == set(batch)
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key])
    if pack:
      assert {'decoder_segment_ids', 'decoder_positions'} <= set(batch)
      assert batch['decoder_segment_ids'].max() >= 2  # Several examples share a row.
  with pytest.raises(ValueError, match=r'shard_index=2 not in \[0, num_shards=2\)'):
    batches.train_batches(td, 'xtreme_up_xqa_indic_plain', 'train', LENGTHS, 2, seed=0, shard_index=2, num_shards=2)


def test_unshuffled_batches_keep_the_examples_order_every_epoch_and_resume_exactly():
  # A curriculum: rows in the examples' order, epoch after epoch (7 examples, batches of 3), from any step.
  examples = [{'inputs': np.array([], np.int32), 'targets': np.array([10 + i, 1], np.int32)} for i in range(7)]
  lengths = {'inputs': 0, 'targets': 8}
  firsts = lambda it, n: [list(next(it)['decoder_target_tokens'][:, 0]) for _ in range(n)]
  stream = batches.feature_batches(examples, lengths, 3, seed=5, shuffle=False)
  assert firsts(stream, 4) == [[10, 11, 12], [13, 14, 15], [16, 10, 11], [12, 13, 14]]
  resumed = batches.feature_batches(examples, lengths, 3, seed=5, shuffle=False, start_step=2)
  assert firsts(resumed, 2) == [[16, 10, 11], [12, 13, 14]]
  host1 = [i for _, i in zip(range(4), batches._local_order(7, 5, 1, 2, 0, shuffle=False))]
  assert host1 == [1, 3, 5, 0]  # stream positions 1, 3, 5, 7 of the unshuffled stream


def test_too_long_examples_are_an_error_not_a_silent_trim():
  td = _task_data()
  with pytest.raises(readers.DataError, match=r'7 examples longer than feature_lengths') as e:
    batches.train_batches(td, 'xtreme_up_xqa_indic_plain', 'train', {'inputs': 50, 'targets': 40}, 2, seed=0)
  assert 'set TaskData.inputs_length' in str(e.value)


def test_rationale_targets_are_cut_and_counted_and_rows_carry_their_task():
  examples = [{'id': 'a', 'kind': 'label', 'inputs': [5, 6, 7], 'targets': [8, 1]},
              {'id': 'b', 'kind': 'rationale', 'inputs': [5, 6], 'targets': list(range(10, 30)) + [1]},
              {'id': 'c', 'kind': 'rationale', 'inputs': [9], 'targets': [11, 12, 1]}]
  lengths = {'inputs': 4, 'targets': 6}
  batch = next(batches.feature_batches(examples, lengths, 3, seed=0))
  order = [next(o) for o in [batches._local_order(3, 0, 0, 1, 0)] for _ in range(3)]
  for row, i in enumerate(order):
    ex = examples[i]
    assert (batch['decoder_task_ids'][row] == formatting.TASK_IDS[ex['kind']]).all()
    kept = ex['targets'][:6]  # the 21-token rationale keeps its first 6 tokens (no EOS: it goes on)
    n_in = len(ex['inputs'])
    np.testing.assert_array_equal(batch['decoder_target_tokens'][row, n_in:n_in + len(kept)], kept)
    assert batch['decoder_loss_weights'][row].sum() == len(kept)
  assert batches._cut_rationale_targets(examples, 6)[1] == {'rationale_targets': 2, 'truncated': 1,
                                                            'mean_tokens_cut': 15.0}
  plain = next(batches.feature_batches([dict(ex, kind='label') for ex in examples[:1]], lengths, 1, seed=0))
  assert 'decoder_task_ids' not in plain  # single-task data: the loss stays one token mean
  with pytest.raises(readers.DataError, match='1 examples longer than feature_lengths'):  # labels are never cut
    batches.feature_batches([dict(examples[1], kind='label')], lengths, 1, seed=0)
  with pytest.raises(ValueError, match=r'need unpacked rows \(pack=False\)'):
    batches.feature_batches(examples, lengths, 1, seed=0, pack=True)
  with pytest.raises(ValueError, match=r"example kinds \['answer'\]"):
    batches.feature_batches([dict(examples[0], kind='answer')], lengths, 1, seed=0)


def test_batches_of_a_distilled_task_follow_the_stream_order(tmp_path):
  import store_helpers  # pylint: disable=g-import-not-at-top
  replies = store_helpers.replies_by_id('xtreme_up_xqa', XQA, lambda ex: 'R' * 50 + '\nAnswer: ' + ex['target'])
  store_helpers.write_store(tmp_path / 'store', 'xtreme_up_xqa', XQA, store_helpers.ScriptedBeta(replies=replies),
                            splits=('train',))  # `fiat rationales`, β writing a 50-byte rationale
  td = pipeline.TaskData(XQA, str(tmp_path / 'store'), VOCAB, languages=['hi'])
  name = 'xtreme_up_xqa_hi_distilled_cot'
  tokenized = pipeline.tokenized(td, name, 'train')
  assert [ex['kind'] for ex in tokenized] == ['label', 'rationale'] * 3
  it = batches.train_batches(td, name, 'train', {'inputs': 1024, 'targets': 32}, 2, seed=4, start_step=1)
  order = batches._local_order(6, 4, 0, 1, 2)
  for batch in (next(it), next(it)):
    for row in range(2):
      ex = tokenized[next(order)]
      assert batch['decoder_task_ids'][row, 0] == formatting.TASK_IDS[ex['kind']]
      assert batch['decoder_loss_weights'][row].sum() == min(len(ex['targets']), 32)
  assert batches.rationale_target_truncation(td, name, 'train', 32) == {'rationale_targets': 3, 'truncated': 3,
                                                                     'mean_tokens_cut': 19.0}  # 50 + EOS - 32
