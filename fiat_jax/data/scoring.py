"""`fiat score`: a predictions file scored against a released gold file or release, joined on id, with the data
set's own metrics (tasks/<dataset>.py)."""
import json
import math
import sys
from typing import Optional, Sequence

from fiat_jax import commands
from fiat_jax.data import readers
import tasks


def read_predictions(path: str) -> list[dict]:
  """XTREME-UP submission form: one JSON object per line with a `prediction` field (and optionally `id`)."""
  rows = []
  for line_no, raw_line, row in readers.jsonl_objects(path):
    if 'prediction' not in row:
      raise readers.DataError(f"{path}:{line_no}: field 'prediction': missing")
    if 'id' in row:
      row = dict(row, id=readers.parse_id(row, raw_line, path, line_no))
    rows.append(dict(row, _line=line_no))
  return rows


def _align(rows: list[dict], examples: list[dict], predictions: str, gold: str) -> list[dict]:
  """The prediction row of each gold example: joined on id when the predictions carry ids, else by line order."""
  with_id = [row for row in rows if 'id' in row]
  if not with_id:
    if len(rows) != len(examples):
      raise ValueError(f'{predictions}: {len(rows)} predictions but {len(examples)} gold examples in {gold}: '
                       f'counts must match (one line per example, in gold order), or give each line its id')
    return rows
  if len(with_id) != len(rows):
    line = next(row['_line'] for row in rows if 'id' not in row)
    raise readers.DataError(f"{predictions}:{line}: field 'id': missing (other lines have one; predictions are "
                            f"joined to gold on id)")
  gold_ids = {ex['id'] for ex in examples}
  by_id = {}
  for row in rows:
    if row['id'] not in gold_ids:
      raise readers.DataError(f"{predictions}:{row['_line']}: field 'id': {row['id']!r} is not a gold example "
                              f"of {gold}")
    if row['id'] in by_id:
      raise readers.DataError(f"{predictions}:{row['_line']}: field 'id': {row['id']!r} again (first on line "
                              f"{by_id[row['id']]['_line']})")
    by_id[row['id']] = row
  absent = [ex['id'] for ex in examples if ex['id'] not in by_id]
  if absent:
    raise ValueError(f'{predictions}: no prediction for {len(absent)} of {len(examples)} gold examples of {gold}: '
                     + ', '.join(absent[:10]) + (' ...' if len(absent) > 10 else ''))
  return [by_id[ex['id']] for ex in examples]


def score_files(task: str, gold: str, predictions: str, *, split: str = 'test',
                languages: Optional[Sequence[str]] = None, seed: int = 0,
                n_resamples: int = 1000) -> dict:
  """Scores a prediction file against gold (a released JSONL file or an extracted release dir), joined on id."""
  if readers.isdir(gold):
    examples = readers.read_split(task, gold, split, languages)
  else:
    examples = readers.read_file(task, gold)
  rows = _align(read_predictions(predictions), examples, predictions, gold)
  definition = tasks.definition(task)
  preds = [definition.file_prediction(row['prediction'], predictions, row['_line']) for row in rows]
  scores = _file_scores(rows, predictions) if definition.SCORE_METRIC_FNS else None
  return definition.score(examples, preds, scores, seed=seed, n_resamples=n_resamples)


def _file_scores(rows: list[dict], predictions: str) -> Optional[list[float]]:
  """The rows' 'score' fields (a score-based metric's input): on every line or on none."""
  with_score = [row for row in rows if 'score' in row]
  if with_score and len(with_score) != len(rows):
    missing = next(row['_line'] for row in rows if 'score' not in row)
    raise readers.DataError(f"{predictions}:{missing}: field 'score': missing (other lines have one)")
  if not with_score:
    return None
  scores = []
  for row in rows:
    if isinstance(row['score'], bool) or not isinstance(row['score'], (int, float)) \
        or not math.isfinite(row['score']):
      raise readers.DataError(f"{predictions}:{row['_line']}: field 'score': not a finite number")
    scores.append(float(row['score']))
  return scores


def _finite(tree):
  """NaN (an undefined figure, e.g. AUC-PR without positives) becomes null in JSON."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_finite(v) for v in tree]
  return None if isinstance(tree, float) and math.isnan(tree) else tree


def main(argv: list[str]) -> int:
  """`fiat score --task T --gold PATH --predictions FILE`: prints the figures as JSON."""
  args = commands.parser('score').parse_args(argv)
  for flag, path in (('--gold', args.gold), ('--predictions', args.predictions)):
    if not readers.exists(path):
      raise commands.UsageError(f'{flag}={path}: no such file or directory')
  langs = args.languages.split(',') if args.languages else None
  try:
    result = score_files(args.task, args.gold, args.predictions, split=args.split,
                         languages=langs, seed=args.seed, n_resamples=args.bootstrap)
  except (ValueError, OSError) as e:
    print(f'fiat score: error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(_finite(result), indent=2, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
