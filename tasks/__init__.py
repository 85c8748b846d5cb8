"""The data sets, one module each (their facts: fields, cue, labels, languages, target, β's answers, scoring,
headline), and their seqio tasks and mixtures, registered on import: {dataset}_{lang}_{recipe} for every recipe of
fiat_jax.data.pipeline.RECIPES, and {mixture}_{recipe} per setting. Where they read is fiat_jax.data.pipeline.TaskData (gin)."""
from tasks import xor_attriqa
from tasks import xtreme_up

DEFINITIONS = {xor_attriqa.DATASET: xor_attriqa, xtreme_up.DATASET: xtreme_up}


def definition(dataset: str):
  """The module defining one data set."""
  if dataset not in DEFINITIONS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(DEFINITIONS)}')
  return DEFINITIONS[dataset]


def _register() -> list[str]:
  from fiat_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (data asks these definitions lazily)
  return [name for d in DEFINITIONS.values() for name in pipeline.register(d)]


NAMES = _register()  # every registered task and mixture
