"""The embedded miniature world: a synthetic multilingual two-hop QA task in the XTREME-UP cross-lingual QA layout.

A passage (English) states who is whose friend / sister / teacher and where people live / work; a question in
Bengali, Hindi, Marathi, Urdu or Russian asks where the friend / sister / teacher of someone lives or works.
Answering takes two look-ups (who is the relative, then where that person lives or works) and the answer is a
span of the passage, or `No Answer` when the passage does not say. The generator also writes the chain-of-thought
text β is trained on, the I_β prompt files, an instruction-tuning mixture for τ (English one-hop questions: other
tasks, the same instruction style) and a SentencePiece tokenizer. Nothing here is downloaded.
"""
import json
import os
import random

import numpy as np

from fiat_jax.beta import prompts
from fiat_jax.data import readers

LANGUAGES = ('bn', 'hi', 'mr', 'ur', 'ru')
RELATIONS = ('friend', 'sister', 'teacher')
ATTRIBUTES = ('live', 'work')
ENGLISH = {'live': ('lives in', 'lives'), 'work': ('works in', 'works')}  # (fact, question)
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
I_BETA_INSTRUCTION = 'Think step by step in English, then answer with a place from the passage or No Answer.'
COPY_INSTRUCTION = 'Copy, in order, every sentence of the passage that mentions the person.'
IT_INSTRUCTION = ('Answer the question from the passage with a span copied from it. If the passage does not say, '
                  'reply "No Answer".')


def make_example(rng: random.Random, language: str, answerable: bool) -> dict:
  """One two-hop question with its passage, target and the gold chain of thought (the generator's, for β)."""
  x, p, q = rng.sample(NAMES, 3)
  rel, other_rel = rng.sample(RELATIONS, 2)
  attr = rng.choice(ATTRIBUTES)
  other_attr = 'work' if attr == 'live' else 'live'
  c_answer, c_p_other, c_q = rng.sample(CITIES, 3)
  facts = [f'{p} is the {rel} of {x}.', f'{q} is the {other_rel} of {x}.', f'{p} {ENGLISH[other_attr][0]} {c_p_other}.',
           f'{q} {ENGLISH[attr][0]} {c_q}.']
  if answerable:
    facts.append(f'{p} {ENGLISH[attr][0]} {c_answer}.')
  rng.shuffle(facts)
  asks = f'The question asks where the {rel} of {x} {ENGLISH[attr][1]}.'
  found = f'The passage says {p} is the {rel} of {x}.'
  if answerable:
    target, last = c_answer, f'It says {p} {ENGLISH[attr][0]} {c_answer}.'
  else:
    target, last = NO_ANSWER, f'It does not say where {p} {ENGLISH[attr][1]}.'
  return {'question': TEMPLATES[language][(rel, attr)].format(X=x), 'title': f'{x} and people they know',
          'context': ' '.join(facts), 'target': target, 'language': language,
          'rationale': ' '.join([asks, found, last])}


def examples(n: int, seed: int, languages=LANGUAGES, answerable_rate: float = 0.75) -> list[dict]:
  """n examples spread evenly over the languages, drawn from `seed`."""
  rng = random.Random(seed)
  return [make_example(rng, languages[i % len(languages)], rng.random() < answerable_rate) for i in range(n)]


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


def one_hop(rng: random.Random, ex: dict) -> tuple[str, str]:
  """An English one-hop question about one fact of the passage (or about someone it does not mention)."""
  facts = [s.strip() + '.' for s in ex['context'].split('.') if s.strip()]
  fact = rng.choice(facts).rstrip('.').split()
  if fact[1] == 'is':  # "P is the REL of X." -> who is the REL of X?
    question, answer = f'Who is the {fact[3]} of {fact[5]}?', fact[0]
  else:  # "P lives in C." -> where does P live?
    question, answer = f'Where does {fact[0]} {fact[1].removesuffix("s")}?', fact[3]
  if rng.random() < 0.2:  # a question about someone the passage does not mention
    absent = rng.choice([nm for nm in NAMES if nm not in ex['context']])
    question, answer = f'Where does {absent} {rng.choice(ATTRIBUTES)}?', NO_ANSWER
  return f'{IT_INSTRUCTION}\n\nQuestion: {question}\nPassage: {ex["context"]}\nAnswer:', answer


def instruction_pairs(n: int, seed: int) -> list[tuple[str, str]]:
  """τ's instruction tuning (other tasks, the instruction style): English one-hop questions over the passages,
  and copying out what a passage says about someone (the copying every extractive answer needs)."""
  rng, out = random.Random(seed), []
  for ex in examples(n, seed):
    facts = [s.strip() + '.' for s in ex['context'].split('.') if s.strip()]
    if rng.random() < 0.5:
      person = rng.choice(facts).split()[0]
      said = ' '.join(f for f in facts if person in f.split())
      out.append((f'{COPY_INSTRUCTION}\n\nPerson: {person}\nPassage: {ex["context"]}\nSentences:', said))
    else:
      out.append(one_hop(rng, ex))
  return out


def reading_pairs(n: int, seed: int) -> list[tuple[str, str]]:
  """Held-out one-hop English questions in τ's instruction style: how well the instruction-tuned τ reads."""
  rng = random.Random(seed)
  return [one_hop(rng, ex) for ex in examples(n, seed)]


def tokenizer_lines(extra_texts=()) -> list[str]:
  """Text the SentencePiece model is trained on: the world, β's and τ's prompts (every I_τ / I_β word)."""
  lines = list(extra_texts) + [I_BETA_INSTRUCTION, IT_INSTRUCTION, COPY_INSTRUCTION, NO_ANSWER]
  # τ's instruction prompts too: without them "Where" began with an unknown piece and "work?" split as "wor"+"k"
  lines += [prompt + ' ' + answer for prompt, answer in instruction_pairs(300, 97)]
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
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                 character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 model_type='bpe', hard_vocab_limit=False, num_threads=2, minloglevel=2,
                                 # keep newlines, as real checkpoints' tokenizers do: prompts are line-structured
                                 normalization_rule_tsv=rule, remove_extra_whitespaces=False,
                                 user_defined_symbols=['\n'])
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
