"""Runs a table's rows in order for one setting, sharing one rationale store (β is asked once, by the first row
that needs it); finished rows (metrics.json present) are skipped, so a killed sweep resumes where it stopped.

  python -m fiat_jax.sweep --setting=xtreme_up_indic --sizes=XS,S --table=3 --gin.DATA_DIR=... (any gin flags)

--table=4 and --table=6 run the rows of Figures 4 and 6.
"""
import sys

if __name__ == '__main__':  # as `fiat`: FIAT_GLIBC_MALLOC=reuse's settings before numpy or jax start threads
  from fiat_jax import malloc  # pylint: disable=g-import-not-at-top
  malloc.keep_freed_memory()

import argparse
import os

import gin

from fiat_jax import cli
from fiat_jax import commands
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax import experiment
from fiat_jax import tuning

# FIAT first: it generates every split's rationales, which the ICL and distilled-CoT rows reuse. '4' and '6' are
# Figures 4 and 6; Figure 6's rows need no rationale: w/o CoT with and without I_τ, on the instruction-tuned τ
# (Table 3 rows 2 and 3) and on the plain τ.
TABLE_ROWS = {'2': ('fiat', 'icl', 'finetune'), '3': ('fiat', 'icl', 'wo_cot', 'wo_instruction', 'wo_peft', 'finetune'),
              '4': ('fiat', 'wo_cot', 'distilled_cot'),
              '6': ('wo_cot', 'wo_instruction', 'plain_wo_cot', 'plain_wo_instruction')}


def run_files(setting: str, sizes: list[str], table: str) -> list[str]:
  """The runs/ files of a table, sizes inner, in TABLE_ROWS order (ICL once: it has no τ size)."""
  files = []
  for row in TABLE_ROWS[table]:
    names = ['icl'] if row == 'icl' else [f'{size.lower()}_{row}' for size in sizes]
    for name in names:
      path = f'runs/{setting}/{name}.gin'
      if not os.path.exists(os.path.join(cli.GIN_DIR, path)):
        raise commands.UsageError(f'{path}: no such run file in {cli.GIN_DIR} (table {table}, setting {setting})')
      files.append(path)
  return files


def main(argv: list[str]) -> int:
  """Runs every row; extra arguments (--gin_file, --gin.NAME=VALUE) apply to each row."""
  ap = argparse.ArgumentParser(prog='python -m fiat_jax.sweep', description=__doc__)
  ap.add_argument('--setting', required=True, choices=('xor_attriqa', 'xtreme_up_indic', 'xtreme_up_full'))
  ap.add_argument('--sizes', default='XS,S')
  ap.add_argument('--table', default='3', choices=sorted(TABLE_ROWS))
  ap.add_argument('--force', action='store_true', help='rerun rows that already have metrics.json')
  args, rest = ap.parse_known_args(argv)
  done = []
  for path in run_files(args.setting, args.sizes.split(','), args.table):
    gin.clear_config()
    cli.parse_gin([f'--gin_file={path}'] + rest, 'python -m fiat_jax.sweep')
    exp = experiment.Experiment()
    if not args.force and os.path.exists(os.path.join(exp.run_dir, experiment.METRICS_FILE)):
      print(f'sweep: {path}: {exp.run_dir} is finished, skipped')
      continue
    print(f'sweep: {path} -> {exp.run_dir}')
    out = tuning.build(exp, experiment.Recipe())
    if out.get('preempted'):
      print(f'sweep: {path} was preempted; rerun the sweep to resume it')
      return 3
    done.append(path)
  print(f'sweep: ran {len(done)} rows; `fiat report --runs_dir=<RUNS_DIR>` makes the tables')
  return 0


if __name__ == '__main__':
  sys.exit(commands.run_guarded('python -m fiat_jax.sweep', main, sys.argv[1:]))
