"""Per-example scores for eval metrics (pure Python + numpy; no torch).

Every metric is a ratio of sums over examples, `sum(num) / sum(den)`, so one bootstrap routine serves them all:
- a mean (exact match, JSON validity, field accuracy, token F1, latency) has `den = 1` for every example;
- micro F1 over JSON fields pools counts: `num = 2*tp`, `den = 2*tp + fp + fn`;
- tokens/s pools tokens and seconds: `num = new tokens`, `den = seconds`.

JSON outputs are compared as parsed objects, so key order and spacing do not matter. A prediction wrapped in a
Markdown code fence (```json ... ```) is unwrapped before parsing; anything else around the JSON makes it invalid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneship.errors import TuneshipError

QUALITY_METRICS = ("exact_match", "json_valid", "field_accuracy", "json_f1", "token_f1")
JSON_METRICS = ("json_valid", "field_accuracy", "json_f1")
SPEED_METRICS = ("latency_s", "tokens_per_s")
# Metrics a user may list in `metrics`; speed metrics are always measured.
ALLOWED = QUALITY_METRICS
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)
_MISSING = object()


@dataclass
class Scores:
    """Per-example numerators and denominators of one metric; the metric is `num.sum() / den.sum()`."""

    num: np.ndarray
    den: np.ndarray

    @property
    def value(self) -> float:
        den = float(self.den.sum())
        return float(self.num.sum()) / den if den > 0 else float("nan")

    def per_example(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.den > 0, self.num / np.where(self.den > 0, self.den, 1), np.nan)


def check_metric_names(names: list[str]) -> list[str]:
    """Return `names` if every one is known, else raise a one-line error listing the allowed ones."""
    unknown = [n for n in names if n not in ALLOWED]
    if unknown:
        raise TuneshipError(f"unknown metric {unknown[0]!r}; allowed: {', '.join(ALLOWED)}")
    if not names:
        raise TuneshipError(f"metrics is empty; list at least one of: {', '.join(ALLOWED)}")
    return list(dict.fromkeys(names))


def parse_json(text: str) -> Any:
    """The parsed JSON value of `text` (a surrounding code fence is allowed), or `_MISSING` when it is not JSON."""
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    try:
        return json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return _MISSING


def is_json_object(text: str) -> bool:
    return isinstance(parse_json(text), dict)


def exact_match(pred: str, ref: str) -> float:
    """1.0 when equal after stripping whitespace; when the reference is JSON, compares parsed values."""
    ref_obj = parse_json(ref)
    if ref_obj is not _MISSING:
        pred_obj = parse_json(pred)
        if pred_obj is not _MISSING:
            return float(_canon(pred_obj) == _canon(ref_obj))
    return float(pred.strip() == ref.strip())


def _canon(value: Any) -> Any:
    """Make 1 and 1.0 equal but keep True distinct from 1 (JSON true is not the number 1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    if isinstance(value, list):
        return ("list", tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _canon(v)) for k, v in value.items())))
    return ("other", repr(value))


def json_valid(pred: str) -> float:
    return float(parse_json(pred) is not _MISSING)


def field_counts(pred: str, ref: str) -> tuple[int, int, int, dict[str, bool]]:
    """(tp, fp, fn, {ref field: correct}) comparing top-level fields of JSON objects.

    A field is a true positive when the prediction has the key with an equal value. An invalid or non-object
    prediction gets every reference field as a false negative.
    """
    ref_obj = parse_json(ref)
    if not isinstance(ref_obj, dict):
        return 0, 0, 0, {}
    pred_obj = parse_json(pred)
    if not isinstance(pred_obj, dict):
        pred_obj = {}
    correct = {k: (k in pred_obj and _canon(pred_obj[k]) == _canon(v)) for k, v in ref_obj.items()}
    tp = sum(correct.values())
    fn = len(ref_obj) - tp
    fp = sum(1 for k, v in pred_obj.items() if k not in ref_obj or _canon(ref_obj[k]) != _canon(v))
    return tp, fp, fn, correct


_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 over lowercase word tokens (multiset overlap)."""
    p, r = tokens(pred), tokens(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    common: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in r:
        counts[t] = counts.get(t, 0) + 1
    for t in p:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            common[t] = common.get(t, 0) + 1
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(r)
    return 2 * precision * recall / (precision + recall)


def default_metrics(references: list[str]) -> list[str]:
    """JSON metrics when most references are JSON objects, else text metrics."""
    n_json = sum(is_json_object(r) for r in references)
    if references and n_json >= len(references) / 2:
        return ["exact_match", "json_valid", "field_accuracy", "json_f1"]
    return ["exact_match", "token_f1"]


def reference_fields(references: list[str]) -> list[str]:
    """Top-level keys of the JSON-object references, in first-seen order."""
    seen: dict[str, None] = {}
    for r in references:
        obj = parse_json(r)
        if isinstance(obj, dict):
            seen.update(dict.fromkeys(obj))
    return list(seen)


def score(preds: list[str], refs: list[str], names: list[str]) -> dict[str, Scores]:
    """Per-example scores for each metric in `names`, plus `field_accuracy.<key>` for each JSON field when
    `field_accuracy` is asked for."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    names = check_metric_names(names)
    n = len(refs)
    ones = np.ones(n)
    out: dict[str, Scores] = {}
    need_fields = any(m in names for m in ("field_accuracy", "json_f1"))
    counts = [field_counts(p, r) for p, r in zip(preds, refs, strict=True)] if need_fields else []
    for name in names:
        if name == "exact_match":
            out[name] = Scores(np.array([exact_match(p, r) for p, r in zip(preds, refs, strict=True)]), ones)
        elif name == "json_valid":
            out[name] = Scores(np.array([json_valid(p) for p in preds]), ones)
        elif name == "token_f1":
            out[name] = Scores(np.array([token_f1(p, r) for p, r in zip(preds, refs, strict=True)]), ones)
        elif name == "json_f1":
            tp = np.array([c[0] for c in counts], dtype=float)
            fp = np.array([c[1] for c in counts], dtype=float)
            fn = np.array([c[2] for c in counts], dtype=float)
            out[name] = Scores(2 * tp, 2 * tp + fp + fn)
        elif name == "field_accuracy":
            # Share of all reference fields predicted exactly (pooled over examples); rows whose reference is
            # not a JSON object add nothing (den 0).
            num = np.array([c[0] for c in counts], dtype=float)
            den = np.array([len(c[3]) for c in counts], dtype=float)
            out[name] = Scores(num, den)
            for key in reference_fields(refs):
                hit = np.array([float(c[3].get(key, False)) for c in counts])
                present = np.array([float(key in c[3]) for c in counts])
                out[f"field_accuracy.{key}"] = Scores(hit * present, present)
    return out


def speed_scores(latencies: list[float], new_tokens: list[int]) -> dict[str, Scores]:
    lat = np.asarray(latencies, dtype=float)
    toks = np.asarray(new_tokens, dtype=float)
    return {"latency_s": Scores(lat, np.ones(len(lat))), "tokens_per_s": Scores(toks, lat)}
