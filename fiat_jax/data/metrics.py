"""Accuracy, AUC-PR, SQuAD F1/EM (XTREME-UP's normalisation), per-language tables, bootstrap CIs."""
import collections
import re
import string
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from sklearn import metrics as sk_metrics

from fiat_jax.data import readers

# XOR-AttriQA targets are label words; τ's AUC-PR score is logp(yes) - logp(no).
POSITIVE_LABEL = 'yes'
NEGATIVE_LABEL = 'no'
LABEL_WORDS = {True: POSITIVE_LABEL, False: NEGATIVE_LABEL}

_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as the official scorer.
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(text: str) -> str:
  """XTREME-UP / SQuAD normalisation: lower, drop ASCII punctuation, articles, extra space."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  """Token F1 of two normalised strings (0 when they share no token, even if both empty)."""
  pred_tokens, target_tokens = prediction.split(), target.split()
  same = sum((collections.Counter(pred_tokens) & collections.Counter(target_tokens)).values())
  if same == 0:
    return 0
  precision = 1.0 * same / len(pred_tokens)
  recall = 1.0 * same / len(target_tokens)
  return (2 * precision * recall) / (precision + recall)


def squad_f1(target: str, prediction: str) -> float:
  """F1 (0..1) of one prediction against one target after normalisation."""
  return _token_f1(normalize_answer(target), normalize_answer(prediction))


def squad_em(target: str, prediction: str) -> float:
  """Exact match (0 or 1) after normalisation."""
  return float(normalize_answer(target) == normalize_answer(prediction))


def squad(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean F1 and EM in percent, computed in the official scorer's order of operations."""
  _same_length(targets, predictions)
  targets = [normalize_answer(t) for t in targets]
  predictions = [normalize_answer(p) for p in predictions]
  em = np.mean([t == p for t, p in zip(targets, predictions)]) * 100
  f1 = np.mean([_token_f1(t, p) for t, p in zip(targets, predictions)]) * 100
  return {'f1': float(f1), 'em': float(em)}


def accuracy(targets: Sequence, predictions: Sequence) -> float:
  """Percent of predictions equal to their targets."""
  _same_length(targets, predictions)
  return float(100 * np.mean([t == p for t, p in zip(targets, predictions)]))


def auc_pr(labels: Sequence[bool], scores: Sequence[float]) -> float:
  """Average precision of the positive class in percent (scikit-learn, as T5's metrics)."""
  _same_length(labels, scores)
  labels = np.asarray(labels, dtype=bool)
  if not labels.any():
    return float('nan')  # Undefined without a positive example.
  return float(100 * sk_metrics.average_precision_score(labels, np.asarray(scores, float)))


def _same_length(a: Sequence, b: Sequence) -> None:
  if len(a) != len(b):
    raise ValueError(f'{len(a)} targets but {len(b)} predictions: counts must match')


def per_language(languages: Sequence[str], fn: Callable[[np.ndarray], Mapping[str, float]]
                 ) -> dict[str, dict[str, float]]:
  """fn(indices of one language) for every language, in first-seen order, with counts."""
  languages = np.asarray(languages)
  table = {}
  for lang in dict.fromkeys(languages.tolist()):
    idx = np.flatnonzero(languages == lang)
    table[lang] = dict(fn(idx), n=int(len(idx)))
  return table


def under_represented(languages: Sequence[str]) -> list[str]:
  """The XTREME-UP languages that count in the headline mean (all but the high-resource ones)."""
  return [lang for lang in languages if lang not in readers.XTREME_UP_HIGH_RESOURCE]


def macro_mean(table: Mapping[str, Mapping[str, float]], key: str,
               languages: Optional[Sequence[str]] = None) -> float:
  """Mean of one metric over languages (all in the table unless given)."""
  languages = list(table) if languages is None else languages
  if not languages:
    raise ValueError(f'no language to average {key!r} over')
  return float(np.mean([table[lang][key] for lang in languages]))


def bootstrap_ci(statistic: Callable[[np.ndarray], float], languages: Sequence[str], *,
                 seed: int, n_resamples: int = 1000, level: float = 0.95) -> list[float]:
  """Percentile CI of statistic(indices), resampling examples within each language."""
  rng = np.random.default_rng(seed)
  languages = np.asarray(languages)
  groups = [np.flatnonzero(languages == lang) for lang in dict.fromkeys(languages.tolist())]
  values = np.empty(n_resamples)
  for r in range(n_resamples):
    idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
    values[r] = statistic(idx)
  tail = 100 * (1 - level) / 2
  return [float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))]


def score_xtreme_up(targets: Sequence[str], predictions: Sequence[str], languages: Sequence[str],
                    *, seed: int = 0, n_resamples: int = 1000) -> dict:
  """Overall F1/EM, the per-language table and the under-represented mean with its 95% CI."""
  _same_length(targets, predictions)
  # Per-example values, then mean * 100: the official scorer's order of operations.
  f1 = np.array([squad_f1(t, p) for t, p in zip(targets, predictions)], float)
  em = np.array([squad_em(t, p) for t, p in zip(targets, predictions)], float)
  langs = np.asarray(languages)

  def table_of(idx):
    return per_language(langs[idx], lambda j: {'f1': float(np.mean(f1[idx[j]]) * 100),
                                                'em': float(np.mean(em[idx[j]]) * 100)})

  table = table_of(np.arange(len(targets)))
  headline_langs = under_represented(list(table))

  def headline(idx):
    t = table_of(idx)
    return macro_mean(t, 'f1', [lang for lang in headline_langs if lang in t])

  result = {'task': 'xtreme_up_xqa', 'n': len(targets),
            'overall': squad(targets, predictions), 'per_language': table,
            'mean_over_languages': {'f1': macro_mean(table, 'f1'), 'em': macro_mean(table, 'em')}}
  if headline_langs:
    result['headline'] = {
        'name': 'f1_under_represented_mean', 'languages': headline_langs,
        'value': headline(np.arange(len(targets))),
        'ci95': bootstrap_ci(headline, languages, seed=seed, n_resamples=n_resamples)}
  return result


def score_xor_attriqa(labels: Sequence[bool], predictions: Sequence[bool], languages: Sequence[str],
                      scores: Optional[Sequence[float]] = None, *, seed: int = 0,
                      n_resamples: int = 1000) -> dict:
  """Accuracy and AUC-PR overall and per language; headline = mean over languages (Table 2)."""
  _same_length(labels, predictions)
  labels, predictions = np.asarray(labels, bool), np.asarray(predictions, bool)
  scores = None if scores is None else np.asarray(scores, float)
  langs = np.asarray(languages)

  def figures(idx):
    out = {'accuracy': accuracy(labels[idx], predictions[idx])}
    if scores is not None:
      out['auc_pr'] = auc_pr(labels[idx], scores[idx])
    return out

  def table_of(idx):
    return per_language(langs[idx], lambda j: figures(idx[j]))

  table = table_of(np.arange(len(labels)))
  result = {'task': 'xor_attriqa', 'n': int(len(labels)), 'overall': figures(np.arange(len(labels))),
            'per_language': table, 'headline': {}}
  for key in ('accuracy', 'auc_pr') if scores is not None else ('accuracy',):
    stat = lambda idx, key=key: macro_mean(table_of(idx), key)
    result['headline'][f'{key}_mean_over_languages'] = {
        'value': macro_mean(table, key),
        'ci95': bootstrap_ci(stat, languages, seed=seed, n_resamples=n_resamples)}
  if scores is None:
    result['headline']['auc_pr_mean_over_languages'] = None  # Text-only predictions (ICL).
  return result
