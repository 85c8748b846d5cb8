"""`fiat rationales`: y_beta = argmax P(y | x; theta_beta, I_beta) for every example, stored once; `--status`; and
the few-shot ICL baseline (beta's parsed answers on test, scored with the task metrics)."""
import collections
import dataclasses
import json
import logging
import os
import sys
import time

import gin

from fiat_jax.beta import backends
from fiat_jax.beta import prompts
from fiat_jax.beta import store
from fiat_jax import cli

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Item:
  """One example to ask beta about: its prompt and its store key."""
  split: str
  example: dict
  messages: list
  i_beta_version: str
  key: str
  seed: int


def build_i_beta(task: str, examples: dict[str, list[dict]], instruction_file: str | None,
                 exemplars_file: str | None) -> tuple[dict[str, list[dict]], dict[str, str]]:
  """I_beta messages and text per language, after checking the exemplars are no validation / test example."""
  instruction = prompts.load_instruction(task, instruction_file)
  exemplars = prompts.load_exemplars(task, exemplars_file)
  exemplars = prompts.resolve_exemplars(exemplars, examples.get("train", []), task)
  prompts.check_exemplars(exemplars, examples.get("validation", []) + examples.get("test", []), task)
  languages = sorted({ex["language"] for split in examples.values() for ex in split})
  messages = {lang: prompts.i_beta_messages(instruction, prompts.select_exemplars(exemplars, task, lang), task)
              for lang in languages}
  return messages, {lang: prompts.i_beta_text(m) for lang, m in messages.items()}


def plan(task: str, examples: dict[str, list[dict]], splits, i_beta: dict[str, list[dict]],
         i_beta_texts: dict[str, str], beta_identity: str, sampling: backends.Sampling) -> list[Item]:
  """Every (split, example) of the run with its prompt, key and sampling seed."""
  spec, items = prompts.task_spec(task), []
  for split in splits:
    for ex in examples[split]:
      lang = ex["language"]
      content = {"split": split} | {f: ex[f] for f in spec.INPUT_FIELDS}
      key = store.record_key(ex["id"], content, i_beta_texts[lang], beta_identity, sampling.to_dict())
      # The sampling seed depends on the example and the configured seed only: any backend draws the same.
      seed = (int(store.record_key(ex["id"], content, "", "", {})[:8], 16) + sampling.seed) % 2**31
      items.append(Item(split, ex, prompts.prompt_messages(i_beta[lang], ex, task),
                        store.i_beta_version(i_beta_texts[lang]), key, seed))
  return items


def vote_key(answer: str | None, task: str):
  """What self-consistency votes on (the task's definition says: a label, a normalised span)."""
  return None if answer is None else prompts.task_spec(task).vote_key(answer)


def build_record(item: Item, comp: backends.Completion, task: str, beta: str, sampling: backends.Sampling,
                 backend: str) -> dict:
  """The store record of one completion; self-consistency keeps every sample and the majority answer's first."""
  common = dict(key=item.key, example_id=item.example["id"], task=task, split=item.split,
                language=item.example["language"], input_hash=store.input_hash(task, item.example),
                i_beta_version=item.i_beta_version, beta=beta,
                sampling=sampling.to_dict(), tokens_in=comp.tokens_in, tokens_out=comp.tokens_out,
                latency_s=round(comp.latency_s, 4), backend=backend)
  if comp.error is not None:
    return store.make_record(rationale=None, answer=None, raw=None, samples=[], error=comp.error, **common)
  parsed = [prompts.parse_output(t) for t in comp.texts]
  chosen = 0
  if len(parsed) > 1:
    votes = collections.Counter(k for p in parsed if (k := vote_key(p.answer, task)) is not None)
    if votes:
      best = max(votes.values())
      chosen = next(i for i, p in enumerate(parsed) if votes.get(vote_key(p.answer, task)) == best)
  samples = ([{"rationale": p.rationale, "answer": p.answer, "raw": t} for p, t in zip(parsed, comp.texts)]
             if len(parsed) > 1 else [])
  return store.make_record(rationale=parsed[chosen].rationale, answer=parsed[chosen].answer,
                           raw=comp.texts[chosen], samples=samples, error=None, **common)


def read_examples(task: str, data_dir: str, splits, languages) -> dict[str, list[dict]]:
  """The run's splits plus train / validation / test for the exemplar checks."""
  from fiat_jax.data import readers  # pylint: disable=g-import-not-at-top
  return {split: readers.read_split(task, data_dir, split, languages)
          for split in dict.fromkeys(tuple(splits) + SPLITS)}


def _process() -> tuple[int, int]:
  if "jax" in sys.modules:  # a LocalBeta run: jax knows the processes
    jax = sys.modules["jax"]
    return jax.process_index(), jax.process_count()
  return 0, 1


@gin.configurable("rationales")
def rationales(task: str = gin.REQUIRED, data_dir: str = gin.REQUIRED, store_dir: str = gin.REQUIRED,
               beta=gin.REQUIRED, splits=SPLITS, languages=None, sampling: backends.Sampling | None = None,
               instruction_file: str | None = None, exemplars_file: str | None = None,
               process_index: int | None = None, process_count: int | None = None, status_only: bool = False,
               progress: bool = True, repair: bool = False) -> dict:
  """Asks beta about every pending example of `splits` (this process's share) and appends the records.

  Returns counts: done / failed / pending / unparsed, and why the run stopped early if it did. repair: first
  move the store's corrupt lines aside (store.repair; this process's shard when there are several processes),
  so their examples are asked again; `repaired` counts them.
  """
  sampling = sampling or backends.Sampling()
  splits = tuple(splits)
  examples = read_examples(task, data_dir, splits, languages)
  i_beta, texts = build_i_beta(task, examples, instruction_file, exemplars_file)
  items = plan(task, examples, splits, i_beta, texts, beta.identity, sampling)
  if process_index is None or process_count is None:
    process_index, process_count = _process()
  repaired = 0
  if repair and os.path.isdir(store_dir):
    for path, lines in store.repair(store_dir, None if process_count == 1 else process_index).items():
      repaired += len(lines)
      logging.warning("%s: moved %d corrupt line(s) (line %s) to %s%s; their examples are asked again", path,
                      len(lines), ", ".join(map(str, lines)), path, store.CORRUPT_SUFFIX)
  records = store.read_records(store_dir) if os.path.isdir(store_dir) else []
  if status_only:
    counts = store.status_counts(records, [(it.split, it.example["language"], it.key) for it in items])
    print(store.format_status(counts))
    return {"status": counts}
  done = store.done_keys(records)
  mine = [it for i, it in enumerate(items) if i % process_count == process_index]
  todo = [it for it in mine if it.key not in done]
  logging.info("rationales: %d examples in %s; process %d of %d takes %d, %d already stored, %d to ask beta",
               len(items), "/".join(splits), process_index, process_count, len(mine), len(mine) - len(todo), len(todo))
  stats = collections.Counter()
  stopped = None
  budget = getattr(beta, "budget", None)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(todo), unit="ex", desc="rationales", dynamic_ncols=True)
  with store.ShardWriter(store_dir, process_index) as writer:
    try:
      if todo and hasattr(beta, "check_credentials"):
        beta.check_credentials()
      for i, comp in beta.map([(it.messages, it.seed) for it in todo], sampling):
        record = build_record(todo[i], comp, task, beta.identity, sampling, type(beta).__name__)
        writer.append(record)
        stats["failed" if record["error"] else "done"] += 1
        stats["unparsed"] += record["error"] is None and record["answer"] is None
        stats["tokens_in"] += comp.tokens_in or 0
        stats["tokens_out"] += comp.tokens_out or 0
        if bar is not None:
          post = {"tok_in": stats["tokens_in"], "tok_out": stats["tokens_out"], "failed": stats["failed"],
                  "unparsed": stats["unparsed"]}
          if budget is not None and (budget.price_in or budget.price_out):
            post["cost"] = f"{budget.cost(budget.tokens_in, budget.tokens_out):.4f}"
          bar.set_postfix(post, refresh=False)
          bar.update(1)
    except (backends.BudgetExceeded, backends.FatalBetaError) as e:
      stopped = f"{type(e).__name__}: {e}"
      logging.error("rationales stopped early: %s", stopped)
    finally:
      if bar is not None:
        bar.close()
  with open(os.path.join(store_dir, f"rationales_config-{process_index:05d}.gin"), "w") as f:
    f.write(gin.operative_config_str())
  result = {"asked": len(todo), "done": stats["done"], "failed": stats["failed"], "unparsed": stats["unparsed"],
            "pending": len(todo) - stats["done"] - stats["failed"], "tokens_in": stats["tokens_in"],
            "tokens_out": stats["tokens_out"], "stopped": stopped, "repaired": repaired, "time": time.time()}
  if budget is not None:
    result["budget"] = budget.summary()
  if getattr(beta, "retries", None) is not None:
    result["retries"] = beta.retries
  logging.info("rationales: %s", json.dumps(result))
  return result


@gin.configurable("icl_baseline")
def icl_baseline(task: str = gin.REQUIRED, data_dir: str = gin.REQUIRED, store_dir: str = gin.REQUIRED,
                 split: str = "test", languages=None, output_file: str | None = None, beta=None,
                 instruction_file: str | None = None, exemplars_file: str | None = None) -> dict:
  """Few-shot ICL: beta's parsed answers on `split`, scored with the task metrics (no AUC-PR: text only).

  Args:
    beta: the backend (or its identity) whose answers are scored, with the I_beta files it was prompted with;
      None: the store's records, which must then come from one beta and I_beta per language.
  Unparseable answers and examples without a stored rationale count as wrong; both counts are reported.
  """
  from fiat_jax.data import readers  # pylint: disable=g-import-not-at-top
  examples = readers.read_split(task, data_dir, split, languages)
  identity, texts = None, None
  if beta is not None:
    identity = beta if isinstance(beta, str) else beta.identity
    texts = build_i_beta(task, read_examples(task, data_dir, (split,), languages), instruction_file,
                         exemplars_file)[1]
  chosen = store.select(store_dir, task, examples, beta=identity, i_beta_texts=texts)
  missing = [examples[i]["id"] for i in chosen.missing]
  answers = [r["answer"] if r is not None else None for r in chosen.records]
  definition = prompts.task_spec(task)
  parsed = [definition.beta_prediction(a) for a in answers]
  result = definition.score(examples, parsed)  # no usable answer: wrong
  result["icl"] = {"split": split, "store_dir": store_dir, "missing": len(missing),
                   "unparsed": sum(p is None for p in parsed) - len(missing)}
  if missing:
    reasons = collections.Counter(chosen.missing.values())
    logging.warning("ICL baseline: %d of %d %s examples have no stored rationale (counted wrong), e.g. %s; why: %s",
                    len(missing), len(examples), split, missing[:5], dict(reasons.most_common(5)))
  if output_file:
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


def _run_files():
  """The Experiment and Beta of the parsed gin files (the runs/ files' data set, data, store and β)."""
  from fiat_jax import experiment  # pylint: disable=g-import-not-at-top  (it loads jax: an HTTP β runs without)
  exp, beta = experiment.Experiment(), experiment.Beta()
  exp.require("dataset", "data_dir", "store_dir")
  return exp, beta


def main(argv: list[str]) -> int:
  """`fiat rationales --gin_file=<a runs/ file> [--gin_file=beta/...] [--status]`: beta on every example of the
  run's data set and languages; exit 0 when nothing is left to ask."""
  args = cli.parse_gin(argv, "rationales")
  exp, beta = _run_files()
  if beta.backend is None and not args.status:
    raise SystemExit("fiat rationales: Beta.backend is not set: add --gin_file=beta/http.gin (an OpenAI-compatible "
                     "server) or a models/ β file with --gin_file=beta/local.gin")
  result = rationales(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir, beta=beta.backend,
                      languages=exp.languages, instruction_file=beta.instruction_file,
                      exemplars_file=beta.exemplars_file, status_only=args.status, repair=args.repair)
  if args.status:
    return 0
  print(json.dumps(result))
  return 0 if result["failed"] == 0 and result["pending"] == 0 else 1


def icl_main(argv: list[str]) -> int:
  """`fiat icl --gin_file=<a runs/ file> [--gin.NAME=VALUE]`: prints (and writes) the ICL baseline's scores."""
  cli.parse_gin(argv, "icl")
  exp, beta = _run_files()
  print(json.dumps(icl_baseline(task=exp.dataset, data_dir=exp.data_dir, store_dir=exp.store_dir,
                                split=exp.test_split, languages=exp.languages, beta=beta.backend,
                                instruction_file=beta.instruction_file, exemplars_file=beta.exemplars_file),
                   indent=1))
  return 0
