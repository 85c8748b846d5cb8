"""XOR-AttriQA (in-language): is the candidate answer attributable to the passage? Targets "yes"/"no".

The one home of the data set's facts: fields, I_τ cue, label words, languages and mixtures, target, β's answers,
scoring and headline. Its seqio tasks xor_attriqa_{lang}_{recipe} and the mixture xor_attriqa_{recipe} are
fiat_jax/data/pipeline.py's.
"""
import re
from typing import Optional, Sequence

from fiat_jax.data import metrics
from fiat_jax.data import readers

DATASET = 'xor_attriqa'
LANGUAGES = readers.XOR_ATTRIQA_LANGUAGES
MIXTURES = {'xor_attriqa': LANGUAGES}
I_TAU_FILE = 'i_tau_xor_attriqa.txt'
# (canonical field, its name in the instruction format and in I_β); the plain formats use the field itself.
FIELDS = (('question', 'Question'), ('answer', 'Candidate answer'), ('passage', 'Passage'))
INPUT_FIELDS = tuple(field for field, _ in FIELDS)  # what β and τ see of an example
PASSAGE_FIELD = 'passage'  # Cut first, from its end, when the inputs are too long.
CUE = 'Attributable (yes or no):'
EXEMPLARS_PER_LANGUAGE = True  # I_β shows each language its own exemplars
# τ's score of an example: logp(SCORE_WORDS[0]) - logp(SCORE_WORDS[1]) (AUC-PR's input).
SCORE_WORDS = (metrics.POSITIVE_LABEL, metrics.NEGATIVE_LABEL)
LANGUAGE_METRIC = 'accuracy'  # the per-language table's figure (and the trainer's eval/ curve)
HEADLINE_KEYS = ('acc', 'auc_pr')  # the report's cell: accuracy / AUC-PR, means over languages
_YES = {'yes', 'true', 'supported', 'attributable', 'correct'}
_NO = {'no', 'false', 'not supported', 'unsupported', 'not attributable', 'incorrect'}


def target(example: dict) -> str:
  """The label word: "yes" when the answer is attributable (ais), else "no"."""
  return metrics.LABEL_WORDS[example['label']]


def postprocess(output: str, example=None, is_target: bool = False):
  """Decoded text -> label word (first word, lower-cased; anything else stays as is: wrong); a seqio target -> its
  canonical example (metric_fn needs its label and language)."""
  if is_target and example is not None:
    return readers.canonical_example(example)
  words = output.strip().lower().split()
  return words[0].strip('.,:;!"\'') if words else ''


def exemplar_answer(example: dict) -> str:
  """The final answer an I_β exemplar shows: Yes / No."""
  if not isinstance(example.get('label'), bool):
    raise ValueError(f"exemplar {example.get('id')!r}: field 'label' must be true/false, got {example.get('label')!r}")
  return 'Yes' if example['label'] else 'No'


def beta_prediction(answer: Optional[str]) -> Optional[bool]:
  """β's parsed answer as a label: True (attributable), False, or None when it is neither."""
  if answer is None:
    return None
  word = re.sub(r'[^\w\s/]', '', answer.lower()).strip()
  first = word.split()[0] if word.split() else ''
  if word in _YES or first == 'yes':
    return True
  if word in _NO or first == 'no':
    return False
  return None


def vote_key(answer: Optional[str]):
  """What self-consistency votes on: the label."""
  return beta_prediction(answer)


def tau_prediction(postprocessed: str) -> Optional[bool]:
  """τ's postprocessed output as a label; None when it is no label word."""
  return {metrics.POSITIVE_LABEL: True, metrics.NEGATIVE_LABEL: False}.get(postprocessed)


def file_prediction(value, path: str, line: int) -> bool:
  """A `fiat score` prediction: true/false, "yes"/"no" or the gold's own "True"/"False" (any case)."""
  if isinstance(value, bool):
    return value
  word = value.strip().lower() if isinstance(value, str) else None
  if word in (metrics.POSITIVE_LABEL, 'true'):
    return True
  if word in (metrics.NEGATIVE_LABEL, 'false'):
    return False
  raise readers.DataError(f"{path}:{line}: field 'prediction': expected {metrics.POSITIVE_LABEL!r}/"
                          f'{metrics.NEGATIVE_LABEL!r}, "True"/"False" or true/false, got {value!r}')


def score(examples: Sequence[dict], predictions: Sequence[Optional[bool]],
          scores: Optional[Sequence[float]] = None, **kw) -> dict:
  """metrics.score_xor_attriqa of labels; a None prediction (no usable answer) counts wrong."""
  labels = [ex['label'] for ex in examples]
  preds = [p if p is not None else not y for p, y in zip(predictions, labels)]
  return metrics.score_xor_attriqa(labels, preds, [ex['language'] for ex in examples], scores, **kw)


def flat(result: dict) -> dict:
  """The headline numbers as {name: float}: accuracy and AUC-PR means over languages (what the trainer logs)."""
  return {k.replace('_mean_over_languages', ''): float(v['value']) for k, v in result['headline'].items() if v}


def headline(result: dict) -> dict:
  """{'acc', 'auc_pr'?: {'value', 'ci95'}}: the report's figures of one test result."""
  h = result['headline']
  out = {'acc': h['accuracy_mean_over_languages']}
  if h.get('auc_pr_mean_over_languages'):
    out['auc_pr'] = h['auc_pr_mean_over_languages']
  return out


def metric_fn(targets: Sequence[dict], predictions: Sequence[str]) -> dict:
  """seqio's predict metric: score() of postprocessed outputs against the targets' examples, as flat() numbers."""
  return flat(score(targets, [tau_prediction(p) for p in predictions], n_resamples=1))


def score_metric_fn(targets: Sequence[dict], scores: Sequence[float]) -> dict:
  """seqio's score metric: AUC-PR (mean over languages) of scores logp(yes) - logp(no)."""
  result = score(targets, [ex['label'] for ex in targets], scores, n_resamples=1)
  return {'auc_pr': flat(result)['auc_pr']}


METRIC_FNS = (metric_fn,)
SCORE_METRIC_FNS = (score_metric_fn,)
