"""`make demo` end to end at --quick scale: every row runs through the real recipes and the report has them."""
import json
import os

from fiat_jax.beta import store
from fiat_jax.data import readers
from fiat_jax import demo
from fiat_jax import miniature
from fiat_jax.model import decoding


def test_agreement_row_counts_normalised_equal_answers_and_distinct_ones():
  beta = {'a': 'Goa', 'b': 'No Answer', 'c': 'Pune', 'd': 'Agra'}
  row = demo.agreement_row('xs_fiat', {'a': 'goa.', 'b': 'No Answer', 'c': 'Surat', 'd': 'Surat'}, beta)
  assert row == {'run': 'xs_fiat', 'n': 4, 'agree': 2, 'distinct': 3, 'top': 'Surat', 'top_count': 2}


def test_reader_exact_match_counts_the_greedy_answers(monkeypatch):
  pairs = [('Where does Asha live?', 'Goa'), ('Who is the friend of Ravi?', 'Mira'), ('Where does Vik work?', 'Pune')]

  class Vocab:
    eos_id, pad_id = 1, 0

    def encode(self, text):
      return [3] * len(text.split())

    def decode(self, ids):
      return {7: ' Goa', 8: 'Mira ', 9: 'Agra'}[ids[0]]

  def generate(model, variables, prompts, **kw):
    assert [len(p) for p in prompts] == [5, 7, 5]  # BOS + the prompt's tokens
    return decoding.GenerateResult(tokens=[[7], [8], [9]], logprobs=[[0.0]] * 3)

  monkeypatch.setattr(decoding, 'generate', generate)
  assert demo.reader_exact_match(demo.tau_config(128), {}, Vocab(), pairs) == {'exact': 2, 'n': 3, 'em': 200 / 3}


def test_reading_pairs_are_held_out_one_hop_questions():
  pairs = miniature.reading_pairs(50, demo.READER_SEED)
  training = {p for p, _ in miniature.instruction_pairs(32 * demo.Scale().tau_it_steps, 202)}
  assert not training & {p for p, _ in pairs}
  for prompt, answer in pairs:
    passage = prompt.split('Passage: ')[1].split('\nAnswer:')[0]
    assert answer == miniature.NO_ANSWER or answer in passage.split(' ') or answer + '.' in passage.split(' ')


def test_the_world_tokenizer_has_a_piece_for_every_reading_prompt(tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  vocab = seqio.SentencePieceVocabulary(miniature.train_sentencepiece(str(tmp_path / 'sp'), miniature.tokenizer_lines()))
  unk = vocab.tokenizer.unk_id()
  held_out = miniature.reading_pairs(50, demo.READER_SEED)
  assert not [p for p, a in held_out if unk in vocab.encode(p + ' ' + a)]
  # whole words, as in the passages: the question's "work" is the piece "▁work", not "▁wor" + "k"
  assert [vocab.tokenizer.id_to_piece(i) for i in vocab.encode('Where does Vik work?')] == [
      '▁Where', '▁does', '▁Vik', '▁work', '?']


def test_quick_demo_runs_every_row_and_beta_writes_the_rationales(tmp_path, capsys):
  out = tmp_path / 'demo'
  assert demo.main(['--quick', f'--out_dir={out}']) == 0
  printed = capsys.readouterr().out
  for title in ('| — | L | ICL |', '| XS | — | Fine-tune |', '| XS | L | FIAT |', 'w/o CoT-augmented tuning',
                'w/o Instruction-augmented tuning', 'premise 2'):
    assert title in printed, title
  for k, (name, _, _) in enumerate(demo.ROWS):  # a progress line with an ETA before every row
    assert f'demo [{k + 6}/{len(demo.QUICK.seconds)}] {name}: elapsed ' in printed
  for name, row, _ in demo.ROWS:
    m = json.loads((out / 'runs' / 'miniature' / name / 'metrics.json').read_text())
    assert m['experiment']['row'] == row
    assert m['test']['n'] == demo.SIZES['test']
    assert 0.0 <= m['test']['mean_over_languages']['f1'] <= 100.0
  assert (out / 'report' / 'figure5.png').stat().st_size > 0
  reader = json.loads((out / 'world' / 'reader.json').read_text())
  assert reader['instruction_tuned']['n'] == demo.READER_EXAMPLES
  assert f'{reader["instruction_tuned"]["em"]:.1f}%' in printed
  met = reader['instruction_tuned']['em'] >= demo.READER_PREMISE
  assert f'>= {demo.READER_PREMISE:.0f}%: {"met" if met else "not met"}' in printed

  # The agreement table: the ICL row is β against itself; every τ row is counted from its own predictions file.
  rows = demo.agreement(str(out))
  assert [r['run'] for r in rows] == ['icl'] + [name for name, _, _ in demo.ROWS[1:]]
  assert rows[0]['agree'] == rows[0]['n'] == demo.SIZES['test']
  preds = [json.loads(line) for line in (out / 'runs' / 'miniature' / 'xs_fiat' / 'predictions_test.jsonl').open()]
  assert rows[2]['distinct'] == len({p['prediction'] for p in preds})
  assert f'| xs_fiat | {rows[2]["agree"]}/200 | {rows[2]["distinct"]} |' in printed

  # Every split's rationale comes from β (the local checkpoint the demo trained), one per example; none is the
  # generator's gold chain of thought.
  data_dir = str(out / 'world' / 'data')
  gold = {}
  for split in readers.SPLITS:
    for ex in readers.read_split('xtreme_up_xqa', data_dir, split, miniature.LANGUAGES):
      gold[ex['id']] = ex
  records = {r['example_id']: r for r in store.read_records(str(out / 'rationales'))}
  assert set(records) == set(gold)
  assert all(r['beta'].startswith('local:') and r['beta'].endswith(os.path.join('world', 'beta'))
             for r in records.values())
  generator = {}  # the generator's own chains of thought, regenerated as write_release draws the splits
  for k, (split, n) in enumerate(sorted(demo.SIZES.items())):
    generator.update({(ex['question'], ex['context']): ex['rationale'] for ex in miniature.examples(n, k)})
  assert len(generator) == len(gold)
  assert not any(r['rationale'] == generator[(gold[i]['question'], gold[i]['context'])] for i, r in records.items())
