"""I_beta: instruction + chain-of-thought exemplars + the new input, and the parser of beta's answers."""
import dataclasses
import hashlib
import json
import os
import re

import tasks

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tasks",
                           "prompts")
REASONING_CUE = "Reasoning:"  # beta continues from here in the plain-text rendering.


def task_spec(task: str):
  """The data set's definition (tasks/<dataset>.py): the fields β sees, the exemplars' answers and their language."""
  return tasks.definition(task)


def content_hash(example: dict, spec) -> str:
  """sha256 (first 16 hex) of the fields beta sees: finds an exemplar among held-out examples whatever its id."""
  payload = json.dumps([example.get(f) for f in spec.INPUT_FIELDS], ensure_ascii=False)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def format_input(example: dict, spec) -> str:
  lines = []
  for field, label in spec.FIELDS:
    value = example.get(field)
    if not isinstance(value, str):
      raise ValueError(f"example {example.get('id')!r}: field {field!r} must be a string, got {type(value).__name__}")
    lines.append(f"{label}: {' '.join(value.split())}")  # one line per field: blank lines end beta's answer
  return "\n".join(lines)


def format_output(rationale: str, answer: str) -> str:
  return f"{REASONING_CUE} {rationale.strip()}\nAnswer: {answer.strip()}"


def load_instruction(task: str, path: str | None = None) -> str:
  """The instruction part of I_beta (tasks/prompts/i_beta_{task}.txt unless a path is given)."""
  path = path or os.path.join(PROMPTS_DIR, f"i_beta_{task}.txt")
  with open(path, encoding="utf-8") as f:
    text = f.read().strip()
  if not text:
    raise ValueError(f"{path}: the I_beta instruction is empty")
  return text


def load_exemplars(task: str, path: str | None = None) -> list[dict]:
  """Exemplars, one JSON object a line: 'id', an English 'rationale' and the task's canonical example fields
  (language, inputs, label / target), or only 'id' and 'rationale' for a train example (see resolve_exemplars)."""
  spec = task_spec(task)
  path = path or os.path.join(PROMPTS_DIR, f"exemplars_{task}.jsonl")
  exemplars, ids = [], set()
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(ex, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object")
      given = ("id", "rationale")
      if any(f in ex for f in spec.INPUT_FIELDS):  # a stand-alone exemplar: every field must be there
        given += ("language",) + spec.INPUT_FIELDS
      for field in given:
        if not isinstance(ex.get(field), str) or not ex[field].strip():
          raise ValueError(f"{path}:{lineno}: field {field!r} must be a non-empty string")
      if "\n\n" in ex["rationale"]:
        raise ValueError(f"{path}:{lineno}: 'rationale' must be one paragraph (a blank line ends beta's answer)")
      if "language" in given:
        try:
          spec.exemplar_answer(ex)
        except ValueError as e:
          raise ValueError(f"{path}:{lineno}: {e}") from None
      if ex["id"] in ids:
        raise ValueError(f"{path}:{lineno}: duplicate exemplar id {ex['id']!r}")
      ids.add(ex["id"])
      exemplars.append(ex | {"_source": f"{path}:{lineno}"})
  if not exemplars:
    raise ValueError(f"{path}: no exemplars")
  return exemplars


def resolve_exemplars(exemplars: list[dict], train: list[dict], task: str) -> list[dict]:
  """Fills exemplars given only by id and rationale from the train split's example of that id."""
  spec = task_spec(task)
  by_id = {ex["id"]: ex for ex in train}
  out = []
  for ex in exemplars:
    if all(f in ex for f in spec.INPUT_FIELDS):
      out.append(ex)
    elif ex["id"] in by_id:
      out.append({k: v for k, v in by_id[ex["id"]].items() if k != "raw"} | {"rationale": ex["rationale"],
                                                                           "_source": ex.get("_source")})
    else:
      raise ValueError(f"{ex.get('_source', 'exemplars')}: exemplar id {ex['id']!r} has no input fields and is "
                       f"not a train example id")
  return out


def check_exemplars(exemplars: list[dict], heldout: list[dict], task: str, source: str = "exemplars") -> None:
  """Refuses exemplars that are validation or test examples (by id or by the content beta sees)."""
  spec = task_spec(task)
  by_id = {ex["id"]: ex for ex in heldout}
  by_content = {content_hash(ex, spec): ex for ex in heldout}
  for ex in exemplars:
    hit = by_id.get(ex["id"]) or by_content.get(content_hash(ex, spec))
    if hit is not None:
      raise ValueError(f"{ex.get('_source', source)}: exemplar {ex['id']!r} is held-out example {hit['id']!r} "
                       f"({hit.get('language')}); exemplars must come from the train split")


def select_exemplars(exemplars: list[dict], task: str, language: str, source: str = "exemplars") -> list[dict]:
  """The exemplars I_beta uses for one language: its own (XOR-AttriQA) or all of them (XTREME-UP)."""
  if not task_spec(task).EXEMPLARS_PER_LANGUAGE:
    return exemplars
  chosen = [ex for ex in exemplars if ex["language"] == language]
  if not chosen:
    raise ValueError(f"{source}: no exemplars for language {language!r} (have: "
                     f"{sorted({ex['language'] for ex in exemplars})})")
  return chosen


def i_beta_messages(instruction: str, exemplars: list[dict], task: str) -> list[dict]:
  """I_beta as chat messages: system instruction, then each exemplar as a user/assistant turn."""
  spec = task_spec(task)
  messages = [{"role": "system", "content": instruction}]
  for ex in exemplars:
    messages.append({"role": "user", "content": format_input(ex, spec)})
    messages.append({"role": "assistant", "content": format_output(ex["rationale"], spec.exemplar_answer(ex))})
  return messages


def prompt_messages(i_beta: list[dict], example: dict, task: str) -> list[dict]:
  """I_beta followed by the new input."""
  return i_beta + [{"role": "user", "content": format_input(example, task_spec(task))}]


def render_plain(messages: list[dict]) -> str:
  """Chat messages as one plain-text prompt; a trailing user turn gets the reasoning cue for beta to continue."""
  parts = []
  for m in messages:
    if m["role"] not in ("system", "user", "assistant"):
      raise ValueError(f"unknown chat role {m['role']!r}")
    parts.append(m["content"].strip() + ("\n" if m["role"] == "user" else "\n\n"))
  if messages and messages[-1]["role"] == "user":
    parts.append(REASONING_CUE)
  return "".join(parts)


def i_beta_text(i_beta: list[dict]) -> str:
  """The full I_beta text (what the store's i_beta_version hashes)."""
  return render_plain(i_beta)


# --- the answer parser -------------------------------------------------------------------------------------------

_MARKER = re.compile(r"^[ \t>*_#-]*(?:final[ \t]+answer|answer)[ \t*_]*[:：][ \t*_]*(.*)$", re.I | re.M)
_INLINE = re.compile(r"(?<=[.!?。])[ \t]+(?:final[ \t]+)?answer[ \t]*[:：][ \t]*(.+)$", re.I | re.M)
_PHRASE = re.compile(r"\b(?:the|my)[ \t]+(?:final[ \t]+)?answer[ \t]+is[ \t:]*(.+)$", re.I | re.M)
_LEAD = re.compile(r"^\s*\**\s*(?:reasoning|explanation|rationale)\s*\**\s*[:：]\s*\**\s*", re.I)


@dataclasses.dataclass(frozen=True)
class Parsed:
  rationale: str
  answer: str | None  # None: no answer found (kept and counted, never dropped)


def _clean_answer(text: str) -> str:
  previous = None
  while text != previous:  # markdown, quotes and a final full stop, in any nesting
    previous = text
    text = text.strip().strip("*_`").strip().rstrip(".。")
    if len(text) >= 2 and text[0] in "\"'“«" and text[-1] in "\"'”»":
      text = text[1:-1]
  return text


def parse_output(raw: str) -> Parsed:
  """Splits beta's output into rationale and final answer ("... Answer: X" and common variants)."""
  m = _MARKER.search(raw)
  for pattern in (_INLINE, _PHRASE):  # else the last "... done. Answer: X" / "the answer is X"
    if m is None:
      found = list(pattern.finditer(raw))
      m = found[-1] if found else None
  if m is None:
    return Parsed(_LEAD.sub("", raw.strip()).strip(), None)
  answer = _clean_answer(m.group(1))
  if not answer:  # "Answer:" alone on its line: take the next non-empty line.
    rest = [ln for ln in raw[m.end():].splitlines() if ln.strip()]
    answer = _clean_answer(rest[0]) if rest else ""
  rationale = _LEAD.sub("", raw[:m.start()].strip()).strip()
  return Parsed(rationale, answer or None)
