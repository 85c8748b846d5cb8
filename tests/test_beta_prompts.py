"""I_beta prompts: exemplar files, the held-out check, plain-text rendering and the answer parser."""
import collections
import json
import os

import pytest

from fiat_jax.beta import prompts
from tasks import xor_attriqa
from tasks import xtreme_up

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


@pytest.mark.parametrize("raw, rationale, answer", [
    (" The passage says 1913.\nAnswer: Yes", "The passage says 1913.", "Yes"),
    ("Reasoning: It says so.\nAnswer: No\n\nQuestion: next one\nAnswer: Yes", "It says so.", "No"),
    ("Explanation: step one.\nFinal answer: **No**.", "step one.", "No"),
    ("**Reasoning:** checked.\n**Answer:** Pather Panchali", "checked.", "Pather Panchali"),
    ("Some thought.\nANSWER: \"6.15 km\"", "Some thought.", "6.15 km"),
    ("Thinking.\nAnswer:\n\nYes", "Thinking.", "Yes"),
    ("The passage names him, so the answer is Jean Sibelius.", "The passage names him, so", "Jean Sibelius"),
    ("It says Dev lives in Goa. Answer: Goa", "It says Dev lives in Goa.", "Goa"),
    ("Reasoning: Dev is her friend. Final answer: No Answer.", "Dev is her friend.", "No Answer"),
    ("Reasoning: the passage is about a bridge.", "the passage is about a bridge.", None),
    ("", "", None),
])
def test_parse_output_variants(raw, rationale, answer):
  parsed = prompts.parse_output(raw)
  assert parsed.answer == answer
  assert parsed.rationale == rationale


def test_candidate_answer_line_is_not_the_final_answer():
  parsed = prompts.parse_output("Candidate answer: Moscow is named.\nAnswer: Yes")
  assert parsed.answer == "Yes"
  assert parsed.rationale == "Candidate answer: Moscow is named."


@pytest.mark.parametrize("answer, label", [("Yes", True), ("yes, it is supported", True), ("No", False),
                                           ("Not supported", False), ("maybe", None), (None, None)])
def test_attriqa_label(answer, label):
  assert xor_attriqa.beta_prediction(answer) is label


@pytest.mark.parametrize("answer, prediction", [("No Answer", "No Answer"), ("no answer.", "No Answer"),
                                                ("Unanswerable", "No Answer"), ("1913", "1913"), (None, None)])
def test_xqa_answer(answer, prediction):
  assert xtreme_up.beta_prediction(answer) == prediction


def test_render_plain_exact_text():
  messages = [{"role": "system", "content": "Instr."}, {"role": "user", "content": "Question: a"},
              {"role": "assistant", "content": "Reasoning: r\nAnswer: Yes"}, {"role": "user", "content": "Question: b"}]
  assert prompts.render_plain(messages) == ("Instr.\n\nQuestion: a\nReasoning: r\nAnswer: Yes\n\nQuestion: b\n"
                                            "Reasoning:")
  with pytest.raises(ValueError, match="unknown chat role 'tool'"):
    prompts.render_plain([{"role": "tool", "content": "x"}])


def test_shipped_exemplars_follow_the_paper():
  xor = prompts.load_exemplars("xor_attriqa")
  assert len(xor) == 20
  per_lang = collections.Counter((ex["language"], ex["label"]) for ex in xor)
  assert per_lang == {(lang, label): 2 for lang in ("bn", "fi", "ja", "ru", "te") for label in (True, False)}
  xqa = prompts.load_exemplars("xtreme_up_xqa")
  assert len(xqa) == 4 and {ex["language"] for ex in xqa} == {"bn"}
  assert sum(ex["target"] == "No Answer" for ex in xqa) == 1
  for ex in xor + xqa:  # English reasoning: Latin script only, whatever the question's script
    assert max(map(ord, ex["rationale"])) < 0x250, ex["id"]


def test_i_beta_per_language_and_shared():
  instruction = prompts.load_instruction("xor_attriqa")
  xor = prompts.load_exemplars("xor_attriqa")
  ja = prompts.i_beta_messages(instruction, prompts.select_exemplars(xor, "xor_attriqa", "ja"), "xor_attriqa")
  assert [m["role"] for m in ja] == ["system"] + ["user", "assistant"] * 4
  assert ja[1]["content"].startswith("Question: 日本で一番長い川は何ですか?\nCandidate answer: 信濃川\nPassage: ")
  assert ja[2]["content"].endswith("\nAnswer: Yes")
  xqa = prompts.load_exemplars("xtreme_up_xqa")
  assert prompts.select_exemplars(xqa, "xtreme_up_xqa", "mr") == xqa
  with pytest.raises(ValueError, match="no exemplars for language 'xx'"):
    prompts.select_exemplars(xor, "xor_attriqa", "xx")
  text = prompts.render_plain(prompts.prompt_messages(ja, {"id": "e", "question": "Q?", "answer": "A",
                                                           "passage": "P\n\nP2"}, "xor_attriqa"))
  assert text.endswith("Question: Q?\nCandidate answer: A\nPassage: P P2\nReasoning:")
  assert text.count("\nAnswer: ") == 4


def test_check_refuses_heldout_exemplars_by_id_and_by_content():
  xqa = prompts.load_exemplars("xtreme_up_xqa")
  same_content = {k: xqa[1][k] for k in ("question", "title", "context", "target")} | {"id": "val-7",
                                                                                      "language": "bn"}
  with pytest.raises(ValueError, match=r"exemplars_xtreme_up_xqa.jsonl:2: exemplar .* is held-out example 'val-7'"):
    prompts.check_exemplars(xqa, [same_content], "xtreme_up_xqa")
  same_id = {"id": xqa[3]["id"], "language": "bn", "question": "other", "title": "t", "context": "c", "target": "x"}
  with pytest.raises(ValueError, match="exemplars must come from the train split"):
    prompts.check_exemplars(xqa, [same_id], "xtreme_up_xqa")
  prompts.check_exemplars(xqa, [same_content | {"question": "a different question"}], "xtreme_up_xqa")


def test_shipped_exemplars_are_not_in_the_fixture_heldout_splits():
  from fiat_jax.data import readers
  for task, sub in (("xor_attriqa", "xor_attriqa"), ("xtreme_up_xqa", "xtreme_up")):
    data_dir = os.path.join(TESTDATA, sub)
    heldout = readers.read_split(task, data_dir, "validation") + readers.read_split(task, data_dir, "test")
    prompts.check_exemplars(prompts.load_exemplars(task), heldout, task)  # raises on overlap
    assert len(heldout) >= 10


def test_exemplars_from_the_users_train_split(tmp_path):
  path = tmp_path / "ex.jsonl"
  path.write_text(json.dumps({"id": "tr-1", "rationale": "It says 1921."}) + "\n")
  exemplars = prompts.load_exemplars("xtreme_up_xqa", str(path))
  train = [{"id": "tr-1", "language": "bn", "question": "Q", "title": "T", "context": "C 1921.", "target": "1921",
            "raw": {}}]
  resolved = prompts.resolve_exemplars(exemplars, train, "xtreme_up_xqa")
  assert resolved[0]["context"] == "C 1921." and resolved[0]["rationale"] == "It says 1921."
  with pytest.raises(ValueError, match=r"ex.jsonl:1: exemplar id 'tr-1' has no input fields and is not a train"):
    prompts.resolve_exemplars(exemplars, [], "xtreme_up_xqa")


@pytest.mark.parametrize("line, error", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (json.dumps({"id": "b", "rationale": "r", "language": "bn", "question": "q", "title": "t", "context": ""}),
     r"bad.jsonl:2: field 'context' must be a non-empty string"),
    (json.dumps({"id": "a", "rationale": "r"}), r"bad.jsonl:2: duplicate exemplar id 'a'"),
    (json.dumps({"id": "c", "rationale": "one\n\ntwo"}), r"bad.jsonl:2: 'rationale' must be one paragraph"),
])
def test_bad_exemplar_files_name_file_and_line(tmp_path, line, error):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"id": "a", "rationale": "r"}) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=error):
    prompts.load_exemplars("xtreme_up_xqa", str(path))
