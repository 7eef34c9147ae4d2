"""The promotion gate: the candidate's eval must not regress the stable's primary metric by more than a
threshold, compared on the same eval set (same `data_sha256`)."""

from __future__ import annotations

import os

from tuneship.errors import TuneshipError

DEFAULT_METRIC = "exact_match"
DEFAULT_THRESHOLD = 0.05
LOWER_IS_BETTER = ("loss", "perplexity", "error", "latency", "kl")


def parse_threshold(value: str | float | None) -> float:
    """0.05, "0.05" or "5%" -> 0.05. Must lie in [0, 1)."""
    if value is None or value == "":
        value = os.environ.get("TUNESHIP_GATE_THRESHOLD", DEFAULT_THRESHOLD)
    text = str(value).strip()
    try:
        t = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise TuneshipError(
            f"bad gate threshold {value!r}: write a fraction like 0.05 or a percentage like 5%"
        ) from None
    if not 0 <= t < 1:
        raise TuneshipError(f"bad gate threshold {value!r}: it must be at least 0 and below 1 (100%)")
    return t


def gate_metric(metric: str | None) -> str:
    return metric or os.environ.get("TUNESHIP_GATE_METRIC") or DEFAULT_METRIC


def metric_value(eval_data: dict, metric: str) -> float | None:
    """A metric from eval.json: {"metrics": {m: {"value": v, "ci": [...]}}} or {"metrics": {m: v}}."""
    value = (eval_data.get("metrics") or {}).get(metric)
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def check(
    candidate: str,
    candidate_evals: list[dict],
    stable: str,
    stable_evals: list[dict],
    metric: str,
    threshold: float,
) -> dict:
    """Compare the newest candidate eval that shares an eval set with the stable. Returns the gate's
    figures with "passed"; raises a one-line error when there is nothing to compare."""
    fix = "run `tuneship eval` on both on the same data, or pass --force --reason TEXT"
    if not candidate_evals:
        raise TuneshipError(f"promotion gate: {candidate} has no eval; {fix}")
    stable_by_set = {e.get("data_sha256"): e for e in stable_evals if e.get("data_sha256")}
    pair = next((e for e in reversed(candidate_evals) if e.get("data_sha256") in stable_by_set), None)
    if pair is None:
        raise TuneshipError(
            f"promotion gate: {candidate} and the stable {stable} have no eval on the same eval set; {fix}"
        )
    data_sha = pair["data_sha256"]
    cand_v = metric_value(pair, metric)
    stab_v = metric_value(stable_by_set[data_sha], metric)
    if cand_v is None or stab_v is None:
        who = candidate if cand_v is None else stable
        raise TuneshipError(
            f"promotion gate: the eval of {who} has no metric {metric!r}; pick one with --metric"
        )
    lower = lower_is_better(metric)
    gain = (stab_v - cand_v) if lower else (cand_v - stab_v)
    change = gain / abs(stab_v) if stab_v else None  # relative change; None when the stable scored 0
    passed = gain >= 0 if change is None else change >= -threshold - 1e-12
    return {
        "metric": metric,
        "threshold": threshold,
        "data_sha256": data_sha,
        "candidate": cand_v,
        "stable": stab_v,
        "relative_change": change,
        "lower_is_better": lower,
        "passed": passed,
    }
