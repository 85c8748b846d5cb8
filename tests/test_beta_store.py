"""The rationale store: keys, append-only shards, torn last lines, resume sets, select, status."""
import hashlib
import json
import os

import pytest

from fiat_jax.beta import store

SAMPLING = {"temperature": 0.0, "max_new_tokens": 8}


def _record(key, example_id, split="train", language="bn", error=None, answer="Yes", time=1.0):
  return store.make_record(key=key, example_id=example_id, task="xor_attriqa", split=split, language=language,
                           input_hash="fedcba9876543210", i_beta_version="0123456789abcdef", beta="http:m", sampling=SAMPLING,
                           rationale=None if error else f"because {key}", answer=None if error else answer,
                           raw=None if error else f"because {key}\nAnswer: {answer}", samples=[], tokens_in=10,
                           tokens_out=5, latency_s=0.1, backend="HttpBeta", time=time, error=error)


def test_record_key_changes_with_every_part():
  base = ("ex1", {"question": "q"}, "I_beta text", "http:m", SAMPLING)
  key = store.record_key(*base)
  assert len(key) == 64 and key == store.record_key(*base)
  variants = [("ex2",) + base[1:], (base[0], {"question": "q2"}) + base[2:], base[:2] + ("I_beta 2",) + base[3:],
              base[:3] + ("local:/ckpt",) + base[4:], base[:4] + ({"temperature": 0.7, "max_new_tokens": 8},)]
  assert len({store.record_key(*v) for v in variants} | {key}) == 6
  assert store.i_beta_version("I_beta text") == hashlib.sha256(b"I_beta text").hexdigest()[:16]


def test_make_record_requires_every_field():
  with pytest.raises(ValueError, match=r"unknown fields \['colour'\], missing fields \['answer'"):
    store.make_record(colour="red", **{f: None for f in store.FIELDS if f not in ("answer", "time")})


def test_append_read_and_resume(tmp_path):
  d = str(tmp_path / "store")
  with store.ShardWriter(d, 0) as w:
    w.append(_record("k1", "e1", time=1.0))
    w.append(_record("k2", "e2", error="HTTP 500", time=2.0))
    w.append(_record("k3", "e3", split="test", language="ja", time=3.0))
  with store.ShardWriter(d, 3) as w:  # another process's shard
    w.append(_record("k1b", "e1", answer="No", time=4.0))
    w.append(_record("k2", "e2", time=5.0))  # the failure retried on the next run
  assert sorted(os.listdir(d)) == ["shard-00000.jsonl", "shard-00003.jsonl"]
  records = store.read_records(d)
  assert [r["key"] for r in records] == ["k1", "k2", "k3", "k1b", "k2"]
  assert store.done_keys(records) == {"k1", "k2", "k3", "k1b"}
  line = open(os.path.join(d, "shard-00000.jsonl"), encoding="utf-8").readline()
  assert list(json.loads(line)) == list(store.FIELDS)


def test_torn_last_line_is_reported_ignored_and_repaired(tmp_path, caplog):
  d = str(tmp_path)
  with store.ShardWriter(d, 0) as w:
    w.append(_record("k1", "e1"))
    w.append(_record("k2", "e2"))
  path = store.shard_path(d, 0)
  full = open(path, "rb").read()
  torn = json.dumps(_record("k3", "e3")).encode()[:40]
  with open(path, "ab") as f:
    f.write(torn)  # a crash in the middle of writing record 3
  records, n_torn = store.read_shard(path)
  assert [r["key"] for r in records] == ["k1", "k2"] and n_torn == 1
  assert "torn last line (40 bytes" in caplog.text
  with store.ShardWriter(d, 0) as w:  # the restarted run drops the torn tail before appending
    w.append(_record("k3", "e3"))
  assert open(path, "rb").read().startswith(full)
  assert [r["key"] for r in store.read_records(d)] == ["k1", "k2", "k3"]
  assert store.read_shard(path)[1] == 0


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path, caplog):
  path = store.shard_path(str(tmp_path), 0)
  with open(path, "w") as f:
    f.write(json.dumps(_record("k1", "e1")) + "\n" + json.dumps(_record("k2", "e2")))
  records, torn = store.read_shard(path)
  assert [r["key"] for r in records] == ["k1", "k2"] and torn == 0
  with store.ShardWriter(str(tmp_path), 0) as w:  # the writer adds the newline instead of dropping the record
    w.append(_record("k3", "e3"))
  assert "lacked its final newline; kept it" in caplog.text
  assert [r["key"] for r in store.read_records(str(tmp_path))] == ["k1", "k2", "k3"]


def test_repair_moves_corrupt_lines_to_a_side_file(tmp_path):
  d = str(tmp_path)
  good = [json.dumps(_record(f"k{i}", f"e{i}")) for i in range(4)]
  path = store.shard_path(d, 0)
  with open(path, "w") as f:
    f.write("\n".join([good[0], good[1][:30] + "\x00garbage", good[2], "[1, 2]", good[3]]) + "\n")
  with pytest.raises(ValueError, match=r"shard-00000.jsonl:2: corrupt record .*`fiat rationales --repair`"):
    store.read_records(d)
  assert store.repair(d) == {path: [2, 4]}
  assert [r["key"] for r in store.read_records(d)] == ["k0", "k2", "k3"]
  side = [json.loads(line) for line in open(path + store.CORRUPT_SUFFIX)]
  assert [(e["line"], e["bytes"]) for e in side] == [(2, 38), (4, 6)] and side[1]["text"] == "[1, 2]"
  assert store.repair(d) == {}  # nothing left to move


def test_corrupt_middle_line_is_an_error_naming_file_and_line(tmp_path):
  path = store.shard_path(str(tmp_path), 2)
  with open(path, "w") as f:
    f.write(json.dumps(_record("k1", "e1")) + "\n{garbage\n" + json.dumps(_record("k2", "e2")) + "\n")
  with pytest.raises(ValueError, match=r"shard-00002.jsonl:2: corrupt record"):
    store.read_records(str(tmp_path))


def test_status_counts_and_table():
  records = [_record("a", "1"), _record("b", "2", error="timeout"), _record("c", "3", split="test", language="ja"),
             _record("d", "4", split="test", language="ja", error="x"), _record("d", "4", split="test",
                                                                                   language="ja")]
  expected = [("train", "bn", "a"), ("train", "bn", "b"), ("train", "bn", "z"), ("test", "ja", "c"),
              ("test", "ja", "d"), ("test", "ja", "y")]
  counts = store.status_counts(records, expected)
  assert counts == {("train", "bn"): {"done": 1, "failed": 1, "pending": 1},
                    ("test", "ja"): {"done": 2, "failed": 0, "pending": 1}}
  table = store.format_status(counts).splitlines()
  assert table[0].split() == ["split", "language", "done", "failed", "pending"]
  assert table[1].split() == ["test", "ja", "2", "0", "1"]
  assert table[2].split() == ["train", "bn", "1", "1", "1"]
  assert table[3].split() == ["all", "all", "3", "1", "2"]


# ---- select: the one lookup of every reader (training, ICL, evaluate, infer) --------------------------------------

EXAMPLES = [{"id": "e1", "language": "bn", "question": "Q1?", "answer": "A1", "passage": "P1."},
            {"id": "e2", "language": "ja", "question": "Q2?", "answer": "A2", "passage": "P2."}]


def _written(d, beta="http:A", i_beta="I", text="R", examples=EXAMPLES, sampling=None, legacy=False):
  """Records as `fiat rationales` writes them (plan + build_record), with I_beta text f'{i_beta} {language}'."""
  from fiat_jax.beta import backends
  from fiat_jax.beta import rationales as beta_run
  sampling = sampling or backends.Sampling()
  texts = {ex["language"]: f"{i_beta} {ex['language']}" for ex in examples}
  items = beta_run.plan("xor_attriqa", {"test": examples}, ("test",), {lang: [] for lang in texts}, texts, beta,
                        sampling)
  with store.ShardWriter(d, 0) as w:
    for it in items:
      record = beta_run.build_record(it, backends.Completion([f"{text} {it.example['id']}.\nAnswer: yes"], 1, 1, 0.1),
                                     "xor_attriqa", beta, sampling, "HttpBeta")
      if legacy:  # written before records carried input_hash
        del record["input_hash"]
      w.append(record)
  return texts


def _rationales(selection):
  return [None if r is None else r["rationale"] for r in selection.records]


def test_select_pins_beta_and_i_beta_and_refuses_a_mixture_it_cannot_resolve(tmp_path):
  d = str(tmp_path)
  texts_a = _written(d, beta="http:A", text="A")
  _written(d, beta="http:B", text="B")
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES, beta="http:A")) == ["A e1.", "A e2."]
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES, beta="http:B", i_beta_texts=texts_a)) == [
      "B e1.", "B e2."]
  with pytest.raises(ValueError, match=r"bn: β 'http:A', I_β version \w+ \(1 examples\); β 'http:B', I_β version "):
    store.select(d, "xor_attriqa", EXAMPLES)  # which β? the reader does not know: refused, naming both
  other = store.select(d, "xor_attriqa", EXAMPLES, beta="http:C")
  assert other.records == [None, None]
  assert other.missing[0] == ("stored from another β ('http:A', this run: 'http:C'); "
                              "stored from another β ('http:B', this run: 'http:C')")
  _written(d, beta="http:A", i_beta="I2", text="A2")  # β A again with another I_beta
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES, beta="http:A", i_beta_texts=texts_a)) == [
      "A e1.", "A e2."]
  with pytest.raises(ValueError, match="ja: β 'http:A', I_β version"):
    store.select(d, "xor_attriqa", EXAMPLES, beta="http:A")


def test_select_takes_one_i_beta_per_language(tmp_path):
  """I_beta differs per language (XOR-AttriQA's exemplars): one version per language is not a mixture."""
  d = str(tmp_path)
  texts = _written(d)
  assert len({store.i_beta_version(t) for t in texts.values()}) == 2
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES)) == ["R e1.", "R e2."]


def test_select_a_reused_id_with_another_input_is_missing(tmp_path):
  d = str(tmp_path)
  _written(d)
  changed = [EXAMPLES[0] | {"question": "A new question?"}, EXAMPLES[1]]
  sel = store.select(d, "xor_attriqa", changed, beta="http:A")
  assert _rationales(sel) == [None, "R e2."]
  assert sel.missing == {0: "stored for another input under the same id"}
  assert sel.by_id(changed) == {"e1": {"missing": "stored for another input under the same id"},
                                "e2": sel.records[1]}
  _written(d, examples=changed[:1], text="New")  # beta asked about the new input: now both are stored
  assert _rationales(store.select(d, "xor_attriqa", changed)) == ["New e1.", "R e2."]
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES)) == ["R e1.", "R e2."]


def test_select_matches_records_without_input_hash_by_their_key(tmp_path):
  d = str(tmp_path)
  texts = _written(d, legacy=True)
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES, i_beta_texts=texts)) == ["R e1.", "R e2."]
  changed = [EXAMPLES[0] | {"passage": "Another passage."}, EXAMPLES[1]]
  sel = store.select(d, "xor_attriqa", changed, i_beta_texts=texts)
  assert _rationales(sel) == [None, "R e2."] and sel.missing[0] == "stored for another input under the same id"
  unknown = store.select(d, "xor_attriqa", EXAMPLES)  # no I_beta text: the key cannot be checked
  assert unknown.records == [None, None] and "older store" in unknown.missing[0]


def test_select_the_latest_of_one_source_and_failures_are_missing(tmp_path):
  d = str(tmp_path)
  _written(d, text="First")
  _written(d, text="Second")  # the same input asked again by the same beta and I_beta
  assert _rationales(store.select(d, "xor_attriqa", EXAMPLES)) == ["Second e1.", "Second e2."]
  with store.ShardWriter(d, 1) as w:
    w.append(_record("k9", "e9", language="bn", error="HTTP 500"))
  sel = store.select(d, "xor_attriqa", [{"id": "e9", "language": "bn", "question": "Q", "answer": "A",
                                         "passage": "P"}, {"id": "e10", "language": "bn", "question": "Q",
                                                           "answer": "A", "passage": "P"}])
  assert sel.missing == {0: "β failed on it (HTTP 500)", 1: "not in the store"}
