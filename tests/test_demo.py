"""`make demo` end to end at --quick scale: every row runs through the real recipes and the report has them."""
import json
import os

from fiat_jax.beta import store
from fiat_jax.data import formatting
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
      return {7: ' Goa', 8: 'Mira \nWhere does Ravi live? Pune', 9: 'Agra'}[ids[0]]

  def generate(model, variables, prompts, **kw):
    assert [len(p) for p in prompts] == [5, 7, 5]  # BOS + the prompt's tokens
    return decoding.GenerateResult(tokens=[[7], [8], [9]], logprobs=[[0.0]] * 3)

  monkeypatch.setattr(decoding, 'generate', generate)
  assert demo.reader_exact_match(demo.tau_config(128), {}, Vocab(), pairs) == {
      'exact': 2, 'n': 3, 'em': 200 / 3, 'worst': {'answer': 'Pune', 'exact': 0, 'n': 1}}


def test_reading_pairs_are_held_out_one_hop_questions():
  pairs = miniature.reading_pairs(200, demo.READER_SEED)
  training = {p for p, _ in miniature.instruction_mixture(32 * demo.Scale().tau_it_steps, 202)}
  assert not training & {p for p, _ in pairs}
  for prompt, answer in pairs:
    passage = prompt.split('Passage: ')[1].split('\nQuestion:')[0]
    assert answer == miniature.NO_ANSWER or answer in passage.replace('.', '').split(' ')
  assert 0.2 < sum(a == miniature.NO_ANSWER for _, a in pairs) / len(pairs) < 0.5


def test_the_reasoning_task_answers_from_the_passage_whatever_its_reasoning_line_says():
  pairs = miniature.reasoning_pairs(400, 9)
  wrong = 0
  for prompt, answer in pairs:
    assert prompt.startswith(formatting.load_i_tau('xtreme_up_xqa')) and prompt.endswith('\nAnswer:')
    question = prompt.split('Question: ')[1].split('\n')[0]
    passage = prompt.split('Passage: ')[1].split('\n')[0]
    reasoning = prompt.split(formatting.RATIONALE_HEADER + ' ')[1].split('\n')[0]
    rel, x, p, ledger, p2, place = reasoning.replace('.', '').split()
    assert question.startswith(f'Where does the {rel} of {x} ') and p == p2
    assert f'{rel} {x} {p}.' in passage  # the first look-up is always right
    stated = [f for f in passage.split('. ') if f.startswith(f'{ledger} {p} ')]
    assert answer == (stated[0].rstrip('.').split()[-1] if stated else miniature.NO_ANSWER)
    wrong += place != (answer if stated else miniature.UNKNOWN)
  assert 0.35 < wrong / len(pairs) < 0.45  # wrong_rate 0.4: the answer is the passage's, not the reasoning's
  mixture = miniature.instruction_mixture(10, 3)
  assert [formatting.RATIONALE_HEADER in p for p, _ in mixture] == [False, True] * 5


def test_every_look_up_has_a_one_token_key_followed_by_its_value(tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  vocab = seqio.SentencePieceVocabulary(miniature.train_sentencepiece(str(tmp_path / 'sp'), miniature.tokenizer_lines()))
  piece = lambda text: [vocab.tokenizer.id_to_piece(i) for i in vocab.encode(text)]
  for word in miniature.NAMES + miniature.CITIES:  # one piece each, in a passage and in every question template
    assert piece(f'lives {word} Goa.') == ['▁lives', f'▁{word}', '▁Goa', '.'], word
  assert piece('Ravi-এর বন্ধু')[0] == '▁Ravi' and piece('Где живёт друг Ravi?')[-2:] == ['▁Ravi', '?']
  ex = miniature.examples(1, 5, answerable_rate=1.0)[0]
  rel, x, p, attr, p2, city = ex['rationale'].replace('.', '').split()
  # The chain of thought is the passage's two facts: the key is directly followed by the value looked up.
  assert f'{rel} {x} {p}.' in ex['context'] and f'{attr} {p2} {city}.' in ex['context'] and p == p2
  assert city == ex['target'] and x in ex['question']
  assert not [p for p, a in miniature.reading_pairs(50, demo.READER_SEED) if vocab.tokenizer.unk_id() in
              vocab.encode(p + ' ' + a)]


def test_reading_texts_grow_from_one_chain_to_many_with_a_question_per_fact():
  texts = miniature.reading_texts(40, 3)  # the curriculum ramps over the first quarter (10 rows), then 4 chains
  facts = [t.split('\n')[0].count('.') for t in texts]
  assert max(facts[:3]) <= 2 and min(facts[10:]) >= 4
  fact_set = lambda line: sorted(f.rstrip('.') for f in line.split('. '))
  for text in texts:
    passage, restated = text.split('\n')[:2]
    assert fact_set(passage) == fact_set(restated) and '..' not in restated  # the facts restated
  last = texts[-1].split('\n')
  assert sum('?' in line for line in last) >= 8


def test_quick_demo_runs_every_row_and_beta_writes_the_rationales(tmp_path, capsys):
  out = tmp_path / 'demo'
  assert demo.main(['--quick', f'--out_dir={out}']) == 0
  printed = capsys.readouterr().out
  for title in ('| — | L | ICL |', '| XS | — | Fine-tune |', '| XS | L | FIAT |', 'w/o CoT-augmented tuning',
                'w/o Instruction-augmented tuning', 'premise 2', 'premise 1: β\'s few-shot two-hop test F1'):
    assert title in printed, title
  stages = [name for name, _ in demo.QUICK.seconds]
  for name, _, _ in demo.ROWS:  # a progress line with an ETA before every row
    assert f'demo [{stages.index(name) + 1}/{len(stages)}] {name}: elapsed ' in printed
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
  assert all(r['beta'].startswith('local:') and r['beta'].endswith(os.path.join('world', 'readers', 'beta'))
             for r in records.values())
  generator = {}  # the generator's own chains of thought, regenerated as write_release draws the splits
  for k, (split, n) in enumerate(sorted(demo.SIZES.items())):
    generator.update({(ex['question'], ex['context']): ex['rationale'] for ex in miniature.examples(n, k)})
  assert len(generator) == len(gold)
  assert not any(r['rationale'] == generator[(gold[i]['question'], gold[i]['context'])] for i, r in records.items())


def test_the_packaged_readers_say_how_they_were_made_and_what_they_measured():
  with open(os.path.join(demo.READERS_DIR, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  assert manifest['command'].startswith('python -m fiat_jax.demo pretrain')
  assert manifest['steps'] == {'tau_base': 1800, 'beta_base': 1200, 'beta': 300, 'tau_it': 900}
  # The manifest's skills are what these readers measure (premise 2 met: README, "The demo").
  measured = demo.measure_readers(demo.READERS_DIR)
  assert manifest['skills'] == {k: v['em'] for k, v in measured.items()}
  assert manifest['skills']['instruction_tuned'] >= demo.READER_PREMISE
  assert sorted(os.listdir(demo.READERS_DIR)) == ['beta', 'beta_base', 'manifest.json', 'sp.model', 'tau_base',
                                                   'tau_it']
  for name in ('tau_base', 'beta_base', 'tau_it', 'beta'):
    assert os.path.getsize(os.path.join(demo.READERS_DIR, name, 'model.safetensors')) < 3_000_000


def test_readers_that_are_not_a_pretrain_folder_are_refused_by_name(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / 'readers').mkdir()
  res = subprocess.run([sys.executable, '-m', 'fiat_jax.demo', f'--readers={tmp_path / "readers"}',
                        f'--out_dir={tmp_path / "out"}'], capture_output=True, text=True, check=False)
  assert res.returncode == 2
  assert f'--readers={tmp_path / "readers"}: no manifest.json there' in res.stderr
  assert not (tmp_path / 'out').exists()  # refused before anything is written
