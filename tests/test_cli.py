"""The `fiat` command dispatches each mode to its library entry point."""
import importlib
import json
import os

import pytest

from fiat_jax import commands
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax import main

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


def test_unknown_mode_is_one_line_naming_the_modes(capsys):
  assert main.run(['nope']) == 2
  assert capsys.readouterr().err == ("fiat: error: unknown mode 'nope'; the modes: rationales, icl, serve, score, "
                                     "train, evaluate, infer, report, plan (fiat --help)\n")


@pytest.mark.parametrize('mode', sorted(main.MODES))
def test_every_mode_names_an_existing_function(mode):
  module, func = main.MODES[mode].target.split(':')
  assert callable(getattr(importlib.import_module(module), func))


def test_score_through_the_command(tmp_path, capsys):
  preds = tmp_path / 'p.jsonl'
  preds.write_text(''.join(json.dumps({'prediction': p}) + '\n' for p in ['No Answer', 'Dispur']))
  code = main.run(['score', '--task', 'xtreme_up_xqa', '--gold', os.path.join(TESTDATA, 'xtreme_up'),
                   '--predictions', str(preds), '--languages', 'as', '--bootstrap', '10'])
  assert code == 0
  assert json.loads(capsys.readouterr().out)['per_language']['as'] == {'f1': 100.0, 'em': 100.0, 'n': 2}


def test_a_relative_gin_file_named_like_a_package_is_read_as_a_file(tmp_path, monkeypatch):
  """`tasks/my.gin` in the working directory: gin alone takes `tasks` for this project's package and fails."""
  import gin  # pylint: disable=g-import-not-at-top
  from fiat_jax import cli, experiment  # pylint: disable=g-import-not-at-top
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 'my.gin').write_text("Experiment.name = 'from_my_file'\n")
  monkeypatch.chdir(tmp_path)
  gin.clear_config()
  cli.parse_gin(['--gin_file=tasks/my.gin'], 'test')
  assert experiment.Experiment().name == 'from_my_file'
  gin.clear_config()


def test_a_language_without_a_file_names_the_run_setting(tmp_path):
  """gu is an XTREME-UP language, but the fixture release has no gu file: the error says which setting asked."""
  from fiat_jax.data import readers  # pylint: disable=g-import-not-at-top
  with pytest.raises(readers.DataError, match=r"requested languages \['gu'\] \(the run's Experiment.languages\); "
                     r"this split has \['as', 'bn', 'fi', 'hi', 'ja', 'mr', 'ru', 'te'\]"):
    readers.read_split('xtreme_up_xqa', os.path.join(TESTDATA, 'xtreme_up'), 'train', ['as', 'gu'])


def test_every_jax_mode_joins_a_multiprocess_run_first(monkeypatch):
  """main.run starts jax.distributed (from the popped flags) before the mode, and passes the rest on."""
  from fiat_jax.training import distributed  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(distributed, 'initialize', lambda s: calls.append(('init', s.num_processes, s.process_id)))
  monkeypatch.setattr(main, 'MODES', {'probe': commands.Mode('tests_probe_mode:main', True, 'a probe', 'fiat probe')})
  import sys, types  # pylint: disable=g-import-not-at-top,multiple-imports
  probe = types.ModuleType('tests_probe_mode')
  probe.main = lambda argv: calls.append(('mode', argv)) or 0
  monkeypatch.setitem(sys.modules, 'tests_probe_mode', probe)
  assert main.run(['probe', '--num_processes=2', '--process_id=1', '--gin.x=1']) == 0
  assert calls == [('init', 2, 1), ('mode', ['--gin.x=1'])]


@pytest.mark.parametrize('binding, why', [
    ("TrainConfig.mode='full'", r'Recipe.peft sets it \(True: peft, False: full\)'),
    ('TrainConfig.seed=3', r'Experiment.seed sets it')])
def test_a_binding_the_run_would_overwrite_is_refused(binding, why):
  """TrainConfig's mode and seed come from the recipe and the experiment: binding them is an error naming them."""
  import gin  # pylint: disable=g-import-not-at-top
  from fiat_jax import cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  field = binding.split('=')[0]
  with pytest.raises(commands.UsageError, match=rf'^{field} cannot be bound in gin: {why}; drop the binding'):
    cli.parse_gin([f'--gin.{binding}'], 'train')
  gin.clear_config()


def test_a_caller_train_config_contradicting_the_run_is_refused():
  from fiat_jax import experiment, tuning  # pylint: disable=g-import-not-at-top
  from fiat_jax.training import train  # pylint: disable=g-import-not-at-top
  exp, recipe = experiment.Experiment(seed=5), experiment.Recipe()
  got = tuning._run_train_config(  # pylint: disable=protected-access
      train.TrainConfig(num_steps=7), experiment.Recipe(peft=False), exp)
  assert (got.mode, got.seed, got.num_steps) == ('full', 5, 7)
  with pytest.raises(ValueError, match=r"TrainConfig.mode='full' contradicts the run, which sets 'peft' \(Recipe.peft"):
    tuning._run_train_config(train.TrainConfig(mode='full'), recipe, exp)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"TrainConfig.seed=1 contradicts the run, which sets 5 \(Experiment.seed"):
    tuning._run_train_config(train.TrainConfig(seed=1), recipe, exp)  # pylint: disable=protected-access
