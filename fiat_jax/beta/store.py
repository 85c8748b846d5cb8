"""The rationale store: append-only JSON-lines shards (one per process), keyed so a rerun skips what is stored."""
import collections
import glob
import hashlib
import json
import logging
import os
import time

SHARD_GLOB = "shard-*.jsonl"
FIELDS = ("key", "example_id", "task", "split", "language", "i_beta_version", "beta", "sampling", "rationale",
          "answer", "raw", "samples", "tokens_in", "tokens_out", "latency_s", "backend", "time", "error")


def shard_path(store_dir: str, process_index: int) -> str:
  return os.path.join(store_dir, f"shard-{process_index:05d}.jsonl")


def i_beta_version(i_beta_text: str) -> str:
  """sha256 (first 16 hex) of the full I_beta text."""
  return hashlib.sha256(i_beta_text.encode("utf-8")).hexdigest()[:16]


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
  """Appends records to this process's shard; one write per record, so a crash can tear only the last line."""

  def __init__(self, store_dir: str, process_index: int = 0):
    os.makedirs(store_dir, exist_ok=True)
    self.path = shard_path(store_dir, process_index)
    self._repair_torn_tail()
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def _repair_torn_tail(self):
    if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
      return
    with open(self.path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) == b"\n":
        return
      f.seek(0)
      data = f.read()
      keep = data.rfind(b"\n") + 1
      logging.warning("%s: torn last line (%d bytes, a crash mid-write) removed before appending; that example "
                      "will be asked again", self.path, len(data) - keep)
      f.truncate(keep)

  def append(self, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
    data = line.encode("utf-8")
    written = os.write(self._fd, data)
    while written < len(data):  # os.write may be partial on some file systems
      written += os.write(self._fd, data[written:])

  def close(self):
    if self._fd is not None:
      os.fsync(self._fd)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_shard(path: str) -> tuple[list[dict], int]:
  """Records of one shard and the number of torn last lines (0 or 1), which are reported and ignored."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  records, torn = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    if i == len(lines) - 1:  # text after the final newline: a write that did not finish
      torn += 1
      logging.warning("%s:%d: torn last line (%d bytes, a crash mid-write) ignored", path, i + 1, len(line))
      continue
    try:
      record = json.loads(line.decode("utf-8"))
    except ValueError:
      record = None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{i + 1}: corrupt record (not a JSON object); the store is damaged there")
    records.append(record)
  return records, torn


def read_records(store_dir: str) -> list[dict]:
  """Every record of every shard, in shard then file order."""
  records = []
  for path in sorted(glob.glob(os.path.join(store_dir, SHARD_GLOB))):
    records += read_shard(path)[0]
  return records


def done_keys(records: list[dict]) -> set[str]:
  """Keys with a successful record: a resumed run skips these and retries failed ones."""
  return {r["key"] for r in records if r.get("error") is None}


def latest_by_example(store_dir: str, split: str | None = None) -> dict[str, dict]:
  """The last successful record per example id (optionally of one split)."""
  latest = {}
  ordered = sorted(enumerate(read_records(store_dir)), key=lambda ir: (ir[1].get("time") or 0.0, ir[0]))
  for _, r in ordered:
    if r.get("error") is None and (split is None or r.get("split") == split):
      latest[r["example_id"]] = r
  return latest


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
