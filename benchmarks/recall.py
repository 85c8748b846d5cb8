"""How many updates a small Transformer trained from nothing needs to learn a look-up (associative recall), and
a positional copy for contrast: fiat-jax's trainer step against Hugging Face transformers' LlamaForCausalLM, the
same initial weights, the same batches, the same AdamW.

The demo's premise 2 asks τ to answer "Where does P live?" from a passage: find "P lives in C" and copy C. The
skill under that is associative recall: pairs `k v ,` (36 keys, 22 values: the miniature's names and cities)
followed by a query `? k =`, answered with the value paired with k. Each row holds 2 .. --pairs pairs (the
two-pair rows give a large gradient to any look-up at all); accuracy is scored on --pairs pairs, so choosing
any value of the row scores 1 / --pairs. `--task copy` asks instead for a random sequence to be repeated (a
fixed-offset copy: no look-up). The loss is taken on the answer token only; attention is causal on both sides.

  python benchmarks/recall.py [--task recall|copy] [--steps 3000 --pairs 5 --layers 2 --width 96 --lr 1e-3]
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEYS, VALUES = 36, 22  # the miniature's names and cities
KEY0, VALUE0, COMMA, ASK, EQUALS, BOS = 10, 60, 4, 5, 6, 1
VOCAB = 128


def recall_row(rng: random.Random, pairs: int) -> list[int]:
  """`k v ,` x pairs, then `? k =` and the answer v (the row's last token)."""
  keys = rng.sample(range(KEYS), pairs)
  values = [rng.randrange(VALUES) for _ in keys]
  row = [BOS]
  for k, v in zip(keys, values):
    row += [KEY0 + k, VALUE0 + v, COMMA]
  i = rng.randrange(pairs)
  return row + [ASK, KEY0 + keys[i], EQUALS, VALUE0 + values[i]]


def copy_row(rng: random.Random, length: int) -> list[int]:
  """A random sequence, `=`, and the sequence again; scored on its last token (length positions back)."""
  seq = [rng.randrange(KEY0, VOCAB) for _ in range(length)]
  return [BOS] + seq + [EQUALS] + seq


def batches(task: str, pairs: int, batch: int, seed: int):
  """Padded [batch, L] rows (pad 0) and each row's answer position (the last token), forever."""
  rng = random.Random(seed)
  while True:
    if task == 'recall':
      rows = [recall_row(rng, rng.randint(2, pairs)) for _ in range(batch)]
    else:
      rows = [copy_row(rng, 2 * pairs) for _ in range(batch)]
    yield pad(rows)


def pad(rows):
  length = -(-max(map(len, rows)) // 8) * 8
  tokens = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.array([len(r) - 1 for r in rows], np.int32)


def test_set(task: str, pairs: int, n: int = 500):
  rng = random.Random(12345)
  rows = [recall_row(rng, pairs) if task == 'recall' else copy_row(rng, 2 * pairs) for _ in range(n)]
  return pad(rows)


def build(args, ckpt_dir: str):
  """(transformers model, our (model, params)) with identical random weights, via a safetensors checkpoint."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=args.width, intermediate_size=args.width * 8 // 3, num_hidden_layers=args.layers,
      num_attention_heads=4, num_key_value_heads=2, head_dim=args.width // 4, tie_word_embeddings=False,
      max_position_embeddings=256))
  peer.save_pretrained(ckpt_dir)
  cfg, params = hf.load(ckpt_dir)
  return peer, model_lib.Transformer(cfg), params


def ours_trainer(model, params, args):
  """fiat-jax's loss (train.loss_sums) and optimiser (optim.make) in one jitted update; and an accuracy function."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import optim  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train  # pylint: disable=g-import-not-at-top
  ocfg = optim.OptimConfig(learning_rate=args.lr, warmup_steps=50, b2=0.98)
  opt = optim.make(ocfg, args.steps, {'params': params})
  tcfg = train.TrainConfig(mode='full')

  def features(tokens, answer_at):  # position i predicts token i + 1; the loss only where the answer is predicted
    weights = np.zeros(tokens.shape, np.float32)
    weights[np.arange(len(tokens)), answer_at - 1] = 1.0
    return {'decoder_input_tokens': tokens, 'decoder_target_tokens': np.roll(tokens, -1, axis=1),
            'decoder_loss_weights': weights, 'decoder_causal_attention': np.zeros(tokens.shape, bool)}

  @jax.jit
  def step(trainable, opt_state, batch):
    def loss(t):
      total, (n, _) = train.loss_sums(t, {}, batch, None, model=model, tcfg=tcfg)
      return total / n
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  @jax.jit
  def predict(trainable, tokens, answer_at):
    logits, _ = model.apply(trainable, tokens)
    return jnp.argmax(logits[jnp.arange(tokens.shape[0]), answer_at - 1], axis=-1)

  state = {'trainable': {'params': params}}
  state['opt'] = opt.init(state['trainable'])

  def update(tokens, answer_at):
    state['trainable'], state['opt'], value = step(state['trainable'], state['opt'], features(tokens, answer_at))
    return float(value)

  def accuracy(tokens, answer_at):
    guess = np.asarray(predict(state['trainable'], tokens, answer_at))
    return float(np.mean(guess == tokens[np.arange(len(tokens)), answer_at]))
  return update, accuracy


def peer_trainer(peer, args):
  """The same update in PyTorch: AdamW (decoupled decay 0), linear warm-up to a constant lr, norm clipping 1."""
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.AdamW(peer.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 50))

  def update(tokens, answer_at):
    peer.train()
    logits = peer(torch.from_numpy(tokens).long()).logits
    rows = torch.arange(len(tokens))
    at = torch.from_numpy(answer_at).long()
    loss = torch.nn.functional.cross_entropy(logits[rows, at - 1], torch.from_numpy(tokens).long()[rows, at])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()

  def accuracy(tokens, answer_at):
    peer.eval()
    with torch.inference_mode():
      logits = peer(torch.from_numpy(tokens).long()).logits
    rows = np.arange(len(tokens))
    guess = logits[rows, answer_at - 1].argmax(-1).numpy()
    return float(np.mean(guess == tokens[rows, answer_at]))
  return update, accuracy


def _cell(row: dict, side: str, key: str) -> str:
  """One table cell: accuracy in percent or mean loss; '-' for a side that did not run (--ours_only)."""
  if side not in row:
    return '-'
  return f'{100 * row[side]:.1f}%' if key == 'accuracy' else f'{row[side + "_loss"]:.3f}'


def main(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--task', choices=('recall', 'copy'), default='recall')
  ap.add_argument('--steps', type=int, default=3000)
  ap.add_argument('--pairs', type=int, default=5)
  ap.add_argument('--layers', type=int, default=2)
  ap.add_argument('--width', type=int, default=96)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--lr', type=float, default=1e-3)
  ap.add_argument('--eval_every', type=int, default=500)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--ours_only', action='store_true', help='skip transformers (long runs)')
  ap.add_argument('--json', help='write the curves here')
  args = ap.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as ckpt:
    peer, model, params = build(args, ckpt)
  sides = {'ours': ours_trainer(model, params, args)}
  if not args.ours_only:
    sides['peer'] = peer_trainer(peer, args)
  test = test_set(args.task, args.pairs)
  if args.task == 'recall':
    chance, test_rows = 1 / args.pairs, f'500 rows of {args.pairs} pairs (any value of the row'
  else:
    chance, test_rows = 1 / (VOCAB - KEY0), f'500 sequences of {2 * args.pairs} tokens (a uniform guess'
  print(f'task {args.task}: {args.layers} layers, width {args.width}, batch {args.batch}, lr {args.lr}; '
        f'test: {test_rows}: {100 * chance:.1f}%)')
  print('| step | ours: accuracy | transformers: accuracy | ours: loss | transformers: loss |')
  print('|---:|---:|---:|---:|---:|')
  curve, losses, t0 = [], {side: [] for side in sides}, time.time()
  for step, (tokens, answer_at) in enumerate(batches(args.task, args.pairs, args.batch, args.seed), start=1):
    for side, (update, _) in sides.items():
      losses[side].append(update(tokens, answer_at))
    if step % args.eval_every == 0 or step == args.steps:
      row = {'step': step}
      for side, (_, accuracy) in sides.items():
        row[side] = accuracy(*test)
        row[side + '_loss'] = float(np.mean(losses[side][-args.eval_every:]))
      curve.append(row)
      print(f'| {step} | ' + ' | '.join(_cell(row, side, key) for key in ('accuracy', 'loss')
                                         for side in ('ours', 'peer')) + ' |', flush=True)
    if step == args.steps:
      break
  print(f'{time.time() - t0:.0f} s for {args.steps} updates of each')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'args': vars(args), 'chance': chance, 'curve': curve,
                 'first_loss': {side: values[0] for side, values in losses.items()}}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
