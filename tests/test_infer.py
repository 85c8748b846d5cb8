"""`fiat infer` (Algorithm 2): JSON lines in, β's rationale (store or backend), τ's answer and score out."""
import dataclasses
import json
import os

import gin
import pytest

from fiat_jax.beta import store
from fiat_jax import cli
from fiat_jax import configurables  # noqa: F401  (every configurable a gin file may name, as `fiat` has them)
from fiat_jax.data import readers
from fiat_jax import experiment
from fiat_jax import inference
from fiat_jax import tuning
import store_helpers
from test_recipes import XQA, write_store


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('infer')
  store_dir = write_store(root / 'store', 'xtreme_up_xqa', XQA)  # `fiat rationales` with ScriptedBeta
  argv = ['--gin_file=runs/xtreme_up_full/xs_fiat.gin', '--gin_file=tiny.gin', f"--gin.DATA_DIR='{XQA}'",
          f"--gin.RUNS_DIR='{root / 'runs'}'", f"--gin.STORE_DIR='{store_dir}'"]
  gin.clear_config()
  assert tuning.train_main(argv) == 0
  gin.clear_config()
  return root, argv + ['--gin.Beta.backend=@ScriptedBeta()']


def test_infer_answers_jsonl_asking_beta_only_for_new_inputs(trained):
  root, argv = trained
  known = readers.read_split('xtreme_up_xqa', XQA, 'test')[:2]
  lines = [{k: ex[k] for k in ('id', 'language', 'question', 'title', 'context')} for ex in known]
  lines.append({'language': 'hi', 'question': 'नया प्रश्न क्या है?', 'title': 'New', 'context': 'A new passage.'})
  lines.append(dict(lines[0], question='एक और प्रश्न?'))  # a stored example's id reused for another question
  inp, out = root / 'in.jsonl', root / 'out.jsonl'
  inp.write_text(''.join(json.dumps(x, ensure_ascii=False) + '\n' for x in lines))
  before = len(store.read_records(str(root / 'store')))
  io = [f"--gin.infer.input_file='{inp}'", f"--gin.infer.output_file='{out}'"]
  assert inference.main(argv + io) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['rationale_source'] for r in rows] == ['store', 'store', 'beta', 'beta']
  assert [r['id'] for r in rows[:2]] == [ex['id'] for ex in known]
  assert rows[0]['rationale'] == store_helpers.rationale_for(known[0], 'xtreme_up_xqa')
  assert rows[3]['id'] == known[0]['id']
  assert rows[3]['rationale'] == store_helpers.rationale_for(lines[3], 'xtreme_up_xqa') != rows[0]['rationale']
  assert all(isinstance(r['prediction'], str) and isinstance(r['score'], float) and r['score'] <= 0 for r in rows)
  records = store.read_records(str(root / 'store'))
  assert len(records) == before + 2 and [r['split'] for r in records[-2:]] == ['infer', 'infer']
  gin.clear_config()
  # Run again: the new input's rationale is now stored, β is not asked; τ's answers are the same (greedy).
  out2 = root / 'out2.jsonl'
  assert inference.main(argv + [io[0], f"--gin.infer.output_file='{out2}'"]) == 0
  rows2 = [json.loads(line) for line in out2.read_text().splitlines()]
  assert [r['rationale_source'] for r in rows2] == ['store'] * 4
  assert [r['rationale'] for r in rows2] == [r['rationale'] for r in rows]
  assert [r['prediction'] for r in rows2] == [r['prediction'] for r in rows]
  assert len(store.read_records(str(root / 'store'))) == before + 2
  gin.clear_config()


def test_infer_rejects_bad_input_naming_line_and_field(trained, tmp_path):
  root, argv = trained
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'language': 'hi', 'question': 'q', 'title': 't', 'context': 'c'}) + '\n' +
                 json.dumps({'language': 'hi', 'question': 'q', 'title': 't'}) + '\n')
  gin.clear_config()
  with pytest.raises(readers.DataError, match=r"bad.jsonl:2: field 'context'"):
    inference.main(argv + [f"--gin.infer.input_file='{bad}'", f"--gin.infer.output_file='{tmp_path / 'o'}'"])
  gin.clear_config()


def test_merge_is_exact_for_the_trained_run(trained):
  """Algorithm 2 runs θ'_τ = θ_τ ⊕ θ_PEFT: the merged model's logits equal the LoRA model's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  root, argv = trained
  gin.clear_config()
  cli.parse_gin(argv, 'test')
  _, cfg, variables, _ = experiment.load_tau(experiment.Experiment(), experiment.Recipe())
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
  variables['lora'] = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                             variables['lora'])  # as after a long training
  merged, merged_cfg = experiment.merge(cfg, variables)
  tokens = jnp.arange(1, 21, dtype=jnp.int32)[None]
  a, _ = model_lib.Transformer(cfg).apply(variables, tokens)
  b, _ = model_lib.Transformer(merged_cfg).apply({'params': merged}, tokens)
  base, _ = model_lib.Transformer(dataclasses.replace(cfg, lora=None)).apply({'params': variables['params']}, tokens)
  assert float(jnp.max(jnp.abs(a - base))) > 1e-2  # the adapter changes the outputs
  assert float(jnp.max(jnp.abs(a - b))) < 1e-4
  assert os.path.exists(os.path.join(experiment.Experiment().run_dir, experiment.TRAINABLE_FILE))
  gin.clear_config()
