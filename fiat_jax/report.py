"""`fiat report`: the paper's Table 2 and Table 3 layouts, per-language appendix tables (Markdown and CSV, with
bootstrap intervals), Figure 3, Figure 4's table, Figure 5 (PNG), Figure 6 (PNG and table) and the
rationale-reliance analysis, from run directories written by `fiat train` / `fiat evaluate`
(RUNS_DIR/<setting>/<name>/metrics.json)."""
import csv
import glob
import json
import math
import os
import sys
from typing import Optional

from fiat_jax import commands
import tasks

SETTINGS = ('xor_attriqa', 'xtreme_up_indic', 'xtreme_up_full', 'miniature')
SETTING_TITLES = {'xor_attriqa': 'XOR-AttriQA O(100) Acc / AUC-PR', 'xtreme_up_indic': 'XTREME-UP Indic O(1000) F1',
                  'xtreme_up_full': 'XTREME-UP Full O(10000) F1', 'miniature': 'Miniature (demo) F1'}
SIZES = ('XS', 'S')
ROW_TITLES = {'icl': 'Few-shot ICL', 'finetune': 'Fine-tune', 'fiat': 'FIAT', 'wo_cot': 'w/o CoT-augmented tuning',
              'wo_instruction': 'w/o Instruction-augmented tuning', 'wo_peft': 'w/o Parameter-efficient tuning',
              'wo_it_base': 'w/o Instruction-tuned base model', 'distilled_cot': 'Distilled CoT (Hsieh et al., 2023)',
              'plain_wo_cot': 'Plain τ, w/o CoT-augmented tuning', 'plain_wo_instruction':
              'Plain τ, w/o CoT- and instruction-augmented tuning'}
TABLE3_ROWS = ('fiat', 'wo_cot', 'wo_instruction', 'wo_peft', 'wo_it_base')
# Figure 6: the gain from I_τ is (w/o CoT) - (w/o CoT and w/o I_τ), on the instruction-tuned and the plain τ.
FIGURE6_PAIRS = (('instruction-tuned τ', 'wo_cot', 'wo_instruction'),
                 ('plain τ', 'plain_wo_cot', 'plain_wo_instruction'))
RELIANCE = ('stored', 'empty', 'shuffled')


def load_runs(runs_dir: str) -> dict[tuple, dict]:
  """(setting, row, tau_size) -> metrics.json (+ 'run_dir'); Table 3's row 5 is the fine-tune run."""
  runs = {}
  for path in sorted(glob.glob(os.path.join(runs_dir, '*', '*', 'metrics.json'))):
    with open(path, encoding='utf-8') as f:
      m = json.load(f)
    exp = m.get('experiment', {})
    if 'test' not in m or not exp.get('setting') or not exp.get('row'):
      raise ValueError(f'{path}: not a finished run (needs experiment.setting, experiment.row and test)')
    m['run_dir'] = os.path.dirname(path)
    runs[(exp['setting'], exp['row'], exp.get('tau_size'))] = m
  for (setting, row, size), m in list(runs.items()):
    if row == 'finetune':
      runs.setdefault((setting, 'wo_it_base', size), m)
  return runs


def headline(result: dict) -> dict[str, dict]:
  """{'acc'|'auc_pr'|'f1': {'value', 'ci95'}} of one test result (its task's definition picks the figures)."""
  return tasks.definition(result['task']).headline(result)


def _definition(runs: dict, setting: str):
  """The data set definition of a setting's runs (their test results name the task); None without runs."""
  return next((tasks.definition(m['test']['task']) for (s, _, _), m in runs.items() if s == setting), None)


def _metric_title(definition) -> str:
  return {'f1': 'F1'}.get(definition.LANGUAGE_METRIC, definition.LANGUAGE_METRIC)


def _fmt(v: Optional[dict], ci: bool = True) -> str:
  if not v or v.get('value') is None or (isinstance(v['value'], float) and math.isnan(v['value'])):
    return '—'
  s = f'{v["value"]:.1f}'
  if ci and v.get('ci95') and None not in v['ci95']:
    s += f' [{v["ci95"][0]:.1f}, {v["ci95"][1]:.1f}]'
  return s


def cell(runs: dict, setting: str, row: str, size: Optional[str], ci: bool = True) -> str:
  m = runs.get((setting, row, size))
  if m is None:
    return ''
  h = headline(m['test'])
  if 'f1' in h:
    return _fmt(h['f1'], ci)
  return f'{_fmt(h["acc"], ci)} / {_fmt(h.get("auc_pr"), ci)}'


def _value(runs, setting, row, size, key):
  m = runs.get((setting, row, size))
  v = headline(m['test']).get(key) if m else None
  return None if not v or v.get('value') is None else v['value']


def gain_cell(runs: dict, setting: str, size: str) -> str:
  """FIAT minus the better of ICL and fine-tuning of the same τ size (docs/paper_rows.md, "Table 2")."""
  definition = _definition(runs, setting)
  keys = definition.HEADLINE_KEYS if definition else ()
  parts = []
  for key in keys:
    fiat = _value(runs, setting, 'fiat', size, key)
    base = [(v, name) for name, r, s in (('ICL', 'icl', None), (f'{size} fine-tune', 'finetune', size))
            if (v := _value(runs, setting, r, s, key)) is not None]
    if fiat is None or not base:
      return ''
    best, name = max(base)
    parts.append(f'{fiat - best:+.1f} (vs {name})')
  return ' / '.join(parts)


def _settings(runs):
  return [s for s in SETTINGS if any(k[0] == s for k in runs)]


def table2(runs: dict) -> list[list[str]]:
  settings = _settings(runs)
  rows = [['θ_τ', 'θ_β', 'Method'] + [SETTING_TITLES[s] for s in settings],
          ['—', 'L', 'ICL'] + [cell(runs, s, 'icl', None) for s in settings]]
  for size in SIZES:
    rows.append([size, '—', 'Fine-tune'] + [cell(runs, s, 'finetune', size) for s in settings])
    rows.append([size, 'L', 'FIAT'] + [cell(runs, s, 'fiat', size) for s in settings])
  for size in SIZES:
    rows.append(['', '', f'Gain over best baseline ({size})'] + [gain_cell(runs, s, size) for s in settings])
  return _drop_empty(rows, 3)


def table3(runs: dict) -> list[list[str]]:
  settings = _settings(runs)
  rows = [['θ_τ', 'θ_β', 'Method'] + [SETTING_TITLES[s] for s in settings],
          ['—', 'L', ROW_TITLES['icl']] + [cell(runs, s, 'icl', None) for s in settings]]
  for size in SIZES:
    for row in TABLE3_ROWS:
      rows.append([size, 'L' if row == 'fiat' else '—', ROW_TITLES[row]] +
                  [cell(runs, s, row, size) for s in settings])
  return _drop_empty(rows, 3)


def figure4_table(runs: dict) -> list[list[str]]:
  """XTREME-UP Indic (or the miniature): baseline without CoT, distilled CoT, CoT-augmented tuning."""
  rows = [['Setting', 'τ', 'Method', 'F1', 'Gain']]
  for setting in ('xtreme_up_indic', 'miniature'):
    for size in SIZES:
      base = _value(runs, setting, 'wo_cot', size, 'f1')
      for row, title in (('wo_cot', 'Baseline (no CoT)'), ('distilled_cot', ROW_TITLES['distilled_cot']),
                         ('fiat', 'CoT-augmented tuning (FIAT)')):
        v = _value(runs, setting, row, size, 'f1')
        if v is not None:
          gain = '—' if row == 'wo_cot' or base is None else f'{v - base:+.1f}'
          rows.append([setting, size, title, f'{v:.1f}', gain])
  return rows


def appendix(runs: dict, setting: str) -> list[list[str]]:
  """Per-language results (the paper's Tables 6-8 layout)."""
  langs = []
  for (s, _, _), m in runs.items():
    if s == setting:
      langs += [lang for lang in m['test']['per_language'] if lang not in langs]
  rows = [['θ_τ', 'Method'] + langs]
  order = [('icl', None)] + [(row, size) for size in SIZES
                             for row in TABLE3_ROWS + ('distilled_cot', 'plain_wo_cot', 'plain_wo_instruction')]
  for row, size in order:
    m = runs.get((setting, row, size))
    if m is None:
      continue
    table = m['test']['per_language']
    out = [size or '—', ROW_TITLES[row]]
    for lang in langs:
      t = table.get(lang)
      if t is None:
        out.append('')
      elif 'f1' in t:
        out.append(f'{t["f1"]:.1f}')
      else:
        auc = t.get('auc_pr')
        out.append(f'{t["accuracy"]:.1f} / ' + ('—' if auc is None or auc != auc else f'{auc:.1f}'))
    rows.append(out)
  return rows


def figure6_gains(runs: dict) -> list[tuple[str, str, dict]]:
  """(setting, τ size, {base: ({language: gain}, headline gain)}): the metric with I_τ minus without, per base."""
  out = []
  for setting in SETTINGS:
    definition = _definition(runs, setting)
    if definition is None:
      continue
    lang_key, head_key = definition.LANGUAGE_METRIC, definition.HEADLINE_KEYS[0]
    for size in SIZES:
      gains = {}
      for base, with_row, without_row in FIGURE6_PAIRS:
        on, off = runs.get((setting, with_row, size)), runs.get((setting, without_row, size))
        if not on or not off:
          continue
        t_on, t_off = on['test']['per_language'], off['test']['per_language']
        per_lang = {lang: t_on[lang][lang_key] - t_off[lang][lang_key] for lang in t_off if lang in t_on}
        h_on, h_off = (_value(runs, setting, row, size, head_key) for row in (with_row, without_row))
        gains[base] = (per_lang, None if h_on is None or h_off is None else h_on - h_off)
      if gains:
        out.append((setting, size, gains))
  return out


def figure6_table(runs: dict) -> list[list[str]]:
  """One row per language and one for the headline (mean over the scored languages), per setting and τ size."""
  bases = [base for base, _, _ in FIGURE6_PAIRS]
  rows = [['Setting', 'τ', 'Language'] + [f'Gain from I_τ, {base}' for base in bases]]
  for setting, size, gains in figure6_gains(runs):
    langs = []
    for per_lang, _ in gains.values():
      langs += [lang for lang in per_lang if lang not in langs]
    for lang in langs:
      rows.append([setting, size, lang] + [f'{gains[b][0][lang]:+.1f}' if b in gains and lang in gains[b][0] else ''
                                           for b in bases])
    rows.append([setting, size, 'mean (headline)'] + [
        ('—' if gains[b][1] is None else f'{gains[b][1]:+.1f}') if b in gains else '' for b in bases])
  return rows


def figure6(runs: dict, path: str) -> bool:
  """Per language and the headline mean: bars of the gain from I_τ for the instruction-tuned and the plain τ."""
  panels = figure6_gains(runs)
  if not panels:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
  width = 0.8 / len(FIGURE6_PAIRS)
  for ax, (setting, size, gains) in zip(axes[:, 0], panels):
    langs = []
    for per_lang, _ in gains.values():
      langs += [lang for lang in per_lang if lang not in langs]
    groups = langs + ['mean\n(headline)']
    for k, (base, _, _) in enumerate(FIGURE6_PAIRS):
      if base in gains:
        per_lang, head = gains[base]
        ys = [per_lang.get(lang, float('nan')) for lang in langs] + [float('nan') if head is None else head]
        ax.bar([i + (k - (len(FIGURE6_PAIRS) - 1) / 2) * width for i in range(len(groups))], ys, width, label=base)
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel(f'{_metric_title(_definition(runs, setting))} gain from I_τ')
    ax.set_title(f'{setting}, τ {size}', fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle('Figure 6: instruction-augmented tuning on an instruction-tuned and a plain τ')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def reliance(runs: dict) -> list[list[str]]:
  """How much τ leans on β: FIAT's test metric with its rationales, with empty ones, with other examples'."""
  rows = [['Setting', 'τ', 'Metric'] + [f'{v} rationales' for v in RELIANCE] + ['drop (empty)', 'drop (shuffled)']]
  for (setting, row, size), m in sorted(runs.items(), key=lambda kv: str(kv[0])):
    if row != 'fiat':
      continue
    found = {}
    for variant in RELIANCE:
      path = os.path.join(m['run_dir'], f'metrics_test_{variant}.json')
      if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
          found[variant] = headline(json.load(f)['result'])
    if 'stored' not in found:
      continue
    for key in found['stored']:
      vals = {v: found[v][key]['value'] for v in found if found[v].get(key)}
      drop = lambda v: f'{vals["stored"] - vals[v]:+.1f}' if v in vals else ''
      rows.append([setting, size, key] + [f'{vals[v]:.1f}' if v in vals else '' for v in RELIANCE] +
                  [drop('empty'), drop('shuffled')])
  return rows


def _drop_empty(rows, first):
  return [rows[0]] + [r for r in rows[1:] if any(c for c in r[first:])]


def markdown(rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(rows[0]) + ' |', '|' + '---|' * len(rows[0])]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows[1:]]
  return '\n'.join(lines) + '\n'


def write_table(out_dir: str, name: str, title: str, rows: list[list[str]]) -> str:
  with open(os.path.join(out_dir, f'{name}.csv'), 'w', newline='', encoding='utf-8') as f:
    csv.writer(f).writerows(rows)
  text = f'## {title}\n\n' + markdown(rows)
  with open(os.path.join(out_dir, f'{name}.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return text


def figure3(runs: dict, path: str) -> bool:
  """Per language: F1 gain from CoT-augmented tuning (FIAT - w/o CoT) against the w/o-CoT F1."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  drawn = False
  for setting in ('xtreme_up_indic', 'xtreme_up_full', 'miniature'):
    for size, marker in zip(SIZES, ('o', 's')):
      fiat, base = runs.get((setting, 'fiat', size)), runs.get((setting, 'wo_cot', size))
      if not fiat or not base:
        continue
      f_tab, b_tab = fiat['test']['per_language'], base['test']['per_language']
      langs = [lang for lang in b_tab if lang in f_tab]
      xs = [b_tab[lang]['f1'] for lang in langs]
      ys = [f_tab[lang]['f1'] - b_tab[lang]['f1'] for lang in langs]
      ax.scatter(xs, ys, marker=marker, label=f'{setting} {size}')
      for lang, x, y in zip(langs, xs, ys):
        ax.annotate(lang, (x, y), fontsize=7, xytext=(2, 2), textcoords='offset points')
      drawn = True
  if drawn:
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xlabel('F1 without CoT-augmented tuning')
    ax.set_ylabel('F1 gain with CoT-augmented tuning')
    ax.set_title('Figure 3: gains from CoT-augmented tuning per language')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def eval_curve(run_dir: str, metric: str) -> list[tuple[int, float]]:
  """(step, value) of eval/<metric> in a run's metrics.jsonl (the trainer's log)."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  points = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        rec = json.loads(line)
        if f'eval/{metric}' in rec and isinstance(rec[f'eval/{metric}'], (int, float)):
          points[int(rec['step'])] = float(rec[f'eval/{metric}'])
  return sorted(points.items())


def figure5(runs: dict, path: str) -> bool:
  """Validation metric over training steps, with (w/o CoT) and without (w/o instruction) I_τ."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  drawn = False
  for setting in SETTINGS:
    definition = _definition(runs, setting)
    if definition is None:
      continue
    metric = definition.LANGUAGE_METRIC
    for size in SIZES:
      for row, label, style in (('wo_cot', 'with instructions', '-'), ('wo_instruction', 'without', '--')):
        m = runs.get((setting, row, size))
        curve = eval_curve(m['run_dir'], metric) if m else []
        if curve:
          ax.plot([s for s, _ in curve], [v for _, v in curve], style, marker='.',
                  label=f'{setting} {size}: {label}')
          drawn = True
  if drawn:
    ax.set_xlabel('training step')
    ax.set_ylabel('validation metric')
    ax.set_title('Figure 5: instruction-augmented tuning over training')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def report(runs_dir: str, out_dir: str) -> dict:
  """Writes every table (.md, .csv) and figure (.png) that the runs allow; returns what was written."""
  runs = load_runs(runs_dir)
  if not runs:
    raise ValueError(f'{runs_dir}: no finished run (no <setting>/<name>/metrics.json)')
  os.makedirs(out_dir, exist_ok=True)
  texts = [write_table(out_dir, 'table2', 'Table 2: overall results (test, 95% bootstrap intervals)', table2(runs)),
           write_table(out_dir, 'table3', 'Table 3: ablations, each removal cumulative', table3(runs))]
  for setting in _settings(runs):
    texts.append(write_table(out_dir, f'appendix_{setting}', f'Per-language results: {setting}',
                             appendix(runs, setting)))
  for name, title, rows in (('figure4', 'Figure 4: ways of using the rationales', figure4_table(runs)),
                            ('figure6', 'Figure 6: gain from instruction-augmented tuning (test; with I_τ minus '
                             'without, no rationale, LoRA)', figure6_table(runs)),
                            ('reliance', 'Rationale reliance: FIAT with its rationales replaced', reliance(runs))):
    if len(rows) > 1:
      texts.append(write_table(out_dir, name, title, rows))
  figures = [p for p, fn in ((os.path.join(out_dir, 'figure3.png'), figure3),
                             (os.path.join(out_dir, 'figure5.png'), figure5),
                             (os.path.join(out_dir, 'figure6.png'), figure6)) if fn(runs, p)]
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(texts) + ''.join(f'\n![{os.path.basename(p)}]({os.path.basename(p)})\n' for p in figures))
  return {'runs': len(runs), 'tables': len(texts), 'figures': figures, 'markdown': '\n'.join(texts)}


def main(argv: list[str]) -> int:
  """`fiat report --runs_dir=RUNS_DIR --out_dir=OUT`: prints the Markdown tables."""
  args = commands.parser('report').parse_args(argv)
  if not os.path.isdir(args.runs_dir):
    raise commands.UsageError(f'--runs_dir={args.runs_dir}: no such directory')
  try:
    out = report(args.runs_dir, args.out_dir or os.path.join(args.runs_dir, 'report'))
  except (ValueError, OSError) as e:
    print(f'fiat report: error: {e}', file=sys.stderr)
    return 1
  print(out['markdown'])
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
