"""XTREME-UP v1.1 cross-lingual QA: the English answer span, or `No Answer`.

The one home of the data set's facts: fields, I_τ cue, languages and mixtures, target, β's answers, scoring and
headline. Tasks xtreme_up_xqa_{lang}_{recipe}, mixtures xtreme_up_xqa_indic_{recipe} (20 Indic languages) and
xtreme_up_xqa_full_{recipe} (all languages) are fiat_jax/data/pipeline.py's.
"""
import re
from typing import Optional, Sequence

from fiat_jax.data import metrics
from fiat_jax.data import readers

DATASET = 'xtreme_up_xqa'
LANGUAGES = readers.XTREME_UP_LANGUAGES
MIXTURES = {'xtreme_up_xqa_indic': readers.XTREME_UP_INDIC, 'xtreme_up_xqa_full': LANGUAGES}
I_TAU_FILE = 'i_tau_xtreme_up_xqa.txt'
FIELDS = (('question', 'Question'), ('title', 'Title'), ('context', 'Passage'))
INPUT_FIELDS = tuple(field for field, _ in FIELDS)
PASSAGE_FIELD = 'context'
CUE = 'Answer:'
EXEMPLARS_PER_LANGUAGE = False  # one set of exemplars for every language
SCORE_WORDS = None  # τ's score of an example: its decoded answer's logprob
LANGUAGE_METRIC = 'f1'
HEADLINE_KEYS = ('f1',)  # the under-represented languages' mean F1
_NO_ANSWER = {'no answer', 'noanswer', 'none', 'unanswerable', 'not answerable', 'n/a', 'no answer found'}


def target(example: dict) -> str:
  """The answer text as released (`No Answer` when the passage does not answer)."""
  return example['target']


def postprocess(output: str, example=None, is_target: bool = False):
  """Decoded text -> the answer, stripped; a seqio target -> its canonical example (metric_fn needs its language)."""
  if is_target and example is not None:
    return readers.canonical_example(example)
  return output.strip()


def exemplar_answer(example: dict) -> str:
  """The final answer an I_β exemplar shows: the released target."""
  if not isinstance(example.get('target'), str) or not example['target'].strip():
    raise ValueError(f"exemplar {example.get('id')!r}: field 'target' must be a non-empty string")
  return example['target']


def beta_prediction(answer: Optional[str]) -> Optional[str]:
  """β's parsed answer as a prediction: the span, `No Answer`, or None when there is none."""
  if answer is None:
    return None
  if re.sub(r'[^\w\s/]', '', answer.lower()).strip() in _NO_ANSWER:
    return readers.NO_ANSWER
  return answer or None


def vote_key(answer: Optional[str]):
  """What self-consistency votes on: the normalised span."""
  if answer is None:
    return None
  return ' '.join((beta_prediction(answer) or '').lower().split())


def tau_prediction(postprocessed: str) -> Optional[str]:
  """τ's postprocessed output as a prediction; None when it is empty."""
  return postprocessed or None


def file_prediction(value, path: str, line: int) -> str:
  """A `fiat score` prediction: the answer text."""
  if not isinstance(value, str):
    raise readers.DataError(f"{path}:{line}: field 'prediction': not a string")
  return value


def score(examples: Sequence[dict], predictions: Sequence[Optional[str]],
          scores: Optional[Sequence[float]] = None, **kw) -> dict:
  """metrics.score_xtreme_up of the released targets (no score-based metric); None predicts ''."""
  del scores
  return metrics.score_xtreme_up([ex['target'] for ex in examples], [p or '' for p in predictions],
                                 [ex['language'] for ex in examples], **kw)


def flat(result: dict) -> dict:
  """The headline numbers as {name: float}: F1 (under-represented mean), F1 and EM over all languages."""
  mean = result['mean_over_languages']
  return {'f1': float((result.get('headline') or {}).get('value', mean['f1'])),
          'f1_all_languages': float(mean['f1']), 'em': float(mean['em'])}


def headline(result: dict) -> dict:
  """{'f1': {'value', 'ci95'}}: the report's figure of one test result."""
  if result.get('headline'):
    return {'f1': {'value': result['headline']['value'], 'ci95': result['headline'].get('ci95')}}
  return {'f1': {'value': result['mean_over_languages']['f1'], 'ci95': None}}


def metric_fn(targets: Sequence[dict], predictions: Sequence[str]) -> dict:
  """seqio's predict metric: score() of postprocessed outputs against the targets' examples, as flat() numbers."""
  return flat(score(targets, [tau_prediction(p) for p in predictions], n_resamples=1))


METRIC_FNS = (metric_fn,)
SCORE_METRIC_FNS = ()
