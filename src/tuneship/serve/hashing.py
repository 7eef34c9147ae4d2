"""Sticky, weighted assignment of users to versions: rendezvous (highest-random-weight) hashing.

Each (user key, version) pair gets a uniform hash u in (0, 1); the version with the largest
`-weight / ln(u)` wins (the "logarithmic method" of weighted rendezvous hashing). This gives:
- each version a share of users equal to its share of the total weight;
- the same key the same version for as long as the weights are unchanged (no state, no table);
- minimal movement when weights change: a user moves only to a version whose weight went up, or away from
  one whose weight went down, so 90/10 -> 50/50 moves 40 % of users, all from the first version to the second.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping

_SCALE = 1.0 / 18446744073709551616.0  # 2**-64


def unit_hash(key: str, version: str) -> float:
    """A uniform number in (0, 1) from (key, version), stable across processes and machines."""
    digest = hashlib.blake2b(f"{version}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) * _SCALE


def pick_sticky(key: str, weights: Mapping[str, float]) -> str | None:
    """The version that `key` lands on under `weights` (versions with weight <= 0 never win)."""
    best, best_score = None, -math.inf
    for version, weight in weights.items():
        if weight <= 0:
            continue
        score = -weight / math.log(unit_hash(key, version))
        if score > best_score or (score == best_score and best is not None and version < best):
            best, best_score = version, score
    return best


def pick_random(weights: Mapping[str, float], rng: random.Random | None = None) -> str | None:
    """A version drawn at random in proportion to its weight (for requests without a user key)."""
    items = [(v, w) for v, w in weights.items() if w > 0]
    if not items:
        return None
    total = sum(w for _, w in items)
    x = (rng or random).random() * total
    for version, weight in items:
        x -= weight
        if x < 0:
            return version
    return items[-1][0]
