"""The embedded miniature world: a synthetic multilingual two-hop QA task in the XTREME-UP cross-lingual QA layout.

An English passage is a ledger of facts, each written so that the person looked up is directly followed by what
is looked up (the form `A B ... A -> B` a small Transformer learns in a few hundred updates: benchmarks/recall.py):
`friend Asha Ravi.` (Ravi is the friend of Asha) and `lives Ravi Pune.` (Ravi lives in Pune). A question in
Bengali, Hindi, Marathi, Urdu or Russian asks where the friend / sister / teacher of someone lives or works:
two look-ups (Asha -> Ravi, then Ravi -> Pune), and `No Answer` when the passage does not say where that person
lives or works. Every name and city is one token (a user-defined piece of the world's SentencePiece model), so
every look-up has a one-token key. The generator also writes the chain of thought β learns from (the two facts,
in the ledger's form), the I_β prompt files, the reading text τ is pre-trained on (passages with many one-hop
questions each), τ's instruction-tuning mixture (other tasks: English one-hop questions in the instruction style,
and English two-hop questions in FIAT's input layout with a reasoning line that is often wrong) and the tokenizer.
Nothing here is downloaded.
"""
import json
import os
import random

import numpy as np

from fiat_jax.beta import prompts
from fiat_jax.data import formatting
from fiat_jax.data import readers

LANGUAGES = ('bn', 'hi', 'mr', 'ur', 'ru')
RELATIONS = ('friend', 'sister', 'teacher')
ATTRIBUTES = ('live', 'work')
LEDGER = {'live': 'lives', 'work': 'works'}  # the ledger's word for a place fact
ENGLISH = {'live': 'live', 'work': 'work'}  # "Where does P live?"
UNKNOWN = 'unknown'  # the chain of thought's place when the passage gives none
# {X} is the person asked about; every template is one (relation, attribute) question of one language.
TEMPLATES = {
    'bn': {('friend', 'live'): '{X}-এর বন্ধু কোথায় থাকে?', ('friend', 'work'): '{X}-এর বন্ধু কোথায় কাজ করে?',
           ('sister', 'live'): '{X}-এর বোন কোথায় থাকে?', ('sister', 'work'): '{X}-এর বোন কোথায় কাজ করে?',
           ('teacher', 'live'): '{X}-এর শিক্ষক কোথায় থাকেন?', ('teacher', 'work'): '{X}-এর শিক্ষক কোথায় কাজ করেন?'},
    'hi': {('friend', 'live'): '{X} के दोस्त कहाँ रहते हैं?', ('friend', 'work'): '{X} के दोस्त कहाँ काम करते हैं?',
           ('sister', 'live'): '{X} की बहन कहाँ रहती है?', ('sister', 'work'): '{X} की बहन कहाँ काम करती है?',
           ('teacher', 'live'): '{X} के शिक्षक कहाँ रहते हैं?', ('teacher', 'work'): '{X} के शिक्षक कहाँ काम करते हैं?'},
    'mr': {('friend', 'live'): '{X} चा मित्र कुठे राहतो?', ('friend', 'work'): '{X} चा मित्र कुठे काम करतो?',
           ('sister', 'live'): '{X} ची बहीण कुठे राहते?', ('sister', 'work'): '{X} ची बहीण कुठे काम करते?',
           ('teacher', 'live'): '{X} चे शिक्षक कुठे राहतात?', ('teacher', 'work'): '{X} चे शिक्षक कुठे काम करतात?'},
    'ur': {('friend', 'live'): '{X} کا دوست کہاں رہتا ہے؟', ('friend', 'work'): '{X} کا دوست کہاں کام کرتا ہے؟',
           ('sister', 'live'): '{X} کی بہن کہاں رہتی ہے؟', ('sister', 'work'): '{X} کی بہن کہاں کام کرتی ہے؟',
           ('teacher', 'live'): '{X} کے استاد کہاں رہتے ہیں؟', ('teacher', 'work'): '{X} کے استاد کہاں کام کرتے ہیں؟'},
    'ru': {('friend', 'live'): 'Где живёт друг {X}?', ('friend', 'work'): 'Где работает друг {X}?',
           ('sister', 'live'): 'Где живёт сестра {X}?', ('sister', 'work'): 'Где работает сестра {X}?',
           ('teacher', 'live'): 'Где живёт учитель {X}?', ('teacher', 'work'): 'Где работает учитель {X}?'},
}
NAMES = ('Asha', 'Ravi', 'Mira', 'Omar', 'Lena', 'Ivan', 'Nina', 'Arun', 'Sara', 'Karim', 'Tara', 'Vik', 'Zoya',
         'Dev', 'Anya', 'Boris', 'Leela', 'Farid', 'Gita', 'Hari', 'Irina', 'Jamal', 'Kiran', 'Lata', 'Mohan',
         'Nadia', 'Oleg', 'Priya', 'Rahim', 'Sunil', 'Uma', 'Vera', 'Yusuf', 'Amit', 'Bina', 'Chen')
CITIES = ('Pune', 'Delhi', 'Dhaka', 'Lahore', 'Kazan', 'Goa', 'Agra', 'Surat', 'Khulna', 'Multan', 'Omsk', 'Nagpur',
          'Patna', 'Sylhet', 'Quetta', 'Tomsk', 'Indore', 'Kochi', 'Rajshahi', 'Karachi', 'Samara', 'Jaipur')
NO_ANSWER = readers.NO_ANSWER
CHAINS = 3  # people asked about per passage (the question's chain and two distractors)
I_BETA_INSTRUCTION = 'Think step by step in English, then answer with a place from the passage or No Answer.'
IT_INSTRUCTION = ('Answer the question from the passage with a span copied from it. If the passage does not say, '
                  'reply "No Answer".')


def draw_chains(rng: random.Random, chains: int, answerable: bool) -> list[dict]:
  """`chains` disjoint (person, relation, relative, attribute, city) chains; the first one's city is left out of
  the passage when not answerable (and sometimes another's, so a missing place is not a tell)."""
  people = rng.sample(NAMES, 2 * chains)
  cities = rng.sample(CITIES, chains)
  out = []
  for i in range(chains):
    out.append({'x': people[2 * i], 'rel': rng.choice(RELATIONS), 'p': people[2 * i + 1],
                'attr': rng.choice(ATTRIBUTES), 'city': cities[i], 'stated': i > 0 or answerable})
  for c in out[1:]:
    c['stated'] = rng.random() < 0.75
  return out


def facts_of(chains: list[dict]) -> list[str]:
  """The ledger's sentences of the chains (unordered)."""
  facts = [f'{c["rel"]} {c["x"]} {c["p"]}.' for c in chains]
  return facts + [f'{LEDGER[c["attr"]]} {c["p"]} {c["city"]}.' for c in chains if c['stated']]


def chain_of_thought(c: dict) -> str:
  """The two look-ups in the ledger's own form: `friend Asha Ravi. lives Ravi Pune.` (or `... Ravi unknown.`)."""
  return f'{c["rel"]} {c["x"]} {c["p"]}. {LEDGER[c["attr"]]} {c["p"]} {c["city"] if c["stated"] else UNKNOWN}.'


def make_example(rng: random.Random, language: str, answerable: bool, chains: int = CHAINS) -> dict:
  """One two-hop question with its passage, target and the gold chain of thought (the generator's, for β)."""
  drawn = draw_chains(rng, chains, answerable)
  facts = facts_of(drawn)
  rng.shuffle(facts)
  c = drawn[0]
  return {'question': TEMPLATES[language][(c['rel'], c['attr'])].format(X=c['x']), 'title': 'Friends and places',
          'context': ' '.join(facts), 'target': c['city'] if answerable else NO_ANSWER, 'language': language,
          'rationale': chain_of_thought(c)}


def examples(n: int, seed: int, languages=LANGUAGES, answerable_rate: float = 0.75, chains: int = CHAINS
             ) -> list[dict]:
  """n examples spread evenly over the languages, drawn from `seed`."""
  rng = random.Random(seed)
  return [make_example(rng, languages[i % len(languages)], rng.random() < answerable_rate, chains)
          for i in range(n)]


def write_release(root: str, sizes: dict[str, int], seed: int = 0) -> str:
  """Writes {root}/qa_cross_lang/{split}/{lang}.jsonl (the XTREME-UP v1.1 layout and fields); returns root."""
  for k, (split, n) in enumerate(sorted(sizes.items())):
    rows = examples(n, seed * 1000 + k)
    folder = os.path.join(root, readers.XTREME_UP_TASK_DIR, split)
    os.makedirs(folder, exist_ok=True)
    for lang in LANGUAGES:
      with open(os.path.join(folder, f'{lang}.jsonl'), 'w', encoding='utf-8') as f:
        for ex in rows:
          if ex['language'] == lang:
            f.write(json.dumps({key: ex[key] for key in readers.XTREME_UP_STRING_FIELDS}, ensure_ascii=False) + '\n')
  return root


def write_i_beta(folder: str, seed: int = 7) -> tuple[str, str]:
  """The miniature's I_β: instruction and one stand-alone exemplar (not from any split); returns both paths."""
  os.makedirs(folder, exist_ok=True)
  instruction = os.path.join(folder, 'i_beta_miniature.txt')
  with open(instruction, 'w', encoding='utf-8') as f:
    f.write(I_BETA_INSTRUCTION + '\n')
  exemplar = dict(examples(1, seed + 10_000, languages=('bn',), answerable_rate=1.0)[0], id='miniature-exemplar-1')
  exemplars = os.path.join(folder, 'exemplars_miniature.jsonl')
  with open(exemplars, 'w', encoding='utf-8') as f:
    f.write(json.dumps(exemplar, ensure_ascii=False) + '\n')
  return instruction, exemplars


def i_beta_messages(instruction_file: str, exemplars_file: str) -> list[dict]:
  """I_β as the β backend renders it (beta/prompts.py)."""
  task = 'xtreme_up_xqa'
  return prompts.i_beta_messages(prompts.load_instruction(task, instruction_file),
                                 prompts.load_exemplars(task, exemplars_file), task)


def cot_pairs(n: int, seed: int, i_beta: list[dict]) -> list[tuple[str, str]]:
  """β's training data: (I_β + x rendered as β sees it, " rationale\\nAnswer: y"); plenty of it."""
  out = []
  for ex in examples(n, seed):
    prompt = prompts.render_plain(prompts.prompt_messages(i_beta, ex, 'xtreme_up_xqa'))
    out.append((prompt, ' ' + prompts.format_output(ex['rationale'], ex['target'])[len(prompts.REASONING_CUE):]
                .strip()))
  return out


def one_hop_questions(rng: random.Random, chains: list[dict]) -> list[tuple[str, str]]:
  """Every English one-hop question a passage of these chains answers, shuffled, and one about someone it does
  not mention: (question, answer). Each is one look-up with a one-token key (`Where does Ravi live?` -> the city
  after Ravi in `lives Ravi Pune.`)."""
  out = [(f'Who is the {c["rel"]} of {c["x"]}?', c['p']) for c in chains]
  out += [(f'Where does {c["p"]} {ENGLISH[c["attr"]]}?', c['city'] if c['stated'] else NO_ANSWER) for c in chains]
  mentioned = {c['x'] for c in chains} | {c['p'] for c in chains}
  absent = rng.choice([nm for nm in NAMES if nm not in mentioned])
  out.append((f'Where does {absent} {rng.choice(list(ENGLISH.values()))}?', NO_ANSWER))
  rng.shuffle(out)
  return out


def reading_prompt(passage: str, question: str) -> str:
  """τ's instruction style (its other tasks): the instruction, the passage, then the question and the cue."""
  return f'{IT_INSTRUCTION}\n\nPassage: {passage}\nQuestion: {question}\nAnswer:'


def _passage(rng: random.Random, chains: list[dict]) -> str:
  facts = facts_of(chains)
  rng.shuffle(facts)
  return ' '.join(facts)


def reading_texts(n: int, seed: int, most_chains: int = 4, ramp: float = 0.25) -> list[str]:
  """The plain τ's pre-training text, in a curriculum from one chain of facts to `most_chains` over the first
  `ramp` of the rows, then `most_chains` (a long stay on few chains teaches shortcuts: with one chain, "Who is the
  friend of X?" needs no look-up): a passage, then its facts restated (in the same order or shuffled: each
  restated person is followed by what the passage says after them), then every one-hop question about it with its
  answer, many look-ups per row; and the release's kind of question (two-hop, in another language) without its
  answer, so the plain model has seen them."""
  rng, out = random.Random(seed), []
  ramp_rows = max(1, int(n * ramp))
  for i in range(n):
    chains = draw_chains(rng, min(most_chains, 1 + (most_chains * i) // ramp_rows), rng.random() < 0.75)
    passage = _passage(rng, chains)
    facts = [f.rstrip('.') for f in passage.split('. ')]
    if rng.random() < 0.5:
      rng.shuffle(facts)
    lines = [passage, '. '.join(facts) + '.']
    lines += [f'{q} {a}' for q, a in one_hop_questions(rng, chains)]
    c = chains[0]
    lines.append(TEMPLATES[rng.choice(LANGUAGES)][(c['rel'], c['attr'])].format(X=c['x']))
    out.append('\n'.join(lines))
  return out


def instruction_pairs(n: int, seed: int) -> list[tuple[str, str]]:
  """τ's instruction tuning (other tasks, the instruction style): English one-hop questions over passages of
  1 .. CHAINS + 1 chains, one question per example."""
  rng, out = random.Random(seed), []
  while len(out) < n:
    chains = draw_chains(rng, rng.randint(1, CHAINS + 1), rng.random() < 0.75)
    passage = _passage(rng, chains)
    out += [(reading_prompt(passage, q), a) for q, a in one_hop_questions(rng, chains)[:2]]
  return out[:n]


def reasoning_pairs(n: int, seed: int, wrong_rate: float = 0.4) -> list[tuple[str, str]]:
  """τ's instruction tuning, its reasoning task (other tasks with a reasoning line, as instruction mixtures carry
  chain-of-thought data): English two-hop questions ("Where does the friend of Asha live?") in the layout of FIAT's
  inputs (I_τ, the fields, the reasoning header, the cue) with a reasoning line in the ledger's form, of which
  `wrong_rate` misread the last look-up (a stated place read as another chain's or as unknown, a missing one read
  as another chain's; the header says the reasoning may be wrong). The answer is always the passage's: the task is
  to check the reasoning's last look-up against the passage, not to copy it."""
  i_tau = formatting.load_i_tau('xtreme_up_xqa')
  rng, out = random.Random(seed), []
  for _ in range(n):
    chains = draw_chains(rng, rng.randint(2, CHAINS + 1), rng.random() < 0.75)
    c = dict(chains[0])
    question = f'Where does the {c["rel"]} of {c["x"]} {ENGLISH[c["attr"]]}?'
    answer = c['city'] if c['stated'] else NO_ANSWER
    if rng.random() < wrong_rate:
      c.update(city=rng.choice(chains[1:])['city'], stated=not c['stated'] or rng.random() < 0.5)
    example = {'question': question, 'title': 'Friends and places', 'context': _passage(rng, chains)}
    out.append((formatting.format_inputs('xtreme_up_xqa', example, 'instruction_rationale', i_tau=i_tau,
                                         rationale=chain_of_thought(c)), answer))
  return out


def instruction_mixture(n: int, seed: int) -> list[tuple[str, str]]:
  """τ's whole instruction-tuning mixture: half one-hop reading questions, half the reasoning task, interleaved."""
  one_hop, reasoning = instruction_pairs(n - n // 2, seed), reasoning_pairs(n // 2, seed + 1)
  return [pair for two in zip(one_hop, reasoning) for pair in two] + one_hop[len(reasoning):]


def reading_pairs(n: int, seed: int) -> list[tuple[str, str]]:
  """Held-out one-hop English questions in τ's instruction style over passages of the release's size (CHAINS
  chains): how well a τ reads."""
  rng, out = random.Random(seed), []
  for _ in range(n):
    chains = draw_chains(rng, CHAINS, rng.random() < 0.75)
    question, answer = one_hop_questions(rng, chains)[0]
    out.append((reading_prompt(_passage(rng, chains), question), answer))
  return out


def tokenizer_lines(extra_texts=()) -> list[str]:
  """Text the SentencePiece model is trained on: the world, β's and τ's prompts (every I_τ / I_β word)."""
  lines = list(extra_texts) + [I_BETA_INSTRUCTION, IT_INSTRUCTION, NO_ANSWER, UNKNOWN]
  lines += [prompt + ' ' + answer for prompt, answer in instruction_pairs(300, 97)]
  lines += reading_texts(200, 98)
  for lang in LANGUAGES:
    lines += [t.format(X=nm) for t in TEMPLATES[lang].values() for nm in NAMES[:6]]
  for ex in examples(600, 99):
    lines += [ex['context'], ex['rationale'], ex['title']]
  return lines


def train_sentencepiece(prefix: str, lines: list[str], vocab_size: int = 1024) -> str:
  """A BPE SentencePiece model with seqio's ids (pad 0, eos 1, unk 2, no bos); returns the .model path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  # One rule (no-break space -> space) so the model carries a normalisation charsmap: with none, every load of
  # the tokenizer (seqio loads it once per task) logs "precompiled_charsmap is empty" from inside TF Text.
  rule = prefix + '_normalization.tsv'
  with open(rule, 'w', encoding='utf-8') as f:
    f.write('A0\t20\n')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type='bpe', hard_vocab_limit=False, num_threads=2, minloglevel=2,
                                   # keep newlines, as real checkpoints' tokenizers do: prompts are line-structured
                                   normalization_rule_tsv=rule, remove_extra_whitespaces=False,
                                   # every name and city one piece, space included: one-token keys and values
                                   user_defined_symbols=['\n'] + [f'\u2581{w}' for w in NAMES + CITIES])
  finally:
    os.remove(rule)  # read by the trainer only: the model carries the rule
  with open(prefix + '.model', 'wb') as f:
    f.write(model.getvalue())
  return prefix + '.model'


def export_hf(cfg, params, folder: str) -> str:
  """Writes a Llama-architecture Hugging Face checkpoint (config.json + model.safetensors) for hf.load."""
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  if cfg.activation != 'silu' or not cfg.gated_mlp or cfg.norm_plus_one or cfg.qkv_bias:
    raise ValueError('export_hf writes the Llama layout only (SwiGLU, plain RMSNorm, no qkv bias)')
  os.makedirs(folder, exist_ok=True)
  config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': cfg.vocab_size,
            'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
            'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
            'head_dim': cfg.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps,
            'rope_theta': cfg.rope_theta, 'tie_word_embeddings': cfg.tie_embeddings, 'torch_dtype': 'float32',
            'max_position_embeddings': 2048}
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=1)
  tensors = {}
  for name, (path, transpose) in hf.tensor_map(cfg).items():
    leaf = params
    for p in path:
      leaf = leaf[p]
    arr = np.asarray(leaf, np.float32)
    tensors[name] = arr.T if transpose else arr
  hf.write_safetensors(os.path.join(folder, 'model.safetensors'), tensors)
  return folder
