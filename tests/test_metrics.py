"""Metrics against hand-worked values, and `fiat score` end to end."""
import json
import math
import os

import pytest

from fiat_jax.data import metrics
from fiat_jax.data import scoring

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


@pytest.mark.parametrize('text, expected', [
    ('The Quick, Brown Fox!', 'quick brown fox'),
    ('Theatre of an era', 'theatre of era'),  # Articles only as whole words.
    ('  No   Answer. ', 'no answer'),
    ('U.S.-based', 'usbased'),  # ASCII punctuation is deleted, not replaced by a space.
    ('東京（とうきょう）。', '東京（とうきょう）。'),  # Non-ASCII punctuation stays.
    ('Dhaka (ঢাকা)', 'dhaka ঢাকা'),
    ('Москва — Столица', 'москва — столица'),
    ('', ''),
])
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


@pytest.mark.parametrize('target, prediction, f1, em', [
    ('the Mughal emperor Shah Jahan', 'Shah Jahan', 2 / 3, 0.0),
    ('No Answer', 'no answer.', 1.0, 1.0),
    ('No Answer', 'Shah Jahan', 0.0, 0.0),
    ('', '', 0.0, 1.0),  # The official scorer: F1 0 (no shared token), EM 1.
    ('Dispur', '', 0.0, 0.0),
    ('x y y z', 'y y y', 4 / 7, 0.0),  # Repeated tokens count at most as often as in the target.
    ('187,888', '187888', 1.0, 1.0),
    ('Dhaka (ঢাকা)', 'ঢাকা', 2 / 3, 0.0),
    ('27 May 1703', 'May 27, 1703', 1.0, 0.0),
])
def test_squad_f1_em(target, prediction, f1, em):
  assert metrics.squad_f1(target, prediction) == pytest.approx(f1, abs=1e-12)
  assert metrics.squad_em(target, prediction) == em


def test_squad_means():
  targets = ['the Mughal emperor Shah Jahan', 'No Answer', 'No Answer', '', 'x y y z']
  predictions = ['Shah Jahan', 'no answer.', 'Shah Jahan', '', 'y y y']
  expected = {'f1': (2 / 3 + 1 + 0 + 0 + 4 / 7) / 5 * 100, 'em': 40.0}
  result = metrics.squad(targets, predictions)
  assert result['f1'] == pytest.approx(expected['f1'], abs=1e-9)
  assert result['em'] == pytest.approx(expected['em'], abs=1e-9)
  with pytest.raises(ValueError, match='5 targets but 4 predictions'):
    metrics.squad(targets, predictions[:4])


def test_accuracy_and_auc_pr_with_ties():
  assert metrics.accuracy(['yes', 'no', 'no'], ['yes', 'yes', 'no']) == pytest.approx(200 / 3)
  # Tied scores form one threshold: P@{0.9}=1 at recall 1/2, P@{0.5}=2/3 at recall 1.
  assert metrics.auc_pr([True, False, True, False], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(
      100 * (0.5 * 1 + 0.5 * 2 / 3))
  assert metrics.auc_pr([True, False, False, True], [0.0] * 4) == pytest.approx(50.0)  # All tied.
  assert math.isnan(metrics.auc_pr([False, False], [0.3, 0.1]))
  assert metrics.auc_pr([True, False, True], [0.2, 0.4, 0.9]) == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))


def test_xtreme_up_tables_headline_and_ci():
  languages = ['as', 'as', 'hi', 'bn']
  targets = ['Dispur', 'No Answer', 'New Delhi', 'Pather Panchali']
  predictions = ['Dispur', 'Dispur', 'Delhi', 'the Pather Panchali film']
  result = metrics.score_xtreme_up(targets, predictions, languages, seed=3, n_resamples=200)
  table = result['per_language']
  assert table['as'] == {'f1': 50.0, 'em': 50.0, 'n': 2}
  assert table['hi']['f1'] == pytest.approx(200 / 3) and table['hi']['em'] == 0.0
  assert table['bn']['f1'] == pytest.approx(80.0)
  assert result['overall']['f1'] == pytest.approx((1 + 0 + 2 / 3 + 0.8) / 4 * 100)
  assert result['mean_over_languages']['f1'] == pytest.approx((50 + 200 / 3 + 80) / 3)
  headline = result['headline']
  assert headline['languages'] == ['as', 'bn']  # hi is high-resource: not in the headline.
  assert headline['value'] == pytest.approx(65.0)
  low, high = headline['ci95']
  assert 40.0 <= low <= 65.0 <= high <= 90.0
  again = metrics.score_xtreme_up(targets, predictions, languages, seed=3, n_resamples=200)
  assert again['headline']['ci95'] == headline['ci95']  # Explicit seed: same interval.
  perfect = metrics.score_xtreme_up(targets, targets, languages, seed=0, n_resamples=50)
  assert perfect['headline']['ci95'] == [100.0, 100.0]
  assert metrics.under_represented(['as', 'hi', 'bn', 'ja', 'ko', 'te']) == ['as', 'bn', 'te']


def test_xor_attriqa_scores():
  result = metrics.score_xor_attriqa([True, False, True, False], [True, True, True, False],
                                     ['bn', 'bn', 'fi', 'fi'], [2.0, 1.0, 0.5, -1.0], n_resamples=100)
  assert result['per_language']['bn'] == {'accuracy': 50.0, 'auc_pr': 100.0, 'n': 2}
  assert result['per_language']['fi'] == {'accuracy': 100.0, 'auc_pr': 100.0, 'n': 2}
  assert result['overall'] == {'accuracy': 75.0, 'auc_pr': pytest.approx(100 * (0.5 + 0.5 * 2 / 3))}
  assert result['headline']['accuracy_mean_over_languages']['value'] == 75.0
  assert result['headline']['auc_pr_mean_over_languages']['value'] == 100.0
  text_only = metrics.score_xor_attriqa([True], [True], ['ja'], n_resamples=10)
  assert text_only['headline']['auc_pr_mean_over_languages'] is None


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
  return str(path)


def test_fiat_score_xtreme_up(tmp_path, capsys):
  gold = os.path.join(TESTDATA, 'xtreme_up')
  # Gold order: hi test (Yamuna: No Answer, Taj Mahal, New Delhi), then as test (No Answer, Dispur).
  preds = _write_jsonl(tmp_path / 'p.jsonl', [{'prediction': p} for p in
                                              ['No Answer', 'Shah Jahan', 'new delhi', 'No Answer', 'Guwahati']])
  argv = ['--task', 'xtreme_up_xqa', '--gold', gold, '--predictions', preds, '--languages', 'hi,as',
          '--bootstrap', '20']
  assert scoring.main(argv) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['per_language']['hi']['f1'] == pytest.approx((1 + 2 / 3 + 1) / 3 * 100)
  assert out['per_language']['hi']['em'] == pytest.approx(200 / 3)
  assert out['per_language']['as'] == {'f1': 50.0, 'em': 50.0, 'n': 2}
  assert out['headline']['value'] == 50.0 and out['headline']['languages'] == ['as']
  short = _write_jsonl(tmp_path / 'short.jsonl', [{'prediction': 'x'}])
  assert scoring.main(argv[:5] + [short] + argv[6:]) == 1
  assert '1 predictions but 5 gold examples' in capsys.readouterr().err


def test_fiat_score_xor_attriqa(tmp_path, capsys):
  gold = os.path.join(TESTDATA, 'xor_attriqa', 'in-language', 'ja.jsonl')  # Labels: T, F, T.
  rows = [{'prediction': 'yes', 'score': 1.5}, {'prediction': 'No', 'score': -0.5},
          {'prediction': 'no', 'score': 0.2}]
  argv = ['--task', 'xor_attriqa', '--gold', gold, '--bootstrap', '20', '--predictions']
  assert scoring.main(argv + [_write_jsonl(tmp_path / 'a.jsonl', rows)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['overall'] == {'accuracy': pytest.approx(200 / 3), 'auc_pr': 100.0}
  assert out['per_language']['ja']['n'] == 3
  no_scores = [{'prediction': r['prediction']} for r in rows]
  assert scoring.main(argv + [_write_jsonl(tmp_path / 'b.jsonl', no_scores)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert 'auc_pr' not in out['overall'] and out['headline']['auc_pr_mean_over_languages'] is None
  assert scoring.main(argv + [_write_jsonl(tmp_path / 'c.jsonl', rows[:2] + no_scores[2:])]) == 1
  assert "c.jsonl:3: field 'score': missing" in capsys.readouterr().err
  bad = rows[:2] + [{'prediction': 'maybe', 'score': 0.0}]
  assert scoring.main(argv + [_write_jsonl(tmp_path / 'd.jsonl', bad)]) == 1
  assert "d.jsonl:3: field 'prediction'" in capsys.readouterr().err
