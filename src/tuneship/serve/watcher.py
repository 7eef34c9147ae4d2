"""The auto-rollback watcher: compare the canary with stable over a sliding window of recent requests.

Each finished request adds a sample to its version's window: whether it succeeded, its latency, and
(optionally) whether the answer's content was valid JSON. `Watcher.verdict` compares canary with stable once
both have at least `min_samples` samples and returns the evidence when the canary is worse by more than:
- `threshold` (absolute) in error rate, default 0.05: 5 percentage points;
- `threshold` (absolute) in the valid-JSON rate, when that signal is on;
- `latency_ratio` in p95 latency (canary p95 > stable p95 * (1 + latency_ratio)). Its default, 0.5, is looser
  than 5 % on purpose: on a shared CPU the p95 of two identical models drifts by more than 5 % from load alone;
  and a gap under `latency_min_delta` seconds never counts.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass


@dataclass
class WatcherConfig:
    threshold: float = 0.05
    latency_ratio: float | None = 0.5
    latency_min_delta: float = 0.05  # seconds: a p95 gap smaller than this is never a regression
    min_samples: int = 50
    window: int = 500
    json_signal: bool = False
    interval: float = 0.5


@dataclass(frozen=True, slots=True)
class Sample:
    ok: bool
    latency: float
    json_ok: bool | None = None


def p95(values: list[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def is_json_content(body: bytes) -> bool | None:
    """Whether the first choice's text of an OpenAI response body is a JSON object; None when there is no
    text to judge (not a completion)."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(text, str):
        return None
    text = text.strip()
    if text.startswith("```"):  # tolerate a fenced block
        text = text.strip("`").removeprefix("json").strip()
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class Watcher:
    def __init__(self, config: WatcherConfig):
        self.config = config
        self.windows: dict[tuple[str, str], deque[Sample]] = {}
        self.tripped: set[tuple[str, str, int]] = set()

    def record(self, name: str, version: str, sample: Sample) -> None:
        w = self.windows.get((name, version))
        if w is None:
            w = self.windows[(name, version)] = deque(maxlen=self.config.window)
        w.append(sample)

    def reset(self, name: str, version: str) -> None:
        self.windows.pop((name, version), None)

    def stats(self, name: str, version: str) -> dict:
        samples = list(self.windows.get((name, version), ()))
        n = len(samples)
        judged = [s.json_ok for s in samples if s.json_ok is not None]
        ok_lat = [s.latency for s in samples if s.ok]
        return {
            "samples": n,
            "error_rate": (sum(not s.ok for s in samples) / n) if n else None,
            "p95_latency_s": p95(ok_lat) if ok_lat else None,
            "json_judged": len(judged),
            "json_valid_rate": (sum(judged) / len(judged)) if judged else None,
        }

    def verdict(self, name: str, stable: str, canary: str) -> dict | None:
        """Evidence for rolling back `canary`, or None while it holds up (or while samples are too few)."""
        c = self.config
        s_stats, c_stats = self.stats(name, stable), self.stats(name, canary)
        if s_stats["samples"] < c.min_samples or c_stats["samples"] < c.min_samples:
            return None
        reasons = []
        if c_stats["error_rate"] - s_stats["error_rate"] > c.threshold:
            reasons.append(
                f"error rate {c_stats['error_rate']:.1%} vs stable {s_stats['error_rate']:.1%} "
                f"(threshold +{c.threshold:.0%})"
            )
        if c.json_signal and min(s_stats["json_judged"], c_stats["json_judged"]) >= c.min_samples:
            if s_stats["json_valid_rate"] - c_stats["json_valid_rate"] > c.threshold:
                reasons.append(
                    f"valid JSON {c_stats['json_valid_rate']:.1%} vs stable {s_stats['json_valid_rate']:.1%} "
                    f"(threshold -{c.threshold:.0%})"
                )
        if c.latency_ratio is not None:
            sp, cp = s_stats["p95_latency_s"], c_stats["p95_latency_s"]
            if (
                sp is not None
                and cp is not None
                and cp > sp * (1 + c.latency_ratio)
                and cp - sp > c.latency_min_delta
            ):
                reasons.append(f"p95 latency {cp * 1000:.0f} ms vs stable {sp * 1000:.0f} ms")
        if not reasons:
            return None
        return {
            "reasons": reasons,
            "stable": {"version": stable, **s_stats},
            "canary": {"version": canary, **c_stats},
            "threshold": c.threshold,
            "latency_ratio": c.latency_ratio,
            "min_samples": c.min_samples,
            "window": c.window,
        }
