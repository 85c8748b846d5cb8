"""The `fiat` command dispatches each mode to its library entry point."""
import importlib
import json
import os

import pytest

from fiat_jax import main

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


def test_unknown_mode_prints_usage(capsys):
  assert main.run(['nope']) == 2
  assert 'usage: fiat {rationales,' in capsys.readouterr().err


@pytest.mark.parametrize('mode', sorted(main.MODES))
def test_every_mode_names_an_existing_function(mode):
  module, func = main.MODES[mode][0].split(':')
  assert callable(getattr(importlib.import_module(module), func))


def test_score_through_the_command(tmp_path, capsys):
  preds = tmp_path / 'p.jsonl'
  preds.write_text(''.join(json.dumps({'prediction': p}) + '\n' for p in ['No Answer', 'Dispur']))
  code = main.run(['score', '--task', 'xtreme_up_xqa', '--gold', os.path.join(TESTDATA, 'xtreme_up'),
                   '--predictions', str(preds), '--languages', 'as', '--bootstrap', '10'])
  assert code == 0
  assert json.loads(capsys.readouterr().out)['per_language']['as'] == {'f1': 100.0, 'em': 100.0, 'n': 2}
