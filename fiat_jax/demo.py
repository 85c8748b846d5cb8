"""`make demo`: FIAT end to end on the embedded miniature world (fiat_jax/miniature.py), on a 2-core CPU.

1. The world: a two-hop cross-lingual QA release in the XTREME-UP layout (τ gets 100 labelled train examples),
   I_β (instruction + one exemplar). Passages are ledgers whose every look-up has a one-token key directly followed
   by the value looked up (`lives Ravi Pune.`).
2. The readers, pre-trained once by `python -m fiat_jax.demo pretrain` and shipped in fiat_jax/demo_readers/ (with
   the tokenizer and a manifest saying how), or here with --from_scratch: τ's plain base (language modelling over
   passages dense with one-hop look-ups, a curriculum from one chain of facts to four), β (a second reader
   pre-trained the same way from its own seed and text, then trained on plenty of chain-of-thought text, standing
   in for a big model's emergent reasoning; loaded through `local_beta`, as a real β is) and τ's instruction-tuned
   variant (the base tuned on other tasks in the instruction style: English one-hop questions, and English two-hop
   questions with a reasoning line, often wrong, to check against the passage). Premise 2: how well each τ reads
   (exact match on held-out one-hop questions).
3. The real recipes through gin_configs/demo.gin and `tuning.build`: few-shot ICL (β alone), fine-tuning the plain
   τ, FIAT, FIAT without CoT-augmented tuning, and without instruction-augmented tuning too. β writes every
   rationale; nothing is copied from the generator.
4. `fiat report`: a Table 2-style table, Table 3's rows that ran, Figure 3 and Figure 5; per row, how often τ's
   answer equals β's and how many distinct answers it gives; premise 1 (β's F1 above fine-tuning's) and 2.

  python -m fiat_jax.demo [--out_dir=demo_out] [--quick] [--from_scratch] [--readers=fiat_jax/demo_readers]
  python -m fiat_jax.demo pretrain [--out_dir=fiat_jax/demo_readers] [--beta_steps=300]
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
from typing import Optional

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
# The readers' learning rates: the plain base's reading skill appears abruptly (measured in τ's shape with this
# curriculum at 3e-3, constant after warm-up: held-out who / where look-ups 28.9 / 13.3% after 300 updates,
# 99.1 / 98.1% after 600; at 1e-3 with the curriculum over every step, 65.9 / 43.1% after 1,200).
LM_LR, TUNE_LR = 3e-3, 1e-3


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much the demo trains: the readers' pre-training (`pretrain`, --from_scratch), and τ's steps per row."""
  beta_examples: int = 9600  # 300 batches of 32: each chain of thought seen once
  beta_steps: int = 300
  # τ's base: at 1,200 steps one city of 22 (Multan) was still read 20% of the time, at 1,800 every city.
  tau_lm_steps: int = 1800
  beta_lm_steps: int = 1200
  tau_it_steps: int = 900
  tau_steps: int = 120
  # Seconds each stage took on an idle 2-core CPU (the ETA's prior; scaled by how fast this machine goes).
  seconds: tuple = (('world', 5), ('tau_base', 455), ('beta_base', 311), ('beta', 75), ('tau_it', 265),
                    ('reader', 10), ('icl', 10), ('xs_finetune', 36), ('xs_fiat', 45), ('xs_wo_cot', 47),
                    ('xs_wo_instruction', 40), ('report', 5))


# The demo as `make demo` runs it: the readers pre-trained by `python -m fiat_jax.demo pretrain` (READERS_DIR).
LOADED = Scale(seconds=(('world', 3), ('readers', 1), ('reader', 10), ('icl', 10), ('xs_finetune', 36),
                        ('xs_fiat', 45), ('xs_wo_cot', 47), ('xs_wo_instruction', 40), ('report', 5)))
QUICK = Scale(beta_examples=320, beta_steps=10, tau_lm_steps=4, beta_lm_steps=4, tau_it_steps=4, tau_steps=4,
              seconds=(('world', 3), ('tau_base', 4), ('beta_base', 4), ('beta', 11), ('tau_it', 6), ('reader', 5),
                       ('icl', 8), ('xs_finetune', 14), ('xs_fiat', 18), ('xs_wo_cot', 12), ('xs_wo_instruction', 12),
                       ('report', 5)))
READERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_readers')


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


def tau_config(vocab_size: int) -> model_lib.Config:
  return model_lib.Config(vocab_size=vocab_size, num_layers=3, embed_dim=96, num_heads=4, num_kv_heads=2,
                          head_dim=24, mlp_dim=256, tie_embeddings=False)


def tokenize_pairs(vocab: seqio.Vocabulary, pairs) -> list[dict]:
  """(prompt, output) texts -> token examples; the output ends with EOS, as seqio's append_eos does."""
  return [{'inputs': np.asarray(vocab.encode(p), np.int32),
           'targets': np.asarray(list(vocab.encode(t)) + [vocab.eos_id], np.int32)} for p, t in pairs]


def pretrain(name: str, cfg: model_lib.Config, examples: list[dict], steps: int, out_dir: str, *, lr: float,
             params=None, batch_size: int = 32, seed: int = 0, ordered: bool = False, weight_decay: float = 0.0,
             schedule: str = 'cosine', b2: float = 0.999) -> dict:
  """Trains every parameter of `cfg` on token examples (train.train, full mode); returns the trained params.
  ordered: the batches follow the examples' order (a curriculum), cycling, instead of a shuffled stream."""
  if params is None:
    params = nn.meta.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(seed)))
  lengths = {'inputs': max(len(ex['inputs']) for ex in examples),
             'targets': max(len(ex['targets']) for ex in examples)}
  lengths = {k: -(-v // 8) * 8 for k, v in lengths.items()}
  tcfg = train.TrainConfig(mode='full', num_steps=steps, batch_size=batch_size, seed=seed, log_every=50,
                           save_every=steps, keep=1, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=lr, warmup_steps=max(1, steps // 20),
                                                   schedule=schedule, weight_decay=weight_decay, b2=b2))
  batches = lambda start: batches_lib.feature_batches(examples, lengths, batch_size, seed=seed, start_step=start,
                                                      where=name, shuffle=not ordered)
  t0 = time.time()
  res = train.train(tcfg, cfg, params, batches, f'{name}-{len(examples)}', os.path.join(out_dir, 'train'))
  print(f'demo: {name}: {steps} steps on {len(examples)} examples in {time.time() - t0:.0f} s')
  return jax.device_get(res.trainable)['params']


def reader_exact_match(cfg: model_lib.Config, params, vocab: seqio.Vocabulary, pairs, bos_id: int = 0) -> dict:
  """Greedy answers of τ to (prompt, answer) pairs: exact matches of the answer's first line (after stripping
  spaces; a plain language model goes on to the next line where an instruction-tuned one stops), in percent."""
  prompts_ = [[bos_id] + list(vocab.encode(p)) for p, _ in pairs]
  out = decoding.generate(model_lib.Transformer(cfg), {'params': params}, prompts_, max_new_tokens=8,
                          eos_id=vocab.eos_id, pad_id=vocab.pad_id, batch_size=64)
  answers = [vocab.decode(t).split('\n')[0].strip() for t in out.tokens]
  by_answer = collections.defaultdict(lambda: [0, 0])  # an average hides one unread name or city: the worst one
  for a, (_, y) in zip(answers, pairs):
    by_answer[y][0] += a == y
    by_answer[y][1] += 1
  exact = sum(right for right, _ in by_answer.values())
  worst = min(sorted(by_answer), key=lambda y: by_answer[y][0] / by_answer[y][1])
  return {'exact': exact, 'n': len(pairs), 'em': 100.0 * exact / len(pairs),
          'worst': {'answer': worst, 'exact': by_answer[worst][0], 'n': by_answer[worst][1]}}


def world_tokenizer(folder: str, i_beta: list[dict]) -> str:
  """The world's SentencePiece model (every name and city one piece); the same text, so the same model, each time."""
  os.makedirs(folder, exist_ok=True)
  prompt = miniature.cot_pairs(1, seed=101, i_beta=i_beta)[0][0]
  return miniature.train_sentencepiece(os.path.join(folder, 'sp'), miniature.tokenizer_lines(
      [formatting.load_i_tau('xtreme_up_xqa'), formatting.RATIONALE_HEADER, prompt]))


def train_readers(folder: str, scale: Scale, progress: Progress, i_beta: list[dict]) -> dict:
  """Pre-trains τ's plain base (reading text: passages dense with one-hop look-ups, from one chain of facts to
  four), β's own plain base (the same recipe from another seed and text: a separately pre-trained model, as the
  paper's β and τ are), β (that base, then plenty of chain-of-thought text) and τ's instruction-tuned variant (τ's
  base tuned on its instruction mixture: one-hop questions, and two-hop ones with a reasoning line to check), each
  written as a Hugging Face checkpoint under `folder` with the tokenizer; a stage whose checkpoint is already there
  is loaded instead (every stage is seeded, so resuming gives what one uninterrupted run gives). Returns each
  stage's seconds."""
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  sp_path = world_tokenizer(folder, i_beta)
  vocab = seqio.SentencePieceVocabulary(sp_path)
  cfg = tau_config(-(-vocab.vocab_size // 128) * 128)
  plain = lambda steps, seed: [('', text) for text in miniature.reading_texts(32 * max(steps, 4), seed=seed)]
  lm = dict(ordered=True, weight_decay=0.1, lr=LM_LR, schedule='constant', b2=0.95)
  # β and τ are separately pre-trained models (as PaLM-2 L and XS are): β's base has its own initialisation and
  # reading text, so β's blind spots are not τ's.
  stages = (('tau_base', None, plain(scale.tau_lm_steps, 303), scale.tau_lm_steps, dict(seed=1, **lm)),
            ('beta_base', None, plain(scale.beta_lm_steps, 304), scale.beta_lm_steps, dict(seed=4, **lm)),
            ('beta', 'beta_base', miniature.cot_pairs(scale.beta_examples, seed=101, i_beta=i_beta),
             scale.beta_steps, dict(seed=3, lr=TUNE_LR)),
            ('tau_it', 'tau_base', miniature.instruction_mixture(32 * max(scale.tau_it_steps, 4), seed=202),
             scale.tau_it_steps, dict(seed=2, lr=TUNE_LR)))
  params, seconds = {}, {}
  for name, start, pairs, steps, kw in stages:
    progress.stage(name)
    t0, ckpt = time.time(), os.path.join(folder, name)
    if os.path.exists(os.path.join(ckpt, 'model.safetensors')):
      params[name] = jax.device_get(hf.load(ckpt)[1])
    else:
      params[name] = pretrain(name, cfg, tokenize_pairs(vocab, pairs), steps, os.path.join(folder, 'runs', name),
                              params=params.get(start), **kw)
      miniature.export_hf(cfg, params[name], ckpt)
    seconds[name] = round(time.time() - t0, 1)
  shutil.rmtree(os.path.join(folder, 'runs'), ignore_errors=True)
  return seconds


def measure_readers(folder: str) -> dict:
  """Premise 2: exact match of the instruction-tuned and the plain τ on the held-out one-hop questions."""
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  vocab = seqio.SentencePieceVocabulary(os.path.join(folder, 'sp.model'))
  reading = miniature.reading_pairs(READER_EXAMPLES, READER_SEED)
  out = {}
  for key, name in (('instruction_tuned', 'tau_it'), ('plain', 'tau_base')):
    cfg, params = hf.load(os.path.join(folder, name))
    out[key] = reader_exact_match(cfg, params, vocab, reading)
  return out


def build_world(out: str, scale: Scale, progress: Progress, readers_dir: Optional[str]) -> dict:
  """Writes the release and I_β, trains the readers (or takes them from `readers_dir`), measures how well τ reads;
  returns the demo.gin macros."""
  progress.stage('world')
  world = os.path.join(out, 'world')
  data_dir = miniature.write_release(os.path.join(world, 'data'), SIZES)
  i_beta_file, exemplars_file = miniature.write_i_beta(os.path.join(world, 'prompts'))
  i_beta = miniature.i_beta_messages(i_beta_file, exemplars_file)
  folder = os.path.join(world, 'readers')
  if readers_dir is None:
    train_readers(folder, scale, progress, i_beta)
  else:
    progress.stage('readers')
    shutil.copytree(readers_dir, folder)
    with open(os.path.join(folder, 'manifest.json'), encoding='utf-8') as f:
      manifest = json.load(f)
    print(f'demo: readers from {readers_dir} (pre-trained by `{manifest["command"]}` at {manifest["commit"][:10]}, '
          f'{manifest["wall_s"]:.0f} s on {manifest["device"]}); --from_scratch trains them here')
  progress.stage('reader')
  reader = measure_readers(folder)
  with open(os.path.join(world, 'reader.json'), 'w', encoding='utf-8') as f:
    json.dump(reader, f, indent=1)
  print(f'demo: premise 2, τ reads: held-out one-hop English questions in its instruction style, exact match '
        f'{reader["instruction_tuned"]["em"]:.1f}% instruction-tuned '
        f'({reader["instruction_tuned"]["exact"]}/{READER_EXAMPLES}), {reader["plain"]["em"]:.1f}% plain base')
  return {'DATA_DIR': data_dir, 'MINIATURE_TOKENIZER': os.path.join(folder, 'sp.model'),
          'MINIATURE_I_BETA': i_beta_file, 'MINIATURE_EXEMPLARS': exemplars_file,
          'MINIATURE_BETA': os.path.join(folder, 'beta'), 'MINIATURE_TAU_BASE': os.path.join(folder, 'tau_base'),
          'MINIATURE_TAU_IT': os.path.join(folder, 'tau_it')}


def pretrain_command(out_dir: str, beta_steps: Optional[int] = None) -> int:
  """`python -m fiat_jax.demo pretrain`: the readers `make demo` loads, with a manifest of how they were made.
  beta_steps: β's chain-of-thought steps (a weaker β: README, "Where FIAT's gain comes from")."""
  import platform  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  scale = Scale() if beta_steps is None else dataclasses.replace(Scale(), beta_steps=beta_steps)
  progress = Progress(dict(scale.seconds))
  prompts_dir = os.path.join(out_dir, 'prompts')
  i_beta = miniature.i_beta_messages(*miniature.write_i_beta(prompts_dir))
  seconds = train_readers(out_dir, scale, progress, i_beta)
  shutil.rmtree(prompts_dir)
  skills = measure_readers(out_dir)
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'
  manifest = {'command': f'python -m fiat_jax.demo pretrain --out_dir={out_dir}', 'commit': commit,
              'device': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax '
                        f'{jax.default_backend()}',
              'wall_s': round(time.time() - t0, 1), 'stage_seconds': seconds,
              'steps': {'tau_base': scale.tau_lm_steps, 'beta_base': scale.beta_lm_steps, 'beta': scale.beta_steps,
                        'tau_it': scale.tau_it_steps},
              'skills': {k: v['em'] for k, v in skills.items()}}
  with open(os.path.join(out_dir, 'manifest.json'), 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1)
  print(json.dumps(manifest, indent=1))
  return 0


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


def row_f1(out: str, name: str) -> float:
  with open(os.path.join(out, 'runs', 'miniature', name, 'metrics.json'), encoding='utf-8') as f:
    return json.load(f)['test']['mean_over_languages']['f1']


def premises(out: str) -> list[str]:
  """The paper's premises as measured in this run, one line each: τ reads (premise 2; the plain base's figure
  beside it) and β reasons better than τ learns from the 100 examples (premise 1: ICL's F1 above fine-tuning's)."""
  with open(os.path.join(out, 'world', 'reader.json'), encoding='utf-8') as f:
    reader = json.load(f)
  tuned, plain = reader['instruction_tuned'], reader['plain']
  verdict = ('met' if tuned['em'] >= READER_PREMISE else
             'not met: τ does not read, so no τ row can show FIAT\'s advantage (README, "The demo")')
  icl, finetune = row_f1(out, 'icl'), row_f1(out, 'xs_finetune')
  worst = tuned['worst']
  worst = (f'its worst answer {worst["answer"]}, {worst["exact"]}/{worst["n"]}' if worst['exact'] < worst['n']
           else 'every answer right')
  return [f'demo: premise 2: the instruction-tuned τ answers {tuned["em"]:.1f}% of held-out one-hop English '
          f'questions exactly before any FIAT tuning ({worst}; the plain base {plain["em"]:.1f}%); a competent '
          f'reader answers >= {READER_PREMISE:.0f}%: {verdict}.',
          f'demo: premise 1: β\'s few-shot two-hop test F1 {icl:.1f} against {finetune:.1f} for fine-tuning τ on the '
          f'{SIZES["train"]} examples: {"met" if icl > finetune else "not met"}.']


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(prog='python -m fiat_jax.demo', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('command', nargs='?', choices=('run', 'pretrain'), default='run',
                  help='run: the demo; pretrain: train the readers it loads (into --out_dir, default '
                       f'{os.path.relpath(READERS_DIR)})')
  ap.add_argument('--out_dir', default=None, help='default demo_out (run) or the packaged readers (pretrain)')
  ap.add_argument('--quick', action='store_true', help='a few steps of everything (a smoke run, not results)')
  ap.add_argument('--from_scratch', action='store_true', help='train the readers here instead of loading them')
  ap.add_argument('--readers', default=READERS_DIR, help='run: the pre-trained readers to load (default: the '
                  'packaged ones)')
  ap.add_argument('--beta_steps', type=int, default=None, help='pretrain: β\'s chain-of-thought steps (default '
                  f'{Scale().beta_steps}); stages already in --out_dir are loaded, not retrained')
  args = ap.parse_args(argv)
  if args.command == 'pretrain':
    return pretrain_command(args.out_dir or READERS_DIR, args.beta_steps)
  if not (args.quick or args.from_scratch or os.path.exists(os.path.join(args.readers, 'manifest.json'))):
    raise commands.UsageError(f'--readers={args.readers}: no manifest.json there: not a folder written by '
                              '`python -m fiat_jax.demo pretrain`')
  args.out_dir = args.out_dir or 'demo_out'
  for path in sorted({f for _, _, files in ROWS for f in ['demo.gin'] + files}):
    cli.resolve_gin_file(path)  # a missing gin file ends the demo now, not after minutes of pre-training
  scale = QUICK if args.quick else Scale() if args.from_scratch else LOADED
  once = _Once()
  logging.getLogger().addFilter(once)
  progress = Progress(dict(scale.seconds))
  try:
    for sub in OUTPUTS:  # a fresh world each time: stored rationales and checkpoints of an earlier one never mix in
      shutil.rmtree(os.path.join(args.out_dir, sub), ignore_errors=True)
    macros = build_world(args.out_dir, scale, progress, None if args.quick or args.from_scratch else args.readers)
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
  for line in premises(args.out_dir):
    print(line)
  print(f'demo: done in {time.time() - progress.t0:.0f} s; tables and figures in '
        f'{os.path.join(args.out_dir, "report")}. The miniature\'s models are tiny and its world synthetic: it '
        'shows the mechanism, not the paper\'s numbers.')
  return 0


if __name__ == '__main__':
  sys.exit(commands.run_guarded('python -m fiat_jax.demo', main, sys.argv[1:]))
