"""Rationale stores written as users write them: `fiat rationales` (beta.run.rationales) with a β backend."""
import hashlib
import json
import os

import gin

from fiat_jax.beta import backends
from fiat_jax.beta import prompts
from fiat_jax.beta import rationales as beta_run
from fiat_jax.data import readers


def _rationale(shown: str) -> str:
  return f"Rationale {hashlib.sha256(shown.encode('utf-8')).hexdigest()[:8]}."  # short and ASCII: fits tiny τ


def rationale_for(example: dict, task: str) -> str:
  """What ScriptedBeta reasons by default about an example (tests assert it reaches τ's inputs)."""
  return _rationale(prompts.format_input(example, prompts.task_spec(task)))


@gin.configurable
class ScriptedBeta:
  """A β backend without a model: its reply to an input is chosen by the test (None: β fails on it)."""

  def __init__(self, name: str = "scripted", replies: dict | None = None, answer: str = "yes"):
    self.identity = f"scripted:{name}"
    self.replies, self.answer = replies or {}, answer
    self.asked = 0

  def map(self, requests, sampling):
    del sampling
    for i, (messages, _) in enumerate(requests):
      self.asked += 1
      shown = messages[-1]["content"]  # the new input as I_β formats it
      reply = self.replies.get(shown, f"{_rationale(shown)}\nAnswer: {self.answer}")
      if reply is None:
        yield i, backends.Completion([], None, None, 0.0, "scripted: no reply")
      else:
        yield i, backends.Completion([reply], len(shown), len(reply), 0.0)


def replies_by_id(task: str, data_dir: str, replies) -> dict:
  """ScriptedBeta's {formatted input: reply} from {example id: reply} or from reply(example)."""
  spec = prompts.task_spec(task)
  out = {}
  for split in readers.SPLITS:
    for ex in readers.read_split(task, data_dir, split):
      if callable(replies):
        out[prompts.format_input(ex, spec)] = replies(ex)
      elif ex["id"] in replies:
        out[prompts.format_input(ex, spec)] = replies[ex["id"]]
  return out


def write_store(store_dir, task: str, data_dir: str, beta=None, splits=readers.SPLITS, **kw) -> str:
  """`fiat rationales` into store_dir (default β: ScriptedBeta; default I_β: tasks/prompts/); returns the dir."""
  result = beta_run.rationales(task=task, data_dir=data_dir, store_dir=str(store_dir), beta=beta or ScriptedBeta(),
                               splits=tuple(splits), progress=False, **kw)
  assert result["pending"] == 0 and result["stopped"] is None, result
  return str(store_dir)


def prompt_files(root, task: str, tag: str = "") -> dict:
  """Short I_β files (one exemplar per XOR-AttriQA language, so I_β differs per language); `tag` changes them."""
  os.makedirs(root, exist_ok=True)
  instruction, exemplars = os.path.join(root, f"i_beta{tag}.txt"), os.path.join(root, f"exemplars{tag}.jsonl")
  with open(instruction, "w", encoding="utf-8") as f:
    f.write(f"Reason in English, then answer.{tag}\n")
  with open(exemplars, "w", encoding="utf-8") as f:
    if task == "xor_attriqa":
      for lang in readers.XOR_ATTRIQA_LANGUAGES:
        f.write(json.dumps({"id": f"x-{lang}", "language": lang, "question": "Q?", "answer": "A", "passage": "P.",
                            "label": True, "rationale": f"P says A ({lang})."}) + "\n")
    else:
      f.write(json.dumps({"id": "x", "language": "hi", "question": "Q?", "title": "T", "context": "C.",
                          "target": "C", "rationale": "C says so."}) + "\n")
  return dict(instruction_file=instruction, exemplars_file=exemplars)
