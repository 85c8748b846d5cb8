"""The data sets, one module each: their facts (fields, cue, labels, languages, target, β's answers, scoring,
headline). Their seqio tasks are fiat_jax/data/pipeline.py's, built for a TaskData."""
from tasks import xor_attriqa
from tasks import xtreme_up

DEFINITIONS = {xor_attriqa.DATASET: xor_attriqa, xtreme_up.DATASET: xtreme_up}


def definition(dataset: str):
  """The module defining one data set."""
  if dataset not in DEFINITIONS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(DEFINITIONS)}')
  return DEFINITIONS[dataset]

