"""Seeded train/valid/test splits that keep linked rows together.

Rows are linked when they share a `--group-key` value or sit in one duplicate, contradiction or near-duplicate
cluster that was kept. Linked rows form one component (union-find), and a whole component goes to one split,
so nothing leaks between splits.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tuneship.data.clean import UnionFind

SPLITS = ("train", "valid", "test")


def components(n: int, links: Iterable[Iterable[int]]) -> list[list[int]]:
    """Connected components of rows 0..n-1 given groups of linked rows, each sorted, ordered by first row."""
    uf = UnionFind(n)
    for group in links:
        it = iter(group)
        first = next(it, None)
        if first is None:
            continue
        for other in it:
            uf.union(first, other)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(uf.find(i), []).append(i)
    return sorted(comps.values(), key=lambda c: c[0])


def assign_splits(comps: list[list[int]], fractions: tuple[float, ...], seed: int) -> dict[str, list[int]]:
    """Give each component to one split, seeded, aiming at the target fractions.

    Components are shuffled with `seed`, then placed largest first: each goes to a split that still has room
    for all of it, picked at random in proportion to that room (so a big group may land in test too); one
    that fits nowhere goes where the most room is left. With no links (every component one row) the sizes are
    exact: round(f * n) for valid and test, the rest for train. Within a split, rows keep the shuffled order.
    """
    n = sum(len(c) for c in comps)
    names = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0]
    targets = {s: round(f * n) for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and s != "train"}
    if "train" in names:
        targets["train"] = n - sum(targets.values())
    rng = random.Random(seed)
    order = list(comps)
    rng.shuffle(order)
    order.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    singles_from = next((i for i, c in enumerate(order) if len(c) == 1), len(order))
    for comp in order[:singles_from]:
        room = {s: targets[s] - len(out[s]) for s in names}
        fits = [s for s in names if room[s] >= len(comp)]
        if fits:
            best = rng.choices(fits, weights=[room[s] for s in fits])[0]
        else:
            best = max(names, key=lambda s: room[s])
        out[best].extend(comp)
    # single rows (already shuffled) fill what room is left: valid and test first, train takes the rest
    singles = [c[0] for c in order[singles_from:]]
    for s in [s for s in names if s != "train"] + ["train"]:
        if s not in names:
            continue
        take = len(singles) if s == "train" else max(0, min(targets[s] - len(out[s]), len(singles)))
        out[s].extend(singles[:take])
        singles = singles[take:]
    if singles:  # no train split (fraction 0 is refused by the config, but keep the function total)
        out[names[-1]].extend(singles)
    for s in SPLITS:  # rows in shuffled order, not grouped by component
        rng.shuffle(out[s])
    return out
