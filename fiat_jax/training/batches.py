"""Per-host training batches: seqio.DecoderFeatureConverter features, in a step-indexed order.

A batch is one step's rows on this process: decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and
decoder_causal_attention, each [B, L] with L = inputs + targets lengths (the prefix LM's input, then its target);
packed rows (pack=True) hold several examples and add decoder_segment_ids and decoder_positions; distilled CoT adds
decoder_task_ids. Examples longer than the lengths are an error (cut passages with TaskData.inputs_length), except
rationale targets, which are cut and counted. The order is a pure function of (seed, position): a stream of epochs,
each a permutation drawn from (seed, epoch), so the batches from start_step are exactly those a run that never
stopped would read next (resumption is exact). Process h of N takes stream positions h, h + N, h + 2N, ...: each
process builds only its own rows of every global batch.
"""
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from fiat_jax.data import formatting
from fiat_jax.data import pipeline
from fiat_jax.data import readers


def _local_order(n: int, seed: int, shard_index: int, num_shards: int, start: int, shuffle: bool = True
                 ) -> Iterator[int]:
  """Example indices of this host's positions start, start+1, ... in the epoch stream.

  The global stream is epoch after epoch, each a permutation drawn from (seed, epoch) (the examples' own order
  when not shuffle: a curriculum); host h takes the stream positions h, h + num_shards, h + 2 num_shards, ...
  """
  epoch, perm, k = -1, None, start
  while True:
    e, i = divmod(shard_index + k * num_shards, n)
    if e != epoch:
      epoch, perm = e, np.random.default_rng([seed, e]).permutation(n) if shuffle else np.arange(n)
    yield int(perm[i])
    k += 1


def train_batches(td: pipeline.TaskData, task_or_mixture: str, split: str, feature_lengths: Mapping[str, int],
                  batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1,
                  start_step: int = 0, pack: bool = False, bos_id: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite per-host batches of a task's split read through td (feature_batches over its tokenized examples)."""
  return feature_batches(pipeline.tokenized(td, task_or_mixture, split), feature_lengths, batch_size, seed=seed,
                         shard_index=shard_index, num_shards=num_shards, start_step=start_step, pack=pack,
                         bos_id=bos_id, where=f'{task_or_mixture} {split}')


def feature_batches(examples: Sequence[Mapping[str, Any]], feature_lengths: Mapping[str, int], batch_size: int,
                    *, seed: int, shard_index: int = 0, num_shards: int = 1, start_step: int = 0,
                    pack: bool = False, bos_id: int = 0, where: str = 'examples', shuffle: bool = True
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite per-host batches of seqio.DecoderFeatureConverter features (prefix LM) from token examples
  ({'id'?, 'kind'?, 'inputs', 'targets'} id lists).

  batch_size is this host's. Reshuffled every epoch from seed (shuffle=False: the examples' order, every epoch);
  deterministic; start_step
  skips exactly that many batches (resume). When some example is of kind 'rationale' (distilled CoT), rationale
  targets are cut to the targets length (counted and logged) and every batch carries decoder_task_ids [B, L]
  (formatting.TASK_IDS of each row's kind), which the trainer's loss averages per task.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index={shard_index} not in [0, num_shards={num_shards})')
  if batch_size < 1 or start_step < 0:
    raise ValueError(f'need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}')
  kinds = [ex.get('kind', 'label') for ex in examples]
  unknown = sorted(set(kinds) - set(formatting.TASK_IDS))
  if unknown:
    raise ValueError(f'{where}: example kinds {unknown} are not among {sorted(formatting.TASK_IDS)}')
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
        f'{len(ex["targets"])} tokens); set TaskData.inputs_length (Experiment.inputs_length) to cut passages, '
        f'or raise them')
  start = 0 if pack else start_step * batch_size

  def generate():
    for i in _local_order(len(examples), seed, shard_index, num_shards, start, shuffle):
      yield {'inputs': examples[i]['inputs'], 'targets': examples[i]['targets']}

  spec = tf.TensorSpec([None], tf.int32)
  ds = tf.data.Dataset.from_generator(generate, output_signature={'inputs': spec, 'targets': spec})
  ds = seqio.DecoderFeatureConverter(pack=pack, bos_id=bos_id)(ds, dict(feature_lengths))
  ds = ds.batch(batch_size, drop_remainder=True)
  if pack:  # Packed rows hold a varying number of examples: skip by counting.
    ds = ds.skip(start_step)
  if not multitask:
    return ds.as_numpy_iterator()
  task_ids = np.array([formatting.TASK_IDS[k] for k in kinds], np.int32)
  order = _local_order(len(examples), seed, shard_index, num_shards, start, shuffle)

  def with_task_ids(batches):  # unpacked rows are the examples in stream order
    for batch in batches:
      rows = task_ids[[next(order) for _ in range(batch_size)]]
      yield dict(batch, decoder_task_ids=np.broadcast_to(
          rows[:, None], batch['decoder_target_tokens'].shape).copy())
  return with_task_ids(ds.as_numpy_iterator())


def rationale_target_truncation(td: pipeline.TaskData, task_or_mixture: str, split: str, targets_length: int) -> dict:
  """How many rationale targets (distilled CoT) train_batches cuts to targets_length, by how many tokens."""
  return _cut_rationale_targets(pipeline.tokenized(td, task_or_mixture, split), targets_length)[1]


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
