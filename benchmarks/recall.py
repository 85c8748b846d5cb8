"""How many updates a small Transformer trained from nothing needs to learn a look-up (associative recall), and
a positional copy for contrast: fiat-jax's trainer step against Hugging Face transformers' LlamaForCausalLM, the
same initial weights, the same batches, the same AdamW.

The demo's premise 2 asks τ to answer "Where does P live?" from a passage: find P and copy what follows. Tasks:
  recall  pairs `k v ,` (36 keys, 22 values: the miniature's names and cities), then one query `? k =`, answered
          with k's value; rows of --min_pairs .. --pairs pairs, scored on --pairs pairs (any value: 1 / --pairs).
  dense   --pairs pairs `k v` (keys of --key_tokens tokens), then every key again in a shuffled order, each
          followed by its value: the induction form `A B ... A -> B`, a loss on every queried value.
  repeat  a random sequence of random length, then the same sequence (induction with a varying offset).
  mix     half dense rows, half repeated sequences; scored on dense rows.
  mix3    a third each of recall, dense and repeat rows; scored on recall rows (one question each).
  copy    a random sequence, `=`, the sequence again (a fixed-offset copy: no look-up).
Attention is causal; the loss is taken on the answers only (the whole second copy for repeat).

  python benchmarks/recall.py [--task recall|dense|repeat|mix|mix3|copy] [--steps 3000 --pairs 5 --layers 2 ...]
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
DRAW_WITH_REPLACEMENT = os.environ.get('RECALL_REPLACE') == '1'


def recall_row(rng: random.Random, pairs: int) -> list[int]:
  """`k v ,` x pairs, then `? k =` and the answer v (the row's last token)."""
  keys = rng.sample(range(KEYS), pairs)
  values = [rng.randrange(VALUES) for _ in keys]
  row = [BOS]
  for k, v in zip(keys, values):
    row += [KEY0 + k, VALUE0 + v, COMMA]
  i = rng.randrange(pairs)
  return row + [ASK, KEY0 + keys[i], EQUALS, VALUE0 + values[i]]


def dense_row(rng: random.Random, pairs: int, key_tokens: int = 1) -> tuple[list[int], list[int]]:
  """`k v` x pairs (keys of key_tokens tokens, distinct in the row), then every key again in a shuffled order, each
  followed by its value: the induction form `A B ... A -> B`, one look-up supervised per pair. (row, answer
  positions)."""
  keys = rng.sample([tuple(rng.randrange(KEYS) for _ in range(key_tokens)) for _ in range(4 * pairs)], pairs)
  while len(set(keys)) < pairs:
    keys = [tuple(rng.randrange(KEYS) for _ in range(key_tokens)) for _ in range(pairs)]
  values = [rng.randrange(VALUES) for _ in keys]
  row = [BOS]
  for k, v in zip(keys, values):
    row += [KEY0 + t for t in k] + [VALUE0 + v]
  order = [rng.randrange(pairs) for _ in range(pairs)] if DRAW_WITH_REPLACEMENT else rng.sample(range(pairs), pairs)
  answers = []
  for i in order:
    row += [KEY0 + t for t in keys[i]]
    answers.append(len(row))
    row.append(VALUE0 + values[i])
  return row, answers


def repeat_row(rng: random.Random, longest: int) -> tuple[list[int], list[int]]:
  """A random sequence of random length (4 .. longest), then the same sequence again: from its second token on,
  each next token follows the earlier occurrence of the current one (induction with a varying offset)."""
  seq = [rng.randrange(KEY0, VOCAB) for _ in range(rng.randint(4, longest))]
  row = [BOS] + seq + seq
  return row, list(range(len(seq) + 2, len(row)))


def copy_row(rng: random.Random, length: int) -> list[int]:
  """A random sequence, `=`, and the sequence again; scored on its last token (length positions back)."""
  seq = [rng.randrange(KEY0, VOCAB) for _ in range(length)]
  return [BOS] + seq + [EQUALS] + seq


def make_row(rng: random.Random, args, pairs: int) -> tuple[list[int], list[int]]:
  """One row of --task and its answer positions."""
  draw = rng.random() if args.task in ('mix', 'mix3') else 0.0
  if args.task == 'recall' or (args.task == 'mix3' and draw < 1 / 3):
    row = recall_row(rng, pairs)
    return row, [len(row) - 1]
  if args.task == 'dense' or (args.task in ('mix', 'mix3') and draw < 2 / 3):
    return dense_row(rng, pairs, args.key_tokens)
  if args.task in ('repeat', 'mix', 'mix3'):
    return repeat_row(rng, 2 * pairs)
  row = copy_row(rng, 2 * args.pairs)
  return row, [len(row) - 1]


def batches(args, seed: int):
  """Padded [batch, L] rows (pad 0) and their answer masks, forever; the pairs per row follow the curriculum
  (--min_pairs .. --pairs, the upper end growing from --min_pairs to --pairs over --curriculum updates)."""
  rng = random.Random(seed)
  step = 0
  while True:
    top = args.pairs
    if args.curriculum:
      top = min(args.pairs, args.min_pairs + (args.pairs - args.min_pairs) * step // args.curriculum)
    yield pad([make_row(rng, args, args.pairs if args.task == 'copy' else rng.randint(args.min_pairs, top))
               for _ in range(args.batch)])
    step += 1


def pad(rows):
  """[(row, answer positions)] -> (tokens [n, L], answer mask [n, L]), L a multiple of 8."""
  length = -(-max(len(r) for r, _ in rows) // 8) * 8
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.float32)
  for i, (r, answers) in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, answers] = 1.0
  return tokens, mask


def test_set(args, n: int = 500):
  """--task mix is scored on dense rows (the look-up), mix3 on recall rows (one question `? k =`), the others on
  their own rows."""
  rng = random.Random(12345)
  args = argparse.Namespace(**dict(vars(args), task={'mix': 'dense', 'mix3': 'recall'}.get(args.task, args.task)))
  return pad([make_row(rng, args, args.pairs) for _ in range(n)])


def build(args, ckpt_dir: str):
  """(transformers model, our (model, params)) with identical random weights, via a safetensors checkpoint."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  if args.arch == 'gpt2':  # learned absolute positions, LayerNorm, GELU: transformers only (hf.load reads no GPT-2)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=args.width, n_layer=args.layers, n_head=args.heads, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), None, None
  family = {'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig),
            'qwen2': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[args.arch]
  peer = family[0](family[1](
      vocab_size=VOCAB, hidden_size=args.width, intermediate_size=args.width * 8 // 3, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=min(2, args.heads), head_dim=args.width // args.heads,
      tie_word_embeddings=False, max_position_embeddings=256, rope_theta=args.rope_theta,
      initializer_range=args.init_std))
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
  ocfg = optim.OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup, b2=0.98, weight_decay=args.wd)
  opt = optim.make(ocfg, args.steps, {'params': params})
  tcfg = train.TrainConfig(mode='full')

  def features(tokens, mask):  # position i predicts token i + 1; the loss only where an answer is predicted
    return {'decoder_input_tokens': tokens, 'decoder_target_tokens': np.roll(tokens, -1, axis=1),
            'decoder_loss_weights': np.roll(mask, -1, axis=1), 'decoder_causal_attention': np.zeros(tokens.shape, bool)}

  @jax.jit
  def step(trainable, opt_state, batch):
    def loss(t):
      total, (n, _) = train.loss_sums(t, {}, batch, None, model=model, tcfg=tcfg)
      return total / n
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  @jax.jit
  def predict(trainable, tokens):
    logits, _ = model.apply(trainable, tokens)
    return jnp.argmax(logits, axis=-1)

  state = {'trainable': {'params': params}}
  state['opt'] = opt.init(state['trainable'])

  def update(tokens, mask):
    state['trainable'], state['opt'], value = step(state['trainable'], state['opt'], features(tokens, mask))
    return float(value)

  def accuracy(tokens, mask):
    guess = np.roll(np.asarray(predict(state['trainable'], tokens)), 1, axis=1)  # guess[:, i]: predicted at i - 1
    return float(np.sum((guess == tokens) * mask) / np.sum(mask))
  return update, accuracy


def peer_trainer(peer, args):
  """The same update in PyTorch: AdamW (decoupled decay 0), linear warm-up to a constant lr, norm clipping 1."""
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.AdamW(peer.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.wd)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / args.warmup))

  def update(tokens, mask):
    peer.train()
    logits = peer(torch.from_numpy(tokens).long()).logits
    at = torch.from_numpy(np.roll(mask, -1, axis=1)) > 0  # the positions that predict an answer
    loss = torch.nn.functional.cross_entropy(logits[at], torch.from_numpy(np.roll(tokens, -1, axis=1)).long()[at])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()

  def accuracy(tokens, mask):
    peer.eval()
    with torch.inference_mode():
      logits = peer(torch.from_numpy(tokens).long()).logits
    guess = np.roll(logits.argmax(-1).numpy(), 1, axis=1)
    return float(np.sum((guess == tokens) * mask) / np.sum(mask))
  return update, accuracy


def _cell(row: dict, side: str, key: str) -> str:
  """One table cell: accuracy in percent or mean loss; '-' for a side that did not run (--ours_only)."""
  if side not in row:
    return '-'
  return f'{100 * row[side]:.1f}%' if key == 'accuracy' else f'{row[side + "_loss"]:.3f}'


def main(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--task', choices=('recall', 'dense', 'repeat', 'mix', 'mix3', 'copy'), default='recall')
  ap.add_argument('--steps', type=int, default=3000)
  ap.add_argument('--pairs', type=int, default=5)
  ap.add_argument('--min_pairs', type=int, default=2, help='the fewest pairs in a training row')
  ap.add_argument('--curriculum', type=int, default=0, help='updates over which rows grow to --pairs pairs (0: none)')
  ap.add_argument('--key_tokens', type=int, default=1, help='--task dense: tokens per key')
  ap.add_argument('--layers', type=int, default=2)
  ap.add_argument('--width', type=int, default=96)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--lr', type=float, default=1e-3)
  ap.add_argument('--heads', type=int, default=4)
  ap.add_argument('--arch', choices=('llama', 'qwen2', 'gpt2'), default='llama', help='qwen2: biases on q, k and v')
  ap.add_argument('--init_std', type=float, default=0.02, help="the weights' initial standard deviation")
  ap.add_argument('--rope_theta', type=float, default=10_000.0)
  ap.add_argument('--warmup', type=int, default=50)
  ap.add_argument('--wd', type=float, default=0.0, help='decoupled weight decay (matrices only on our side)')
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
  sides = {} if model is None else {'ours': ours_trainer(model, params, args)}
  if not args.ours_only or model is None:
    sides['peer'] = peer_trainer(peer, args)
  test = test_set(args)
  if args.task == 'repeat':
    chance, test_rows = 1 / (VOCAB - KEY0), f'500 repeated sequences (a uniform guess'
  elif args.task in ('dense', 'mix'):
    chance, test_rows = 1 / VALUES, f'500 rows of {args.pairs} pairs, every value queried (a uniform guess'
  elif args.task in ('recall', 'mix3'):
    chance, test_rows = 1 / args.pairs, f'500 rows of {args.pairs} pairs (any value of the row'
  else:
    chance, test_rows = 1 / (VOCAB - KEY0), f'500 sequences of {2 * args.pairs} tokens (a uniform guess'
  print(f'task {args.task}: {args.layers} layers, width {args.width}, batch {args.batch}, lr {args.lr}; '
        f'test: {test_rows}: {100 * chance:.1f}%)')
  print('| step | ours: accuracy | transformers: accuracy | ours: loss | transformers: loss |')
  print('|---:|---:|---:|---:|---:|')
  curve, losses, t0 = [], {side: [] for side in sides}, time.time()
  for step, (tokens, mask) in enumerate(batches(args, args.seed), start=1):
    for side, (update, _) in sides.items():
      losses[side].append(update(tokens, mask))
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
