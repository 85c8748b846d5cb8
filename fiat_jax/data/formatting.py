"""τ's inputs, in one place: [I_τ ; x ; ŷ_β] down to plain x, the passage cut from its end to fit.

The seqio tasks (pipeline.py) format every split with it, and `fiat infer` / `fiat evaluate` format one example at a
time with it (`tau_example`), so training and inference read the same text.
"""
import os
from typing import Callable, Optional

import seqio

from fiat_jax.data import readers
import tasks

# The data recipes: what τ's inputs carry (the suffix of the seqio task names). Table 3's rows remove ingredients
# cumulatively (docs/paper_rows.md): FIAT reads 'instruction_rationale', "w/o CoT-augmented tuning" 'instruction',
# "w/o instruction-augmented tuning" and every row below it 'plain'. 'rationale' (x ; ŷ_β without I_τ) is no row of
# the paper's tables; 'distilled_cot' reads [I_τ ; x] and trains on ŷ_β as a second target (Hsieh et al., 2023).
RECIPES = ('instruction_rationale', 'instruction', 'rationale', 'plain', 'distilled_cot')
INSTRUCTION_RECIPES = frozenset({'instruction_rationale', 'instruction', 'distilled_cot'})
RATIONALE_INPUT_RECIPES = frozenset({'instruction_rationale', 'rationale'})
RATIONALE_RECIPES = RATIONALE_INPUT_RECIPES | {'distilled_cot'}  # Need the rationale store.
# Distilled CoT: task prefixes; the rationale is a training target only.
LABEL_PREFIX = '[label] '
RATIONALE_PREFIX = '[rationale] '
RATIONALE_HEADER = 'Reasoning (written by a larger model; it may be wrong):'
# Distilled CoT's two training targets, as decoder_task_ids (the loss averages each over its own tokens).
TASK_IDS = {'label': 0, 'rationale': 1}
# Which field of a store record becomes ŷ_β: the parsed reasoning, or β's whole output (reasoning and answer).
RATIONALE_FIELDS = ('rationale', 'raw')
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'tasks',
                           'prompts')


def data_recipe(rationale: str, instruction: bool) -> str:
  """The data recipe of a Recipe's ingredients: rationale 'input' | 'none' | 'distilled', with or without I_τ."""
  if rationale == 'distilled':
    return 'distilled_cot'
  return {('input', True): 'instruction_rationale', ('none', True): 'instruction', ('input', False): 'rationale',
          ('none', False): 'plain'}[(rationale, instruction)]


def load_i_tau(dataset: str) -> str:
  """The I_tau instruction text of a data set, from tasks/prompts/."""
  path = os.path.join(PROMPTS_DIR, tasks.definition(dataset).I_TAU_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: I_tau file of {dataset} not found')
  with open(path, encoding='utf-8') as f:
    text = f.read().strip()
  if not text:
    raise ValueError(f'{path}: empty I_tau')
  return text


def format_inputs(dataset: str, example: dict, recipe: str, i_tau: Optional[str] = None,
                  rationale: Optional[str] = None, passage: Optional[str] = None) -> str:
  """x formatted for one data recipe: [I_tau ; x ; rationale] down to plain x."""
  definition = tasks.definition(dataset)
  values = {field: example[field] for field, _ in definition.FIELDS}
  if passage is not None:
    values[definition.PASSAGE_FIELD] = passage
  if recipe in INSTRUCTION_RECIPES:
    lines = [i_tau, ''] + [f'{name}: {values[field]}' for field, name in definition.FIELDS]
    if recipe in RATIONALE_INPUT_RECIPES:
      lines.append(f'{RATIONALE_HEADER} {rationale}')
    return '\n'.join(lines + [definition.CUE])
  if recipe not in RECIPES:
    raise ValueError(f'unknown data recipe {recipe!r}; expected one of {RECIPES}')
  parts = [f'{field}: {values[field]}' for field, _ in definition.FIELDS]
  if recipe in RATIONALE_INPUT_RECIPES:
    parts.append(f'rationale: {rationale}')
  return ' '.join(parts)


def truncate_passage(render: Callable[[str], str], passage: str, vocabulary: seqio.Vocabulary,
                     max_tokens: Optional[int], where: str) -> tuple[str, int]:
  """render(passage) within max_tokens, cutting only the passage, from its end; (text, tokens cut)."""
  text = render(passage)
  full = len(vocabulary.encode(text))
  if max_tokens is None or full <= max_tokens:
    return text, 0
  passage_ids = vocabulary.encode(passage)
  keep = len(passage_ids) - (full - max_tokens)
  while keep >= 0:
    text = render(vocabulary.decode(passage_ids[:keep]))
    length = len(vocabulary.encode(text))
    if length <= max_tokens:
      return text, full - length
    keep -= length - max_tokens  # Token counts are not additive at the cut: cut more.
  without = len(vocabulary.encode(render('')))
  raise readers.DataError(
      f'{where}: the inputs need {without} tokens without any passage, more than inputs_length='
      f'{max_tokens}; the instruction, question and rationale are never cut: raise inputs_length')


def render_inputs(dataset: str, recipe: str, example: dict, rationale: Optional[str], vocabulary: seqio.Vocabulary,
                  inputs_length: Optional[int], where: str, *, i_tau: Optional[str] = None,
                  kind: str = 'label') -> tuple[str, int]:
  """The inputs of one task row (distilled CoT: of its 'label' or 'rationale' output), passage cut from its end to
  fit inputs_length: (text, tokens cut)."""
  distilled = recipe == 'distilled_cot'
  prefix = (RATIONALE_PREFIX if kind == 'rationale' else LABEL_PREFIX) if distilled else ''
  rationale = None if rationale is None else rationale.strip()
  render = lambda p: prefix + format_inputs(dataset, example, 'instruction' if distilled else recipe, i_tau,
                                            rationale, passage=p)
  return truncate_passage(render, example[tasks.definition(dataset).PASSAGE_FIELD], vocabulary, inputs_length, where)


def tau_example(dataset: str, recipe: str, vocab: seqio.Vocabulary, inputs_length: Optional[int], example: dict,
                rationale: Optional[str]) -> dict:
  """One canonical example formatted for τ as the seqio tasks format it, for decoding: ids, text and target."""
  i_tau = load_i_tau(dataset) if recipe in INSTRUCTION_RECIPES else None
  text, _ = render_inputs(dataset, recipe, example, rationale, vocab, inputs_length, f'example {example["id"]}',
                          i_tau=i_tau)
  target = tasks.definition(dataset).target(example) if ('label' in example or 'target' in example) else None
  return {'id': example['id'], 'language': example['language'], 'inputs': vocab.encode(text),
          'inputs_pretokenized': text, 'targets_pretokenized': target, 'example': example}
