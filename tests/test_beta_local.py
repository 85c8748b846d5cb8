"""LocalBeta (our JAX model) against HttpBeta serving the same model; self-consistency; the ICL baseline."""
import json
import os

import pytest

from fiat_jax.beta import backends
from fiat_jax.beta import rationales
from fiat_jax.beta import serve
from fiat_jax.beta import store
import store_helpers
from test_beta_http import write_prompt_files, write_xqa_data

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


@pytest.fixture(scope="module")
def tiny_beta():
  return backends.tiny_local_beta(seed=0, batch_size=8)


@pytest.fixture
def task_dirs(tmp_path):
  data = write_xqa_data(str(tmp_path / "data"), sizes={"train": 1, "validation": 2, "test": 3})
  instruction, exemplars = write_prompt_files(str(tmp_path))
  return dict(task="xtreme_up_xqa", data_dir=data, instruction_file=instruction, exemplars_file=exemplars)


def _by_example(store_dir):
  return {(r["split"], r["example_id"]): r for r in store.read_records(store_dir)}


@pytest.mark.parametrize("sampling", [backends.Sampling(max_new_tokens=12),
                                      backends.Sampling(temperature=1.0, num_samples=3, max_new_tokens=6, seed=5)],
                         ids=["greedy", "self_consistency"])
def test_local_and_http_store_the_same_rationales(tmp_path, tiny_beta, task_dirs, sampling):
  local = rationales.rationales(store_dir=str(tmp_path / "local"), beta=tiny_beta, sampling=sampling, progress=False,
                         **task_dirs)
  srv = serve.start(tiny_beta, request_log=str(tmp_path / "log.jsonl"), max_batch=8)
  try:
    http = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, concurrency=3)
    remote = rationales.rationales(store_dir=str(tmp_path / "http"), beta=http, sampling=sampling, progress=False,
                            **task_dirs)
  finally:
    srv.shutdown()
  assert local["done"] == remote["done"] == 12 and local["failed"] == remote["failed"] == 0
  a, b = _by_example(str(tmp_path / "local")), _by_example(str(tmp_path / "http"))
  assert a.keys() == b.keys() and len(a) == 12
  fields = ("rationale", "answer", "raw", "samples", "tokens_in", "tokens_out")
  assert [{f: r[f] for f in fields} for r in a.values()] == [{f: b[k][f] for f in fields} for k in a]
  assert {r["backend"] for r in a.values()} == {"LocalBeta"} and {r["beta"] for r in b.values()} == {
      "http:local:tiny-random-0"}
  raws = [r["raw"] for r in a.values()]
  assert sum(bool(t) for t in raws) >= 6  # the random model does say something
  if sampling.num_samples > 1:
    assert all(len(r["samples"]) == 3 for r in a.values())
    assert len({tuple(s["raw"] for s in r["samples"]) for r in a.values()}) == 12  # per-example seeds differ
    assert any(len({s["raw"] for s in r["samples"]}) > 1 for r in a.values())
  else:
    assert all(r["samples"] == [] for r in a.values())


def test_sampled_rationales_repeat_under_the_same_seed(tmp_path, tiny_beta, task_dirs):
  sampling = backends.Sampling(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=6, seed=7)
  rationales.rationales(store_dir=str(tmp_path / "a"), beta=tiny_beta, sampling=sampling, progress=False, **task_dirs)
  rationales.rationales(store_dir=str(tmp_path / "b"), beta=tiny_beta, sampling=sampling, progress=False, **task_dirs)
  again = rationales.rationales(store_dir=str(tmp_path / "a"), beta=tiny_beta, sampling=sampling, progress=False,
                         **task_dirs)
  assert again["asked"] == 0  # everything stored: beta is not asked again
  a, b = _by_example(str(tmp_path / "a")), _by_example(str(tmp_path / "b"))
  assert [r["raw"] for r in a.values()] == [b[k]["raw"] for k in a]


def test_self_consistency_majority_vote():
  item = rationales.Item("test", {"id": "e1", "language": "bn"}, [], "v", "k" * 64, 0)
  sampling = backends.Sampling(temperature=0.7, num_samples=4)
  texts = ["A.\nAnswer: no", "B.\nAnswer: Yes", "C.\nAnswer: yes.", "D, no verdict"]
  comp = backends.Completion(texts, 10, 20, 0.5)
  rec = rationales.build_record(item, comp, "xor_attriqa", "http:m", sampling, "HttpBeta")
  assert (rec["rationale"], rec["answer"], rec["raw"]) == ("B.", "Yes", texts[1])
  assert [s["answer"] for s in rec["samples"]] == ["no", "Yes", "yes", None]
  xqa = rationales.build_record(item, backends.Completion(["x\nAnswer: The Volga", "y\nAnswer: the  volga",
                                                    "z\nAnswer: Don"], 1, 1, 0.1),
                         "xtreme_up_xqa", "http:m", backends.Sampling(temperature=0.7, num_samples=3), "HttpBeta")
  assert xqa["answer"] == "The Volga"
  failed = rationales.build_record(item, backends.Completion([], None, None, 1.0, "HTTP 500"), "xor_attriqa", "http:m",
                            sampling, "HttpBeta")
  assert (failed["error"], failed["rationale"], failed["samples"]) == ("HTTP 500", None, [])


def _store_answers(store_dir, task, answers, name="A", **kw):
  """`fiat rationales` on the test split with a ScriptedBeta answering answers[id] (None: beta fails on it)."""
  data_dir = os.path.join(TESTDATA, "xor_attriqa" if task == "xor_attriqa" else "xtreme_up")
  replies = {i: None if a is None else f"The passage decides.\nAnswer: {a}" for i, a in answers.items()}
  beta = store_helpers.ScriptedBeta(name, store_helpers.replies_by_id(task, data_dir, replies))
  return store_helpers.write_store(store_dir, task, data_dir, beta, splits=("test",), **kw)


def test_icl_baseline_xor_attriqa_scores_the_chosen_beta(tmp_path):
  from fiat_jax.data import readers
  data_dir = os.path.join(TESTDATA, "xor_attriqa")
  test = readers.read_split("xor_attriqa", data_dir, "test")
  assert len(test) == 15
  answers = {}
  for i, ex in enumerate(test):
    right = "Yes" if ex["label"] else "No"
    wrong = "No" if ex["label"] else "Yes"
    answers[ex["id"]] = {"bn": right, "fi": wrong, "ja": "Maybe", "ru": right, "te": right}[ex["language"]]
    if ex["language"] == "te" and i % 3 == 0:
      answers[ex["id"]] = None  # beta fails on it: counted wrong
  store_dir = _store_answers(str(tmp_path / "store"), "xor_attriqa", answers)
  out = str(tmp_path / "icl" / "metrics.json")
  result = rationales.icl_baseline(task="xor_attriqa", data_dir=data_dir, store_dir=store_dir, output_file=out)
  accuracy = {lang: row["accuracy"] for lang, row in result["per_language"].items()}
  assert accuracy == pytest.approx({"bn": 100.0, "fi": 0.0, "ja": 0.0, "ru": 100.0, "te": 200 / 3})
  assert result["headline"]["accuracy_mean_over_languages"]["value"] == pytest.approx((200 + 200 / 3) / 5)
  assert result["headline"]["auc_pr_mean_over_languages"] is None  # text only: no AUC-PR
  assert result["icl"] == {"split": "test", "store_dir": store_dir, "missing": 1, "unparsed": 3}
  assert json.load(open(out))["icl"]["missing"] == 1
  # Another beta's answers (all wrong) in the same store: the ICL row scores the beta it is given, and without one
  # it refuses the mixture instead of scoring whichever record came last.
  flipped = {ex["id"]: "No" if ex["label"] else "Yes" for ex in test}
  _store_answers(store_dir, "xor_attriqa", flipped, name="B")
  a = rationales.icl_baseline(task="xor_attriqa", data_dir=data_dir, store_dir=store_dir, beta="scripted:A")
  b = rationales.icl_baseline(task="xor_attriqa", data_dir=data_dir, store_dir=store_dir, beta="scripted:B")
  assert a["per_language"] == result["per_language"] and a["icl"]["missing"] == 1
  assert b["overall"]["accuracy"] == 0.0 and b["icl"]["missing"] == 0
  with pytest.raises(ValueError, match=r"bn: β 'scripted:\w', I_β version \w+ \(3 examples\); β 'scripted:\w'"):
    rationales.icl_baseline(task="xor_attriqa", data_dir=data_dir, store_dir=store_dir)


def test_icl_baseline_xtreme_up(tmp_path):
  from fiat_jax.data import readers
  data_dir = os.path.join(TESTDATA, "xtreme_up")
  test = readers.read_split("xtreme_up_xqa", data_dir, "test", languages=["bn"])
  answers = {ex["id"]: "no answer." if ex["target"] == "No Answer" else "the Pather Panchali (1955)" for ex in test}
  store_dir = _store_answers(str(tmp_path / "store"), "xtreme_up_xqa", answers, languages=["bn"])
  result = rationales.icl_baseline(task="xtreme_up_xqa", data_dir=data_dir, store_dir=store_dir, languages=["bn"])
  # "No Answer" is exact; "Pather Panchali" vs "pather panchali 1955": precision 2/3, recall 1 -> F1 0.8.
  assert result["per_language"]["bn"]["f1"] == pytest.approx((100 + 80) / 2)
  assert result["per_language"]["bn"]["em"] == pytest.approx(50.0)
  assert result["icl"]["missing"] == 0 and result["icl"]["unparsed"] == 0


def test_local_beta_from_a_hugging_face_checkpoint_sharded_over_the_mesh(tmp_path):
  import jax
  import seqio
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from fiat_jax.model import decoding
  from fiat_jax.model import hf
  from fiat_jax.model import transformer as model_lib
  vocab = seqio.ByteVocabulary()
  config = transformers.LlamaConfig(vocab_size=vocab.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=512, tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
  beta = backends.local_beta(checkpoint_dir=str(tmp_path / "ckpt"), vocabulary=vocab, max_len=512)
  assert beta.identity == f"local:{tmp_path / 'ckpt'}" and len(jax.devices()) == 8
  assert len(jax.tree_util.tree_leaves(beta.variables)[0].sharding.device_set) == 8  # spread over the mesh
  texts = ["Question: Q?\nReasoning:", "Another, longer prompt.\nReasoning:"]
  comps = beta.complete_texts(texts, backends.Sampling(max_new_tokens=10, stop=()), [0, 0])
  cfg, params = hf.load(str(tmp_path / "ckpt"))  # on one device, decoded prompt by prompt
  for text, comp in zip(texts, comps):
    ref = decoding.generate(model_lib.Transformer(cfg), {"params": params}, [list(vocab.encode(text))],
                            max_new_tokens=10, eos_id=vocab.eos_id)
    assert comp.texts == [vocab.decode(ref.tokens[0])] and comp.tokens_out == len(ref.tokens[0])
    assert comp.tokens_in == len(vocab.encode(text)) and comp.error is None
