"""XTREME-UP v1.1 cross-lingual QA: the English answer span, or `No Answer`.

Task names: xtreme_up_xqa_{lang}_{recipe}; mixtures: xtreme_up_xqa_indic_{recipe} (20 Indic
languages) and xtreme_up_xqa_full_{recipe} (all languages). Register with
  tasks.xtreme_up.register(data_dir, vocabulary, rationale_dir=...)
"""
from fiat_jax import metrics
from fiat_jax import readers

DATASET = 'xtreme_up_xqa'
LANGUAGES = readers.XTREME_UP_LANGUAGES
MIXTURES = {'xtreme_up_xqa_indic': readers.XTREME_UP_INDIC, 'xtreme_up_xqa_full': LANGUAGES}
I_TAU_FILE = 'i_tau_xtreme_up_xqa.txt'
FIELDS = (('question', 'Question'), ('title', 'Title'), ('context', 'Passage'))
PASSAGE_FIELD = 'context'
CUE = 'Answer:'
METRIC_FNS = (metrics.squad_metric_fn,)
SCORE_METRIC_FNS = ()


def target(example: dict) -> str:
  """The answer text as released (`No Answer` when the passage does not answer)."""
  return example['target']


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  del example, is_target
  return output.strip()


def register(data_dir: str, vocabulary, rationale_dir=None, **kwargs) -> list[str]:
  """Registers every language x recipe task and the mixtures; returns their names."""
  from fiat_jax import data  # pylint: disable=g-import-not-at-top
  return data.register_tasks(DATASET, data_dir, vocabulary, rationale_dir, **kwargs)
