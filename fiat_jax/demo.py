"""`make demo`: FIAT end to end on the embedded miniature world (fiat_jax/miniature.py), on a 2-core CPU.

1. The world: a two-hop cross-lingual QA release in the XTREME-UP layout (τ gets 100 labelled train examples),
   I_β (instruction + one exemplar) and a SentencePiece tokenizer.
2. β: a small model trained here on plenty of chain-of-thought text (standing in for a big model's emergent
   reasoning), saved as a Hugging Face checkpoint and loaded back through `local_beta`, as a real β is.
3. τ: a plain model (language modelling over passages and questions) and its instruction-tuned variant (the
   plain one tuned on other tasks in the instruction style), both saved as checkpoints; how well each reads
   (exact match on held-out one-hop English questions in that style: the paper's premise of a competent τ).
4. The real recipes through gin_configs/demo.gin and `tuning.build`: few-shot ICL (β alone), fine-tuning the plain
   τ, FIAT, FIAT without CoT-augmented tuning, and without instruction-augmented tuning too. β writes every
   rationale; nothing is copied from the generator.
5. `fiat report`: a Table 2-style table, Table 3's rows that ran, Figure 3 and Figure 5; per row, how often τ's
   answer equals β's and how many distinct answers it gives.

  python -m fiat_jax.demo [--out_dir=demo_out] [--quick]
"""
import os
import sys

if __name__ == '__main__':  # as `fiat`: FIAT_GLIBC_MALLOC=reuse's settings before numpy or jax start threads
  from fiat_jax import malloc  # pylint: disable=g-import-not-at-top
  malloc.keep_freed_memory()
  # The CPU the timings and the repeatability are stated for.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse
import collections
import dataclasses
import json
import logging
import shutil
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import seqio

from fiat_jax.beta import prompts
from fiat_jax.beta import store
from fiat_jax import cli
from fiat_jax import commands
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax.data import formatting
from fiat_jax.data import metrics
from fiat_jax.data import readers
from fiat_jax import evaluation
from fiat_jax import experiment
from fiat_jax import miniature
from fiat_jax.model import decoding
from fiat_jax.model import transformer as model_lib
from fiat_jax import report
from fiat_jax.training import batches as batches_lib
from fiat_jax.training import optim
from fiat_jax.training import train
from fiat_jax import tuning

SIZES = {'train': 100, 'validation': 60, 'test': 200}
OUTPUTS = ('world', 'runs', 'rationales', 'report')  # what the demo writes under --out_dir
# (name, row, recipe files after demo.gin): Table 2's rows and Table 3's first three (Figure 5 needs the third).
ROWS = (('icl', 'icl', ['recipes/icl.gin']),
        ('xs_finetune', 'finetune', ['recipes/finetune.gin']),
        ('xs_fiat', 'fiat', ['recipes/fiat.gin']),
        ('xs_wo_cot', 'wo_cot', ['recipes/fiat.gin', 'recipes/no_cot.gin']),
        ('xs_wo_instruction', 'wo_instruction',
         ['recipes/fiat.gin', 'recipes/no_cot.gin', 'recipes/no_instruction.gin']))
READER_EXAMPLES, READER_SEED = 200, 404  # premise 2's held-out one-hop questions (not in τ's instruction data)
READER_PREMISE = 90.0  # exact match (%) expected of a competent reader (the paper's premise 2)


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much the demo trains: the full demo, or --quick (a smoke run of every step)."""
  beta_examples: int = 8320  # 260 batches of 32: each chain of thought seen once
  beta_steps: int = 260
  tau_lm_steps: int = 100
  tau_it_steps: int = 300
  tau_steps: int = 120
  # Seconds each stage took on an idle 2-core CPU (the ETA's prior; scaled by how fast this machine goes).
  seconds: tuple = (('world', 5), ('beta', 325), ('tau_base', 21), ('tau_it', 65), ('reader', 10),
                    ('icl', 10), ('xs_finetune', 36), ('xs_fiat', 45), ('xs_wo_cot', 47),
                    ('xs_wo_instruction', 40), ('report', 5))


QUICK = Scale(beta_examples=200, beta_steps=4, tau_lm_steps=4, tau_it_steps=4, tau_steps=4,
              seconds=(('world', 3), ('beta', 11), ('tau_base', 4), ('tau_it', 6), ('reader', 5), ('icl', 8),
                       ('xs_finetune', 14), ('xs_fiat', 18), ('xs_wo_cot', 12), ('xs_wo_instruction', 12),
                       ('report', 5)))


@dataclasses.dataclass
class Progress:
  """One line per stage: which stage of how many, time so far, and an ETA from the stages' usual durations."""
  seconds: dict
  t0: float = dataclasses.field(default_factory=time.time)
  done: float = 0.0  # the usual seconds of the stages finished

  def stage(self, name: str) -> None:
    names = list(self.seconds)
    k = names.index(name)
    self.done = sum(self.seconds[n] for n in names[:k])
    elapsed = time.time() - self.t0
    # The usual durations until this machine's own pace is known from a twentieth of the work.
    pace = elapsed / self.done if self.done >= sum(self.seconds.values()) / 20 else 1.0
    left = sum(self.seconds[n] for n in names[k:]) * pace
    print(f'demo [{k + 1}/{len(names)}] {name}: elapsed {_clock(elapsed)}, ETA {_clock(left)}', flush=True)


def _clock(seconds: float) -> str:
  return time.strftime('%M:%S', time.gmtime(max(seconds, 0.0)))


class _Once(logging.Filter):
  """Lets each distinct log message through once (the same data warning repeats for every row)."""

  def __init__(self):
    super().__init__()
    self.seen = set()

  def filter(self, record):
    key = record.getMessage()
    if key in self.seen:
      return False
    self.seen.add(key)
    return True


def beta_config(vocab_size: int) -> model_lib.Config:
  return model_lib.Config(vocab_size=vocab_size, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=4,
                          head_dim=32, mlp_dim=384, tie_embeddings=False)


def tau_config(vocab_size: int) -> model_lib.Config:
  return model_lib.Config(vocab_size=vocab_size, num_layers=3, embed_dim=96, num_heads=4, num_kv_heads=2,
                          head_dim=24, mlp_dim=256, tie_embeddings=False)


def tokenize_pairs(vocab: seqio.Vocabulary, pairs) -> list[dict]:
  """(prompt, output) texts -> token examples; the output ends with EOS, as seqio's append_eos does."""
  return [{'inputs': np.asarray(vocab.encode(p), np.int32),
           'targets': np.asarray(list(vocab.encode(t)) + [vocab.eos_id], np.int32)} for p, t in pairs]


def pretrain(name: str, cfg: model_lib.Config, examples: list[dict], steps: int, out_dir: str, *, lr: float,
             params=None, batch_size: int = 32, seed: int = 0) -> dict:
  """Trains every parameter of `cfg` on token examples (train.train, full mode); returns the trained params."""
  if params is None:
    params = nn.meta.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(seed)))
  lengths = {'inputs': max(len(ex['inputs']) for ex in examples),
             'targets': max(len(ex['targets']) for ex in examples)}
  lengths = {k: -(-v // 8) * 8 for k, v in lengths.items()}
  tcfg = train.TrainConfig(mode='full', num_steps=steps, batch_size=batch_size, seed=seed, log_every=50,
                           save_every=steps, keep=1, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=lr, warmup_steps=max(1, steps // 20),
                                                   schedule='cosine'))
  batches = lambda start: batches_lib.feature_batches(examples, lengths, batch_size, seed=seed, start_step=start,
                                                      where=name)
  t0 = time.time()
  res = train.train(tcfg, cfg, params, batches, f'{name}-{len(examples)}', os.path.join(out_dir, 'train'))
  print(f'demo: {name}: {steps} steps on {len(examples)} examples in {time.time() - t0:.0f} s')
  return jax.device_get(res.trainable)['params']


def reader_exact_match(cfg: model_lib.Config, params, vocab: seqio.Vocabulary, pairs, bos_id: int = 0) -> dict:
  """Greedy answers of τ to (prompt, answer) pairs: exact matches (after stripping spaces), in percent."""
  prompts_ = [[bos_id] + list(vocab.encode(p)) for p, _ in pairs]
  out = decoding.generate(model_lib.Transformer(cfg), {'params': params}, prompts_, max_new_tokens=8,
                          eos_id=vocab.eos_id, pad_id=vocab.pad_id, batch_size=64)
  answers = [vocab.decode(t).strip() for t in out.tokens]
  exact = sum(a == y for a, (_, y) in zip(answers, pairs))
  return {'exact': exact, 'n': len(pairs), 'em': 100.0 * exact / len(pairs)}


def build_world(out: str, scale: Scale, progress: Progress) -> dict:
  """Writes the release, I_β, the tokenizer and the β / τ checkpoints; returns the demo.gin macros."""
  progress.stage('world')
  world = os.path.join(out, 'world')
  data_dir = miniature.write_release(os.path.join(world, 'data'), SIZES)
  i_beta_file, exemplars_file = miniature.write_i_beta(os.path.join(world, 'prompts'))
  i_beta = miniature.i_beta_messages(i_beta_file, exemplars_file)
  cot = miniature.cot_pairs(scale.beta_examples, seed=101, i_beta=i_beta)
  instructions = miniature.instruction_pairs(32 * max(scale.tau_it_steps, 4), seed=202)
  plain = [('', ex['context'] + ' ' + ex['question']) for ex in miniature.examples(len(instructions), seed=303)]
  sp_path = miniature.train_sentencepiece(
      os.path.join(world, 'sp'), miniature.tokenizer_lines(
          [formatting.load_i_tau('xtreme_up_xqa'), formatting.RATIONALE_HEADER, cot[0][0]]))
  vocab = seqio.SentencePieceVocabulary(sp_path)
  size = -(-vocab.vocab_size // 128) * 128

  progress.stage('beta')
  beta_cfg = beta_config(size)
  beta_params = pretrain('beta', beta_cfg, tokenize_pairs(vocab, cot), scale.beta_steps,
                         os.path.join(world, 'beta_run'), lr=3e-3)
  progress.stage('tau_base')
  tau_cfg = tau_config(size)
  base = pretrain('tau_base', tau_cfg, tokenize_pairs(vocab, plain), scale.tau_lm_steps,
                  os.path.join(world, 'tau_base_run'), lr=3e-3, seed=1)
  progress.stage('tau_it')
  tuned = pretrain('tau_it', tau_cfg, tokenize_pairs(vocab, instructions), scale.tau_it_steps,
                   os.path.join(world, 'tau_it_run'), lr=3e-3, params=base, seed=2)
  progress.stage('reader')
  reading = miniature.reading_pairs(READER_EXAMPLES, READER_SEED)
  reader = {'instruction_tuned': reader_exact_match(tau_cfg, tuned, vocab, reading),
            'plain': reader_exact_match(tau_cfg, base, vocab, reading)}
  with open(os.path.join(world, 'reader.json'), 'w', encoding='utf-8') as f:
    json.dump(reader, f, indent=1)
  print(f'demo: premise 2, τ reads: held-out one-hop English questions in its instruction style, exact match '
        f'{reader["instruction_tuned"]["em"]:.1f}% instruction-tuned '
        f'({reader["instruction_tuned"]["exact"]}/{len(reading)}), {reader["plain"]["em"]:.1f}% plain base')
  return {'DATA_DIR': data_dir, 'MINIATURE_TOKENIZER': sp_path, 'MINIATURE_I_BETA': i_beta_file,
          'MINIATURE_EXEMPLARS': exemplars_file,
          'MINIATURE_BETA': miniature.export_hf(beta_cfg, beta_params, os.path.join(world, 'beta')),
          'MINIATURE_TAU_BASE': miniature.export_hf(tau_cfg, base, os.path.join(world, 'tau_base')),
          'MINIATURE_TAU_IT': miniature.export_hf(tau_cfg, tuned, os.path.join(world, 'tau_it'))}


def run_rows(out: str, macros: dict, scale: Scale, progress: Progress) -> None:
  """Each row: demo.gin + its recipe files, through the same entry point as `fiat train`."""
  runs_dir = os.path.join(out, 'runs')
  macros = dict(macros, RUNS_DIR=runs_dir, STORE_DIR=os.path.join(out, 'rationales'))
  for name, row, files in ROWS:
    progress.stage(name)
    gin.clear_config()
    argv = [f'--gin_file={f}' for f in ['demo.gin'] + files]
    argv += [f'--gin.{k}={v!r}' for k, v in macros.items()]
    argv += [f"--gin.Experiment.name='{name}'", f"--gin.Experiment.row='{row}'",
             f'--gin.TrainConfig.num_steps={scale.tau_steps}']
    t0 = time.time()
    cli.parse_gin(argv, 'python -m fiat_jax.demo')
    out_metrics = tuning.build(experiment.Experiment(), experiment.Recipe())
    print(f'demo: {name}: {json.dumps(evaluation.headline(out_metrics))} ({time.time() - t0:.0f} s)')
  gin.clear_config()


def agreement_row(name: str, predictions: dict, beta: dict) -> dict:
  """One row's answers ({id: answer}) against β's ({id: answer}): equal after the metric's normalisation."""
  same = sum(metrics.normalize_answer(p) == metrics.normalize_answer(beta.get(i, '')) for i, p in predictions.items())
  answer, count = collections.Counter(predictions.values()).most_common(1)[0]
  return {'run': name, 'n': len(predictions), 'agree': same, 'distinct': len(set(predictions.values())),
          'top': answer, 'top_count': count}


def agreement(out: str, split: str = 'test') -> list[dict]:
  """Per row: how often its test answer equals β's parsed answer, and how many distinct answers it gives."""
  examples = readers.read_split('xtreme_up_xqa', os.path.join(out, 'world', 'data'), split, miniature.LANGUAGES)
  chosen = store.select(os.path.join(out, 'rationales'), 'xtreme_up_xqa', examples)
  beta = {ex['id']: prompts.task_spec('xtreme_up_xqa').beta_prediction(r and r['answer']) or ''
          for ex, r in zip(examples, chosen.records)}
  rows = [agreement_row('icl', beta, beta)]
  for name, _, _ in ROWS[1:]:
    with open(os.path.join(out, 'runs', 'miniature', name, f'predictions_{split}.jsonl'), encoding='utf-8') as f:
      rows.append(agreement_row(name, {r['id']: r['prediction'] for r in map(json.loads, f)}, beta))
  return rows


def agreement_markdown(rows: list[dict]) -> str:
  lines = ['| Run | τ = β\'s answer | distinct answers | most frequent answer |', '|---|---:|---:|---|']
  lines += [f'| {r["run"]} | {r["agree"]}/{r["n"]} | {r["distinct"]} | {r["top"] or "(empty)"} '
            f'({r["top_count"]}) |' for r in rows]
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(prog='python -m fiat_jax.demo', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out_dir', default='demo_out')
  ap.add_argument('--quick', action='store_true', help='a few steps of everything (a smoke run, not results)')
  args = ap.parse_args(argv)
  for path in sorted({f for _, _, files in ROWS for f in ['demo.gin'] + files}):
    cli.resolve_gin_file(path)  # a missing gin file ends the demo now, not after minutes of pre-training
  scale = QUICK if args.quick else Scale()
  once = _Once()
  logging.getLogger().addFilter(once)
  progress = Progress(dict(scale.seconds))
  try:
    for sub in OUTPUTS:  # a fresh world each time: stored rationales and checkpoints of an earlier one never mix in
      shutil.rmtree(os.path.join(args.out_dir, sub), ignore_errors=True)
    macros = build_world(args.out_dir, scale, progress)
    run_rows(args.out_dir, macros, scale, progress)
    progress.stage('report')
    result = report.report(os.path.join(args.out_dir, 'runs'), os.path.join(args.out_dir, 'report'))
    rows = agreement(args.out_dir)
    table = agreement_markdown(rows)
    with open(os.path.join(args.out_dir, 'report', 'agreement.md'), 'w', encoding='utf-8') as f:
      f.write('## How often τ answers as β does (test)\n\n' + table + '\n')
  finally:
    logging.getLogger().removeFilter(once)
  print(result['markdown'])
  print('\n## How often τ answers as β does (test)\n\n' + table + '\n')
  with open(os.path.join(args.out_dir, 'world', 'reader.json'), encoding='utf-8') as f:
    reader = json.load(f)['instruction_tuned']
  verdict = ('met' if reader['em'] >= READER_PREMISE else
             'not met: τ does not read, so no τ row can show FIAT\'s advantage (README, "The demo")')
  print(f'demo: premise 2: the instruction-tuned τ answers {reader["em"]:.1f}% of held-out one-hop English '
        f'questions exactly before any FIAT tuning; a competent reader answers >= {READER_PREMISE:.0f}%: {verdict}.')
  print(f'demo: done in {time.time() - progress.t0:.0f} s; tables and figures in '
        f'{os.path.join(args.out_dir, "report")}. The miniature has no pretrained weights: it shows the '
        'mechanism, not the paper\'s numbers.')
  return 0


if __name__ == '__main__':
  sys.exit(commands.run_guarded('python -m fiat_jax.demo', main, sys.argv[1:]))
