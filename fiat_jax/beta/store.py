"""The rationale store: append-only JSON-lines shards (one writer per shard, under an OS lock), keyed so a rerun
skips what is stored; `select` is how every reader picks the record of an example; `repair` moves corrupt lines
aside. Every complete record is kept: only a line that is not a JSON object is torn or corrupt."""
import collections
import fcntl
import glob
import hashlib
import json
import logging
import os
import time
from typing import NamedTuple, Sequence

from fiat_jax.beta import prompts
from fiat_jax.data import readers
from fiat_jax import run_files

SHARD_GLOB = "shard-*.jsonl"
FIELDS = ("key", "example_id", "task", "split", "language", "input_hash", "i_beta_version", "beta", "sampling",
          "rationale", "answer", "raw", "samples", "tokens_in", "tokens_out", "latency_s", "backend", "time", "error")


class StoreBusy(RuntimeError):
  """Another process holds a shard's writer lock."""


def parse_record(line: bytes) -> dict | None:
  """The record a line holds, or None when it is not a JSON object (torn by a crash, or corrupt)."""
  try:
    record = json.loads(line.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError is a ValueError
    return None
  return record if isinstance(record, dict) else None


def _lock(fd: int, path: str) -> None:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise StoreBusy(f"{path}: another process is writing this shard (it holds the shard's lock); run one "
                    f"writer per shard (one `fiat rationales` / `fiat infer` per process index at a time)") from None


def shard_path(store_dir: str, process_index: int) -> str:
  return os.path.join(store_dir, f"shard-{process_index:05d}.jsonl")


def i_beta_version(i_beta_text: str) -> str:
  """sha256 (first 16 hex) of the full I_beta text."""
  return hashlib.sha256(i_beta_text.encode("utf-8")).hexdigest()[:16]


def input_hash(task: str, example: dict) -> str:
  """sha256 (first 16 hex) of the input fields β sees: a reused id with another input does not match."""
  return prompts.content_hash(example, prompts.task_spec(task))


def record_key(example_id: str, content: dict, i_beta_text: str, beta: str, sampling: dict) -> str:
  """sha256 of (example, I_beta text, beta identity, sampling): any change asks beta again."""
  payload = json.dumps({"example_id": example_id, "content": content, "i_beta": i_beta_text, "beta": beta,
                        "sampling": sampling}, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def make_record(**fields) -> dict:
  """A store record with every field of FIELDS (time filled in); unknown or missing fields are errors."""
  fields.setdefault("time", time.time())
  unknown = set(fields) - set(FIELDS)
  missing = set(FIELDS) - set(fields)
  if unknown or missing:
    raise ValueError(f"store record: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
  return {f: fields[f] for f in FIELDS}


class ShardWriter:
  """Appends records to this process's shard; one write per record, so a crash can tear only the last line.

  The shard is locked (flock, released by the OS when the writer dies) for as long as the writer is open: a
  second writer is refused instead of truncating the live writer's line in progress as if it were torn.
  """

  def __init__(self, store_dir: str, process_index: int = 0):
    os.makedirs(store_dir, exist_ok=True)
    self.path = shard_path(store_dir, process_index)
    self._fd = None
    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    _lock(fd, self.path)
    self._fd = fd
    self._repair_torn_tail()

  def _repair_torn_tail(self):
    """Only under the lock: no other writer can be in the middle of this line. A last line that is a complete
    record and lacks only its newline is kept (the newline is added); anything else there is torn."""
    size = os.fstat(self._fd).st_size
    if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
      return
    data = os.pread(self._fd, size, 0)
    keep = data.rfind(b"\n") + 1
    if parse_record(data[keep:]) is not None:
      logging.warning("%s: the last record lacked its final newline; kept it and added the newline", self.path)
      os.write(self._fd, b"\n")
      return
    logging.warning("%s: torn last line (%d bytes, a crash mid-write) removed before appending (not a complete JSON "
                    "record); that example will be asked again", self.path, len(data) - keep)
    os.ftruncate(self._fd, keep)

  def append(self, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
    data = line.encode("utf-8")
    written = os.write(self._fd, data)
    while written < len(data):  # os.write may be partial on some file systems
      written += os.write(self._fd, data[written:])

  def close(self):
    if self._fd is not None:
      os.fsync(self._fd)
      os.close(self._fd)  # releases the lock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_shard(path: str) -> tuple[list[dict], int]:
  """Records of one shard and the number of torn last lines (0 or 1), which are reported and ignored.

  A last line without its newline is a record when it is a complete JSON object; otherwise it is torn.
  """
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  records, torn = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    record = parse_record(line)
    if record is None and i == len(lines) - 1:  # text after the final newline: a write that did not finish
      torn += 1
      logging.warning("%s:%d: torn last line (%d bytes: a write in progress, or a crash mid-write) ignored", path,
                      i + 1, len(line))
      continue
    if record is None:
      raise readers.DataError(f"{path}:{i + 1}: corrupt record (not a JSON object); the store is damaged there: "
                              f"`fiat rationales --repair` moves such lines to {os.path.basename(path)}{CORRUPT_SUFFIX} "
                              f"and asks β again for their examples")
    records.append(record)
  return records, torn


CORRUPT_SUFFIX = ".corrupt"  # beside a shard: the lines `repair` moved out of it, one JSON object each


def repair_shard(path: str) -> list[int]:
  """Under the shard's lock, moves every line that is not a JSON object to <shard>.corrupt (its line number,
  length and text) and rewrites the shard without them; returns the moved lines' numbers."""
  fd = os.open(path, os.O_RDWR)
  _lock(fd, path)
  try:
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
      lines.pop()  # the final newline ends the last line
    good, bad, side = [], [], []
    for i, line in enumerate(lines):
      if parse_record(line) is not None:
        good.append(line)
      elif line.strip():
        bad.append(i + 1)
        side.append(json.dumps({"shard": os.path.basename(path), "line": i + 1, "bytes": len(line),
                                "time": round(time.time(), 3), "text": line.decode("utf-8", "replace")},
                               ensure_ascii=False) + "\n")
    if bad:  # the side file holds the lines (on disk) before the shard loses them
      with open(path + CORRUPT_SUFFIX, "a", encoding="utf-8") as f:
        f.write("".join(side))
        f.flush()
        os.fsync(f.fileno())
      run_files.write_atomic(path, b"".join(line + b"\n" for line in good))
    return bad
  finally:
    os.close(fd)  # releases the lock


def repair(store_dir: str, process_index: int | None = None) -> dict[str, list[int]]:
  """repair_shard on every shard (or only on process_index's): {shard path: moved line numbers} of the damaged."""
  paths = (sorted(glob.glob(os.path.join(store_dir, SHARD_GLOB))) if process_index is None
           else [p for p in [shard_path(store_dir, process_index)] if os.path.exists(p)])
  return {p: moved for p in paths if (moved := repair_shard(p))}


def read_records(store_dir: str) -> list[dict]:
  """Every record of every shard, in shard then file order."""
  records = []
  for path in sorted(glob.glob(os.path.join(store_dir, SHARD_GLOB))):
    records += read_shard(path)[0]
  return records


def done_keys(records: list[dict]) -> set[str]:
  """Keys with a successful record: a resumed run skips these and retries failed ones."""
  return {r["key"] for r in records if r.get("error") is None}


class Selection(NamedTuple):
  """What `select` found: per example (in the order given) its record or None, and why each None is missing."""
  records: list
  missing: dict  # example index -> why no record matched

  def by_id(self, examples: Sequence[dict]) -> dict[str, dict]:
    """{example id: record, or {'missing': why}} for the examples given to `select`."""
    return {ex["id"]: r if r is not None else {"missing": self.missing[i]}
            for i, (ex, r) in enumerate(zip(examples, self.records))}


def _source(record: dict) -> tuple:
  """What wrote a record: β identity, I_β version and sampling."""
  return (record.get("beta"), record.get("i_beta_version"), json.dumps(record.get("sampling"), sort_keys=True))


def _describe(source: tuple, with_sampling: bool) -> str:
  return f"β {source[0]!r}, I_β version {source[1]}" + (f", sampling {source[2]}" if with_sampling else "")


def _mismatch(record: dict, example: dict, content_hash: str, task: str, beta: str | None,
              versions: dict[str, str], texts: dict[str, str], sampling: str | None) -> str | None:
  """Why `record` is not the example's rationale under this reader's β, I_β and sampling; None if it is."""
  lang = example["language"]
  if record.get("error") is not None:
    return f"β failed on it ({record['error']})"
  if beta is not None and record.get("beta") != beta:
    return f"stored from another β ({record.get('beta')!r}, this run: {beta!r})"
  if lang in versions and record.get("i_beta_version") != versions[lang]:
    return f"stored with another I_β (version {record.get('i_beta_version')}, this run's {lang}: {versions[lang]})"
  if sampling is not None and json.dumps(record.get("sampling"), sort_keys=True) != sampling:
    return f"stored with other sampling ({json.dumps(record.get('sampling'), sort_keys=True)})"
  if record.get("language") != lang:
    return f"stored for language {record.get('language')!r}, not {lang!r}"
  if record.get("input_hash") is not None:
    return None if record["input_hash"] == content_hash else "stored for another input under the same id"
  # A record written before input_hash existed: its key is checkable when this reader knows the I_β text.
  text = texts.get(lang)
  if text is None or i_beta_version(text) != record.get("i_beta_version"):
    return ("stored without input_hash (an older store) and this reader does not know its I_β text, so it cannot "
            "check that the input is the same: bind the β and I_β files, or ask β again into a new store")
  spec = prompts.task_spec(task)
  content = {"split": record.get("split")} | {f: example.get(f) for f in spec.INPUT_FIELDS}
  if record_key(example["id"], content, text, record.get("beta"), record.get("sampling")) != record.get("key"):
    return "stored for another input under the same id"
  return None


def select(store_dir: str, task: str, examples: Sequence[dict], *, beta: str | None = None,
           i_beta_texts: dict[str, str] | None = None, sampling: dict | None = None,
           where: str | None = None) -> Selection:
  """The record of each example: same id, language and input (input_hash), from the given β identity, I_β text of
  the example's language and sampling (each None: whatever the store holds).

  What is not pinned must be one source per language among the examples: a language whose matching records
  come from two β / I_β versions / samplings is an error naming them, never a silent mixture. Among records of
  one source for one example (the same input asked again), the latest wins.
  """
  where = where or store_dir
  texts = dict(i_beta_texts or {})
  versions = {lang: i_beta_version(t) for lang, t in texts.items()}
  pinned_sampling = None if sampling is None else json.dumps(sampling, sort_keys=True)
  by_id = collections.defaultdict(list)
  for order, r in enumerate(read_records(store_dir) if os.path.isdir(store_dir) else []):
    by_id[str(r.get("example_id"))].append((r.get("time") or 0.0, order, r))
  found, missing = [], {}
  sources = collections.defaultdict(collections.Counter)  # language -> source -> examples
  for i, ex in enumerate(examples):
    content_hash = input_hash(task, ex)
    best, why = {}, []
    for when, order, r in by_id.get(str(ex["id"]), ()):
      reason = _mismatch(r, ex, content_hash, task, beta, versions, texts, pinned_sampling)
      if reason is not None:
        why.append(reason)
        continue
      src = _source(r)
      if src not in best or (when, order) > best[src][:2]:
        best[src] = (when, order, r)
    for src in best:
      sources[ex["language"]][src] += 1
    found.append({src: r for src, (_, _, r) in best.items()})
    if not best:
      missing[i] = "; ".join(dict.fromkeys(why)) if why else "not in the store"
  mixed = {lang: c for lang, c in sources.items() if len(c) > 1}
  if mixed:
    lines = [f"{lang}: " + "; ".join(f"{_describe(src, len({s[2] for s in c}) > 1)} ({n} examples)"
                                     for src, n in c.most_common())
             for lang, c in sorted(mixed.items())]
    raise readers.DataError(
        f"{where}: the stored rationales of one language must come from one β, I_β and sampling, and these "
        f"languages have several: " + " | ".join(lines) + ". Bind the run's β (Beta.backend) and I_β files so "
        "the reader can choose, or keep one run's records in this store")
  return Selection([next(iter(f.values()), None) for f in found], missing)


def status_counts(records: list[dict], expected: list[tuple[str, str, str]]) -> dict[tuple[str, str], dict]:
  """done / failed / pending per (split, language) for the expected (split, language, key) triples."""
  ok = done_keys(records)
  failed = {r["key"] for r in records if r.get("error") is not None} - ok
  counts = collections.defaultdict(lambda: {"done": 0, "failed": 0, "pending": 0})
  for split, language, key in expected:
    state = "done" if key in ok else "failed" if key in failed else "pending"
    counts[(split, language)][state] += 1
  return dict(counts)


def format_status(counts: dict[tuple[str, str], dict]) -> str:
  """A plain-text table of status_counts, one row per split and language plus totals."""
  rows = [("split", "language", "done", "failed", "pending")]
  totals = collections.Counter()
  for (split, language), c in sorted(counts.items()):
    rows.append((split, language, str(c["done"]), str(c["failed"]), str(c["pending"])))
    totals.update(c)
  rows.append(("all", "all", str(totals["done"]), str(totals["failed"]), str(totals["pending"])))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                   for r in rows)
