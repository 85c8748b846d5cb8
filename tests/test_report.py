"""`fiat report`: Table 2 / Table 3 / appendix / Figure 4 / reliance tables and Figures 3 and 5 from run dirs."""
import csv
import json

from fiat_jax.data import metrics
from fiat_jax import report

LANGS = ['as', 'hi', 'mr', 'as', 'hi', 'mr', 'as', 'mr']
TARGETS = ['red fox', 'No Answer', 'the river', 'blue', 'No Answer', 'seven hills', 'a cat', 'old town']


def xqa_result(n_right):
  """A real metrics.score_xtreme_up result where the first n_right predictions are right, the rest wrong."""
  preds = [t if i < n_right else 'wrong' for i, t in enumerate(TARGETS)]
  return metrics.score_xtreme_up(TARGETS, preds, LANGS, seed=0, n_resamples=50)


def write_run(root, setting, name, row, size, result, curve=None, reliance=None):
  run_dir = root / setting / name
  run_dir.mkdir(parents=True)
  (run_dir / 'metrics.json').write_text(json.dumps({
      'experiment': {'setting': setting, 'row': row, 'tau_size': size, 'name': name}, 'test': result}))
  if curve:
    (run_dir / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': s, 'eval/f1': v}) + '\n' for s, v in curve))
  for variant, res in (reliance or {}).items():
    (run_dir / f'metrics_test_{variant}.json').write_text(json.dumps({'result': res}))
  return result


def read_csv(path):
  with open(path, encoding='utf-8') as f:
    return list(csv.reader(f))


def test_tables_figures_and_reliance(tmp_path):
  runs = tmp_path / 'runs'
  icl = write_run(runs, 'xtreme_up_indic', 'icl', 'icl', None, xqa_result(4))
  write_run(runs, 'xtreme_up_indic', 'xs_finetune', 'finetune', 'XS', xqa_result(2))
  fiat = write_run(runs, 'xtreme_up_indic', 'xs_fiat', 'fiat', 'XS', xqa_result(7),
                   reliance={'stored': xqa_result(7), 'empty': xqa_result(3), 'shuffled': xqa_result(1)})
  write_run(runs, 'xtreme_up_indic', 'xs_wo_cot', 'wo_cot', 'XS', xqa_result(5), curve=[(0, 10.0), (5, 40.0)])
  write_run(runs, 'xtreme_up_indic', 'xs_wo_instruction', 'wo_instruction', 'XS', xqa_result(3),
            curve=[(0, 0.0), (5, 30.0)])
  write_run(runs, 'xtreme_up_indic', 'xs_distilled_cot', 'distilled_cot', 'XS', xqa_result(6))
  labels = [True, False, True, False, True, True]
  xor = metrics.score_xor_attriqa(labels, [True, False, False, False, True, True], ['bn'] * 3 + ['fi'] * 3,
                                  [2.0, -1.0, 0.5, -2.0, 1.0, 3.0], seed=0, n_resamples=50)
  write_run(runs, 'xor_attriqa', 'xs_fiat', 'fiat', 'XS', xor)

  out = report.report(str(runs), str(tmp_path / 'out'))
  assert out['runs'] == 8  # 7 runs + fine-tune standing in as Table 3's last row

  t2 = read_csv(tmp_path / 'out' / 'table2.csv')
  assert t2[0][3:] == ['XOR-AttriQA O(100) Acc / AUC-PR', 'XTREME-UP Indic O(1000) F1']
  by_method = {(r[0], r[2]): r[3:] for r in t2[1:]}
  # headline: mean F1 over as and mr (hi is high-resource), the same number metrics.py computes
  assert by_method[('XS', 'FIAT')][1].startswith(f"{fiat['headline']['value']:.1f} [")
  assert by_method[('—', 'ICL')][1].startswith(f"{icl['headline']['value']:.1f}")
  gain = fiat['headline']['value'] - max(icl['headline']['value'], xqa_result(2)['headline']['value'])
  assert by_method[('', 'Gain over best baseline (XS)')][1] == f'{gain:+.1f} (vs ICL)'
  acc = xor['headline']['accuracy_mean_over_languages']['value']
  auc = xor['headline']['auc_pr_mean_over_languages']['value']
  assert by_method[('XS', 'FIAT')][0].startswith(f'{acc:.1f} [') and f' / {auc:.1f} [' in by_method[('XS', 'FIAT')][0]

  t3 = read_csv(tmp_path / 'out' / 'table3.csv')
  assert [r[2] for r in t3[1:]] == ['Few-shot ICL', 'FIAT', 'w/o CoT-augmented tuning',
                                    'w/o Instruction-augmented tuning', 'w/o Instruction-tuned base model']
  appendix = read_csv(tmp_path / 'out' / 'appendix_xtreme_up_indic.csv')
  assert appendix[0] == ['θ_τ', 'Method', 'as', 'hi', 'mr']
  fiat_row = next(r for r in appendix if r[1] == 'FIAT')
  assert fiat_row[2:] == [f"{fiat['per_language'][lang]['f1']:.1f}" for lang in ('as', 'hi', 'mr')]

  fig4 = read_csv(tmp_path / 'out' / 'figure4.csv')
  gains = {r[2]: r[4] for r in fig4[1:]}
  base = xqa_result(5)['headline']['value']
  assert gains['Distilled CoT (Hsieh et al., 2023)'] == f"{xqa_result(6)['headline']['value'] - base:+.1f}"

  rel = read_csv(tmp_path / 'out' / 'reliance.csv')
  stored, empty, shuffled = (xqa_result(k)['headline']['value'] for k in (7, 3, 1))
  assert rel[1][2:] == ['f1', f'{stored:.1f}', f'{empty:.1f}', f'{shuffled:.1f}', f'{stored - empty:+.1f}',
                        f'{stored - shuffled:+.1f}']
  for png in ('figure3.png', 'figure5.png'):
    with open(tmp_path / 'out' / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert '## Table 2' in (tmp_path / 'out' / 'report.md').read_text()
  assert report.eval_curve(str(runs / 'xtreme_up_indic' / 'xs_wo_cot'), 'f1') == [(0, 10.0), (5, 40.0)]


def test_main_reports_errors_plainly(tmp_path, capsys):
  assert report.main(['--runs_dir', str(tmp_path)]) == 1
  assert 'no finished run' in capsys.readouterr().err
  bad = tmp_path / 'x' / 'y'
  bad.mkdir(parents=True)
  (bad / 'metrics.json').write_text('{"experiment": {}}')
  assert report.main(['--runs_dir', str(tmp_path)]) == 1
  assert 'not a finished run' in capsys.readouterr().err


def test_figure6_gains_from_the_instruction_per_base_and_language(tmp_path, capsys):
  runs = tmp_path / 'runs'
  # with I_τ minus without: the instruction-tuned τ gets its first 6 vs 3 answers right, the plain τ its first 4
  # vs answers 1-4 (examples 0..7 are as, hi, mr, as, hi, mr, as, mr)
  on_it = write_run(runs, 'xtreme_up_indic', 'xs_wo_cot', 'wo_cot', 'XS', xqa_result(6))
  off_it = write_run(runs, 'xtreme_up_indic', 'xs_wo_instruction', 'wo_instruction', 'XS', xqa_result(3))
  on_plain = write_run(runs, 'xtreme_up_indic', 'xs_plain_wo_cot', 'plain_wo_cot', 'XS', xqa_result(4))
  off_plain = write_run(runs, 'xtreme_up_indic', 'xs_plain_wo_instruction', 'plain_wo_instruction', 'XS',
                        metrics.score_xtreme_up(TARGETS, ['wrong'] + TARGETS[1:5] + ['wrong'] * 3, LANGS, seed=0,
                                                n_resamples=50))
  assert report.main(['--runs_dir', str(runs), '--out_dir', str(tmp_path / 'out')]) == 0
  printed = capsys.readouterr().out
  rows = read_csv(tmp_path / 'out' / 'figure6.csv')
  assert rows[0] == ['Setting', 'τ', 'Language', 'Gain from I_τ, instruction-tuned τ', 'Gain from I_τ, plain τ']
  # as (0, 3, 6): IT 2/3 vs 1/3 right, plain 2/3 vs 1/3; hi (1, 4): IT 2/2 vs 1/2, plain 1/2 vs 2/2;
  # mr (2, 5, 7): IT 2/3 vs 1/3, plain 1/3 vs 1/3
  for row, lang in zip(rows[1:4], ('as', 'hi', 'mr')):
    expected = [on[lang]['f1'] - off[lang]['f1'] for on, off in ((on_it['per_language'], off_it['per_language']),
                                                                 (on_plain['per_language'], off_plain['per_language']))]
    assert row == ['xtreme_up_indic', 'XS', lang] + [f'{g:+.1f}' for g in expected]
  assert [r[3:] for r in rows[1:4]] == [['+33.3', '+33.3'], ['+50.0', '-50.0'], ['+33.3', '+0.0']]
  head_it = on_it['headline']['value'] - off_it['headline']['value']  # mean over as and mr (hi: high-resource)
  head_plain = on_plain['headline']['value'] - off_plain['headline']['value']
  assert rows[4] == ['xtreme_up_indic', 'XS', 'mean (headline)', f'{head_it:+.1f}', f'{head_plain:+.1f}']
  assert (f'{head_it:+.1f}', f'{head_plain:+.1f}') == ('+33.3', '+16.7')
  assert '## Figure 6' in printed and '| xtreme_up_indic | XS | mean (headline) | +33.3 | +16.7 |' in printed
  assert (tmp_path / 'out' / 'figure6.md').read_text().startswith('## Figure 6')
  with open(tmp_path / 'out' / 'figure6.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert '![figure6.png](figure6.png)' in (tmp_path / 'out' / 'report.md').read_text()
