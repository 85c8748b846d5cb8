"""XOR-AttriQA (in-language): is the candidate answer attributable to the passage? Targets "yes"/"no".

Task names: xor_attriqa_{lang}_{recipe}; mixture: xor_attriqa_{recipe}. Register with
  tasks.xor_attriqa.register(data_dir, vocabulary, rationale_dir=...)
"""
from fiat_jax import metrics
from fiat_jax import readers

DATASET = 'xor_attriqa'
LANGUAGES = readers.XOR_ATTRIQA_LANGUAGES
MIXTURES = {'xor_attriqa': LANGUAGES}
I_TAU_FILE = 'i_tau_xor_attriqa.txt'
# (canonical field, its name in the instruction format); the plain formats use the field itself.
FIELDS = (('question', 'Question'), ('answer', 'Candidate answer'), ('passage', 'Passage'))
PASSAGE_FIELD = 'passage'  # Cut first, from its end, when the inputs are too long.
CUE = 'Attributable (yes or no):'
METRIC_FNS = (metrics.accuracy_metric_fn,)
SCORE_METRIC_FNS = (metrics.auc_pr_score_metric_fn,)  # scores: logp("yes") - logp("no")


def target(example: dict) -> str:
  """The label word: "yes" when the answer is attributable (ais), else "no"."""
  return metrics.LABEL_WORDS[example['label']]


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  """Decoded text -> label word (first word, lower-cased); anything else stays as is (wrong)."""
  del example, is_target
  words = output.strip().lower().split()
  return words[0].strip('.,:;!"\'') if words else ''


def register(data_dir: str, vocabulary, rationale_dir=None, **kwargs) -> list[str]:
  """Registers every language x recipe task and the mixtures; returns their names."""
  from fiat_jax import data  # pylint: disable=g-import-not-at-top
  return data.register_tasks(DATASET, data_dir, vocabulary, rationale_dir, **kwargs)
