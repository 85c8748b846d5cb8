"""`make demo`: FIAT end to end on the embedded miniature world (fiat_jax/miniature.py), on a 2-core CPU.

1. The world: a two-hop cross-lingual QA release in the XTREME-UP layout (τ gets 100 labelled train examples),
   I_β (instruction + one exemplar) and a SentencePiece tokenizer.
2. β: a small model trained here on plenty of chain-of-thought text (standing in for a big model's emergent
   reasoning), saved as a Hugging Face checkpoint and loaded back through `local_beta`, as a real β is.
3. τ: a plain model (language modelling over passages and questions) and its instruction-tuned variant (the
   plain one tuned on other tasks in the instruction style), both saved as checkpoints.
4. The real recipes through gin_configs/demo.gin and `run.build`: few-shot ICL (β alone), fine-tuning the plain
   τ, FIAT, FIAT without CoT-augmented tuning. β writes every rationale; nothing is copied from the generator.
5. `fiat report`: a Table 2-style table, Table 3's rows that ran, Figure 3 and Figure 5.

  python -m fiat_jax.demo [--out_dir=demo_out] [--quick]
"""
import sys

if __name__ == '__main__':  # as `fiat`: FIAT_GLIBC_MALLOC=reuse's settings before numpy or jax start threads
  from fiat_jax import malloc  # pylint: disable=g-import-not-at-top
  malloc.keep_freed_memory()

import argparse
import dataclasses
import json
import os
import shutil
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import seqio

from fiat_jax import cli
from fiat_jax import data
from fiat_jax import miniature
from fiat_jax import model as model_lib
from fiat_jax import optim
from fiat_jax import report
from fiat_jax import run
from fiat_jax import train

SIZES = {'train': 100, 'validation': 60, 'test': 200}
OUTPUTS = ('world', 'runs', 'rationales', 'report')  # what the demo writes under --out_dir
# (name, row, recipe files after demo.gin): Table 2's rows and Table 3's first two.
ROWS = (('icl', 'icl', ['recipes/icl.gin']),
        ('xs_finetune', 'finetune', ['recipes/finetune.gin']),
        ('xs_fiat', 'fiat', ['recipes/fiat.gin']),
        ('xs_wo_cot', 'wo_cot', ['recipes/fiat.gin', 'recipes/no_cot.gin']))


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much the demo trains: the full demo, or --quick (a smoke run of every step)."""
  beta_examples: int = 8320  # 260 batches of 32: each chain of thought seen once
  beta_steps: int = 260
  tau_lm_steps: int = 100
  tau_it_steps: int = 300
  tau_steps: int = 120


QUICK = Scale(beta_examples=200, beta_steps=4, tau_lm_steps=4, tau_it_steps=4, tau_steps=4)


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
  batches = lambda start: data.feature_batches(examples, lengths, batch_size, seed=seed, start_step=start,
                                               where=name)
  t0 = time.time()
  res = train.train(tcfg, cfg, params, batches, f'{name}-{len(examples)}', os.path.join(out_dir, 'train'))
  print(f'demo: {name}: {steps} steps on {len(examples)} examples in {time.time() - t0:.0f} s')
  return jax.device_get(res.trainable)['params']


def build_world(out: str, scale: Scale) -> dict:
  """Writes the release, I_β, the tokenizer and the β / τ checkpoints; returns the demo.gin macros."""
  world = os.path.join(out, 'world')
  data_dir = miniature.write_release(os.path.join(world, 'data'), SIZES)
  i_beta_file, exemplars_file = miniature.write_i_beta(os.path.join(world, 'prompts'))
  i_beta = miniature.i_beta_messages(i_beta_file, exemplars_file)
  cot = miniature.cot_pairs(scale.beta_examples, seed=101, i_beta=i_beta)
  instructions = miniature.instruction_pairs(32 * max(scale.tau_it_steps, 4), seed=202)
  plain = [('', ex['context'] + ' ' + ex['question']) for ex in miniature.examples(len(instructions), seed=303)]
  sp_path = miniature.train_sentencepiece(
      os.path.join(world, 'sp'), miniature.tokenizer_lines([data.load_i_tau('xtreme_up_xqa'), cot[0][0]]))
  vocab = seqio.SentencePieceVocabulary(sp_path)
  size = -(-vocab.vocab_size // 128) * 128

  beta_cfg = beta_config(size)
  beta_params = pretrain('beta', beta_cfg, tokenize_pairs(vocab, cot), scale.beta_steps,
                         os.path.join(world, 'beta_run'), lr=3e-3)
  tau_cfg = tau_config(size)
  base = pretrain('tau_base', tau_cfg, tokenize_pairs(vocab, plain), scale.tau_lm_steps,
                  os.path.join(world, 'tau_base_run'), lr=3e-3, seed=1)
  tuned = pretrain('tau_it', tau_cfg, tokenize_pairs(vocab, instructions), scale.tau_it_steps,
                   os.path.join(world, 'tau_it_run'), lr=3e-3, params=base, seed=2)
  return {'DATA_DIR': data_dir, 'MINIATURE_TOKENIZER': sp_path, 'MINIATURE_I_BETA': i_beta_file,
          'MINIATURE_EXEMPLARS': exemplars_file,
          'MINIATURE_BETA': miniature.export_hf(beta_cfg, beta_params, os.path.join(world, 'beta')),
          'MINIATURE_TAU_BASE': miniature.export_hf(tau_cfg, base, os.path.join(world, 'tau_base')),
          'MINIATURE_TAU_IT': miniature.export_hf(tau_cfg, tuned, os.path.join(world, 'tau_it'))}


def run_rows(out: str, macros: dict, scale: Scale) -> None:
  """Each row: demo.gin + its recipe files, through the same entry point as `fiat train`."""
  runs_dir = os.path.join(out, 'runs')
  macros = dict(macros, RUNS_DIR=runs_dir, STORE_DIR=os.path.join(out, 'rationales'))
  for name, row, files in ROWS:
    gin.clear_config()
    argv = [f'--gin_file={f}' for f in ['demo.gin'] + files]
    argv += [f'--gin.{k}={v!r}' for k, v in macros.items()]
    argv += [f"--gin.Experiment.name='{name}'", f"--gin.Experiment.row='{row}'",
             f'--gin.TrainConfig.num_steps={scale.tau_steps}']
    t0 = time.time()
    cli.parse_gin(argv, 'demo')
    out_metrics = run.build(run.Experiment(), run.Recipe())
    print(f'demo: {name}: {json.dumps(run.headline(out_metrics))} ({time.time() - t0:.0f} s)')
  gin.clear_config()


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(prog='python -m fiat_jax.demo', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out_dir', default='demo_out')
  ap.add_argument('--quick', action='store_true', help='a few steps of everything (a smoke run, not results)')
  args = ap.parse_args(argv)
  scale = QUICK if args.quick else Scale()
  t0 = time.time()
  for sub in OUTPUTS:  # a fresh world each time: stored rationales and checkpoints of an earlier one never mix in
    shutil.rmtree(os.path.join(args.out_dir, sub), ignore_errors=True)
  macros = build_world(args.out_dir, scale)
  run_rows(args.out_dir, macros, scale)
  result = report.report(os.path.join(args.out_dir, 'runs'), os.path.join(args.out_dir, 'report'))
  print(result['markdown'])
  print(f'demo: done in {time.time() - t0:.0f} s; tables and figures in {os.path.join(args.out_dir, "report")}. '
        'The miniature has no pretrained weights: it shows the mechanism, not the paper\'s numbers.')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
