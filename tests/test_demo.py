"""`make demo` end to end at --quick scale: every row runs through the real recipes and the report has them."""
import json
import os

from fiat_jax import demo
from fiat_jax import miniature
from fiat_jax import readers
from fiat_jax.beta import store


def test_quick_demo_runs_every_row_and_beta_writes_the_rationales(tmp_path, capsys):
  out = tmp_path / 'demo'
  assert demo.main(['--quick', f'--out_dir={out}']) == 0
  printed = capsys.readouterr().out
  for title in ('| — | L | ICL |', '| XS | — | Fine-tune |', '| XS | L | FIAT |', 'w/o CoT-augmented tuning'):
    assert title in printed, title
  for name, row, _ in demo.ROWS:
    m = json.loads((out / 'runs' / 'miniature' / name / 'metrics.json').read_text())
    assert m['experiment']['row'] == row
    assert m['test']['n'] == demo.SIZES['test']
    assert 0.0 <= m['test']['mean_over_languages']['f1'] <= 100.0
  assert (out / 'report' / 'figure5.png').stat().st_size > 0

  # Every split's rationale comes from β (the local checkpoint the demo trained), one per example; none is the
  # generator's gold chain of thought.
  records = store.latest_by_example(str(out / 'rationales'))
  data_dir = str(out / 'world' / 'data')
  gold = {}
  for split in readers.SPLITS:
    for ex in readers.read_split('xtreme_up_xqa', data_dir, split, miniature.LANGUAGES):
      gold[ex['id']] = ex
  assert set(records) == set(gold)
  assert all(r['beta'].startswith('local:') and r['beta'].endswith(os.path.join('world', 'beta'))
             for r in records.values())
  generator = {}  # the generator's own chains of thought, regenerated as write_release draws the splits
  for k, (split, n) in enumerate(sorted(demo.SIZES.items())):
    generator.update({(ex['question'], ex['context']): ex['rationale'] for ex in miniature.examples(n, k)})
  assert len(generator) == len(gold)
  assert not any(r['rationale'] == generator[(gold[i]['question'], gold[i]['context'])] for i, r in records.items())
