"""Bootstrap confidence intervals and paired comparisons (numpy only, vectorized, seeded).

Every metric is `sum(num) / sum(den)` over examples (see metrics.Scores). A bootstrap replicate reweights the
examples by multinomial counts `W` (one row per replicate), so all metrics of all models are resampled with the
same draws at the cost of one matrix product: `(W @ num) / (W @ den)`.

- `intervals`: the percentile bootstrap CI of each metric.
- `paired`: the difference candidate - baseline on the same examples, its paired bootstrap CI (the same draws
  for both models), and a two-sided p-value from a paired permutation test that swaps the two models' scores
  within each example at random (for a mean this is the sign-flip test on per-example differences).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tuneship.eval.metrics import Scores

# Keep each weight matrix under ~4M entries (32 MB of float64).
_CHUNK_ENTRIES = 4_000_000


def _weights(n: int, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    rows = max(1, _CHUNK_ENTRIES // max(n, 1))
    pvals = np.full(n, 1.0 / n)
    done = 0
    while done < n_boot:
        b = min(rows, n_boot - done)
        yield rng.multinomial(n, pvals, size=b).astype(float)
        done += b


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _stack(scores: dict[str, Scores], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    num = np.stack([scores[k].num for k in names], axis=1).astype(float)
    den = np.stack([scores[k].den for k in names], axis=1).astype(float)
    return num, den


def _interval(samples: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _n(scores: dict[str, Scores]) -> int:
    lengths = {len(s.num) for s in scores.values()}
    if len(lengths) != 1:
        raise ValueError(f"metrics have different numbers of examples: {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("no examples to bootstrap")
    return n


def intervals(
    scores: dict[str, Scores], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """`{metric: {"value": v, "ci": [lo, hi]}}`: the point value and its percentile bootstrap CI."""
    if not scores:
        return {}
    names = list(scores)
    n = _n(scores)
    num, den = _stack(scores, names)
    rng = np.random.default_rng(seed)
    reps = np.concatenate([_ratio(w @ num, w @ den) for w in _weights(n, n_boot, rng)], axis=0)
    return {k: {"value": scores[k].value, "ci": _interval(reps[:, j], level)} for j, k in enumerate(names)}


def paired(
    a: dict[str, Scores], b: dict[str, Scores], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """`{metric: {"value": a - b, "ci": [lo, hi], "p_value": p}}` over the metrics both models have.

    `a` and `b` must score the same examples in the same order.
    """
    names = [k for k in a if k in b]
    if not names:
        return {}
    n = _n({k: a[k] for k in names})
    if _n({k: b[k] for k in names}) != n:
        raise ValueError("paired comparison needs both models scored on the same examples")
    num_a, den_a = _stack(a, names)
    num_b, den_b = _stack(b, names)
    observed = np.array([a[k].value - b[k].value for k in names])

    rng = np.random.default_rng(seed)
    diffs = np.concatenate(
        [_ratio(w @ num_a, w @ den_a) - _ratio(w @ num_b, w @ den_b) for w in _weights(n, n_boot, rng)],
        axis=0,
    )

    # Paired permutation: swap a and b within each example with probability 1/2.
    d_num, d_den = num_a - num_b, den_a - den_b
    sum_a_num, sum_a_den = num_a.sum(0), den_a.sum(0)
    sum_b_num, sum_b_den = num_b.sum(0), den_b.sum(0)
    rng_perm = np.random.default_rng([seed, 1])
    rows = max(1, _CHUNK_ENTRIES // n)
    extreme = np.zeros(len(names))
    done = 0
    tol = 1e-12 * np.maximum(1.0, np.abs(observed))
    while done < n_boot:
        m = rng_perm.integers(0, 2, size=(min(rows, n_boot - done), n)).astype(float)
        # where m == 0 the example keeps its labels; where m == 1 a and b swap.
        pa = _ratio(sum_a_num - m @ d_num, sum_a_den - m @ d_den)
        pb = _ratio(sum_b_num + m @ d_num, sum_b_den + m @ d_den)
        stat = np.abs(pa - pb)
        extreme += np.sum(stat >= np.abs(observed) - tol, axis=0)
        done += m.shape[0]
    p_values = (extreme + 1) / (n_boot + 1)

    return {
        k: {"value": float(observed[j]), "ci": _interval(diffs[:, j], level), "p_value": float(p_values[j])}
        for j, k in enumerate(names)
    }
