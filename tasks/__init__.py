"""seqio task and mixture definitions, one module per data set (registered by fiat_jax.data)."""
from tasks import xor_attriqa
from tasks import xtreme_up

DEFINITIONS = {xor_attriqa.DATASET: xor_attriqa, xtreme_up.DATASET: xtreme_up}


def definition(dataset: str):
  """The module defining one data set's tasks."""
  if dataset not in DEFINITIONS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(DEFINITIONS)}')
  return DEFINITIONS[dataset]
