"""Cleaning: exact duplicates, contradictions and near-duplicates (MinHash + LSH from datasketch).

Near-duplicates: each example's text (user and assistant turns; the shared system prompt is left out) is cut
into word or character shingles. Signatures use datasketch's own permutations and its default "affine32"
scheme, computed for all rows at once with numpy (the same values `MinHash.update_batch` gives, much faster
than one MinHash object per row); `MinHashLSH` finds candidate pairs, and each candidate is confirmed with
the exact Jaccard similarity of the two shingle sets, so the threshold means what it says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

_WORD = re.compile(r"\w+")
# LSH band settings weigh a missed pair 99x a false candidate: every candidate is checked exactly, so false
# candidates cost only time, while a missed pair is a near-duplicate left in (recall ~0.98 at the threshold).
LSH_WEIGHTS = (0.01, 0.99)
BIG_BUCKET = 256  # above this many rows in one LSH bucket, compare against one row per cluster, not all pairs
_GRAM_MUL = np.uint64(0x100000001B3)  # FNV-64 prime: mixes consecutive token hashes into a shingle hash


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the smaller index stays the root
        return True


class _Vocab(dict):
    """word -> 32-bit hash (+1, so 0 stays free for padding), computed once per distinct word."""

    def __missing__(self, word: str) -> int:
        h = self[word] = zlib.crc32(word.encode()) + 1
        return h


def _fold(s: str) -> str:
    return " ".join(s.casefold().split())


def example_key(messages: list[dict]) -> bytes:
    """Identity of a normalized example (for exact duplicates)."""
    raw = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(raw.encode(), digest_size=16).digest()


def prompt_key(messages: list[dict]) -> bytes:
    """The normalized prompt (every turn but the last), case- and whitespace-folded."""
    raw = "\x1e".join(m["role"] + "\x1f" + _fold(m["content"]) for m in messages[:-1])
    return hashlib.blake2b(raw.encode(), digest_size=16).digest()


def answer_key(content: str) -> str:
    """The answer, compared as JSON when it parses as JSON (key order does not matter), else folded text."""
    s = content.strip()
    if s[:1] in "{[":
        try:
            return "json:" + json.dumps(
                json.loads(s), sort_keys=True, ensure_ascii=False, separators=(",", ":")
            )
        except ValueError:
            pass
    return "text:" + _fold(s)


def find_exact_duplicates(examples: list[dict]) -> dict[int, int]:
    """{duplicate row: first row with the same messages}."""
    first: dict[bytes, int] = {}
    dups: dict[int, int] = {}
    for i, ex in enumerate(examples):
        k = example_key(ex["messages"])
        j = first.setdefault(k, i)
        if j != i:
            dups[i] = j
    return dups


def find_contradictions(examples: list[dict], skip: set[int] | dict) -> list[list[int]]:
    """Groups of rows (not in `skip`) that share a normalized prompt but give different answers."""
    by_prompt: dict[bytes, list[int]] = {}
    for i, ex in enumerate(examples):
        if i not in skip:
            by_prompt.setdefault(prompt_key(ex["messages"]), []).append(i)
    groups = []
    for rows in by_prompt.values():
        if len(rows) > 1 and len({answer_key(examples[i]["messages"][-1]["content"]) for i in rows}) > 1:
            groups.append(rows)
    return groups


def dedup_text(example: dict) -> str:
    return "\n".join(m["content"] for m in example["messages"] if m["role"] != "system")


def shingle_hashes(texts: list[str], mode: str = "word", k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every k-shingle of every text, flat, with offsets (row i owns flat[off[i]:off[i+1]]).

    `word` shingles are k consecutive words (casefolded `\\w+` runs); `char` shingles are k consecutive
    characters of the casefolded, whitespace-collapsed text. A text shorter than k is one padded shingle.
    """
    if mode not in ("word", "char"):
        raise ValueError(f"shingle mode must be word or char, got {mode!r}")
    if k < 1:
        raise ValueError("shingle size must be at least 1")
    if mode == "word":
        vocab = _Vocab({"": 0})
        token_parts, length_parts = [], []
        for start in range(0, len(texts), 8192):  # in chunks, so the word strings never all live at once
            words = [_WORD.findall(t.casefold()) for t in texts[start : start + 8192]]
            for i, w in enumerate(words):
                if len(w) < k:
                    words[i] = w + [""] * (k - len(w))  # "" is the padding token, hashed to 0
            lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
            token_parts.append(
                np.fromiter(
                    map(vocab.__getitem__, chain.from_iterable(words)), dtype=np.uint64, count=int(lens.sum())
                )
            )
            length_parts.append(lens)
        lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int64)
        tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype=np.uint64)
    else:
        pieces: list[np.ndarray] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, t in enumerate(texts):
            cps = np.frombuffer(" ".join(t.casefold().split()).encode("utf-32-le"), dtype=np.uint32)
            if len(cps) < k:
                cps = np.concatenate([cps, np.zeros(k - len(cps), dtype=np.uint32)])
            pieces.append(cps)
            lengths[i] = len(cps)
        tokens = np.concatenate(pieces).astype(np.uint64) if pieces else np.zeros(0, dtype=np.uint64)
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.uint32), np.zeros(1, dtype=np.int64)
    m = n - k + 1
    with np.errstate(over="ignore"):
        g = tokens[:m].copy()
        for j in range(1, k):
            g = g * _GRAM_MUL + tokens[j : m + j]
        g ^= g >> np.uint64(32)
    ends = np.cumsum(lengths)
    valid = np.ones(m, dtype=bool)
    if k > 1:
        tail = (ends[:, None] - np.arange(1, k)[None, :]).ravel()
        valid[tail[tail < m]] = False
    hashes = (g[valid] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    counts = lengths - k + 1
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return hashes, offsets


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, exactly as datasketch applies it before its affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def permutations(num_perm: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    perm = MinHash(num_perm=num_perm, seed=seed).permutations
    if perm.dtype != np.uint32 or perm.shape != (2, num_perm):
        raise RuntimeError(
            "unexpected datasketch permutations; tuneship expects datasketch>=2 (affine32 scheme)"
        )
    return perm


def signatures(
    hashes: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 1, block: int = 65536
) -> np.ndarray:
    """MinHash signatures (rows x num_perm, uint32), equal to datasketch's affine32 `update_batch`."""
    a, b = permutations(num_perm, seed)
    n_rows = len(offsets) - 1
    out = np.empty((n_rows, num_perm), dtype=np.uint32)
    mixed = _fmix32(hashes.astype(np.uint32))
    spans = []
    r0 = 0
    while r0 < n_rows:  # as many rows as fit in `block` shingles (at least one row)
        r1 = int(np.searchsorted(offsets, offsets[r0] + block, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n_rows)
        spans.append((r0, r1))
        r0 = r1

    def run(span: tuple[int, int]) -> None:
        r0, r1 = span
        lo, hi = offsets[r0], offsets[r1]
        with np.errstate(over="ignore"):
            phv = mixed[lo:hi, None] * a[None, :] + b[None, :]
        out[r0:r1] = np.minimum.reduceat(phv, offsets[r0:r1] - lo, axis=0)

    # numpy releases the GIL in these loops, so threads use every core
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(run, spans))
    return out


@dataclass
class NearDupResult:
    clusters: list[list[int]] = field(default_factory=list)  # row indices, first (smallest) is kept
    matched: dict[int, tuple[int, float]] = field(default_factory=dict)  # member -> (row it matched, Jaccard)
    candidates: int = 0  # LSH candidate pairs checked
    num_perm: int = 0
    bands: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # shingles, signatures, lsh_index, verify


def find_near_duplicates(
    texts: list[str],
    rows: list[int],
    threshold: float = 0.9,
    mode: str = "word",
    k: int = 3,
    num_perm: int = 64,
    seed: int = 1,
) -> NearDupResult:
    """Near-duplicate clusters among `rows` (indices into `texts`), Jaccard >= threshold."""
    from datasketch import LeanMinHash, MinHashLSH

    res = NearDupResult(num_perm=num_perm)
    if len(rows) < 2:
        return res
    t0 = time.perf_counter()
    hashes, offsets = shingle_hashes([texts[i] for i in rows], mode, k)
    t1 = time.perf_counter()
    sigs = signatures(hashes, offsets, num_perm, seed)
    t2 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    res.bands = lsh.b
    uf = UnionFind(len(rows))
    sets: dict[int, np.ndarray] = {}
    pairs: list[tuple[int, int, float]] = []

    def shingle_set(j: int) -> np.ndarray:
        s = sets.get(j)
        if s is None:
            s = sets[j] = np.unique(hashes[offsets[j] : offsets[j + 1]])
        return s

    with lsh.insertion_session() as session:
        for j in range(len(rows)):
            session.insert(
                j, LeanMinHash(seed=seed, hashvalues=sigs[j], scheme="affine32"), check_duplication=False
            )
    t3 = time.perf_counter()
    checked: set[tuple[int, int]] = set()

    def check(j: int, c: int) -> None:
        if uf.find(c) == uf.find(j) or (j, c) in checked:
            return
        checked.add((j, c))
        res.candidates += 1
        sa, sb = shingle_set(j), shingle_set(c)
        inter = len(np.intersect1d(sa, sb, assume_unique=True))
        jac = inter / (len(sa) + len(sb) - inter)
        if jac >= threshold:
            uf.union(j, c)
            pairs.append((j, c, jac))

    # Rows sharing a bucket in any band are candidates (what `lsh.query` returns), read straight from the
    # index's tables so each row's bands are hashed once.
    for table in lsh.hashtables:
        for key in table.keys():
            members = table.get(key)
            if len(members) < 2:
                continue
            members = sorted(members)
            if len(members) <= BIG_BUCKET:
                for x in range(1, len(members)):
                    for y in range(x):
                        check(members[x], members[y])
            else:  # a huge bucket (templated data): compare each row with one row per cluster seen so far
                reps: dict[int, int] = {}
                for m in members:
                    for r in list(reps.values()):
                        check(m, r)
                    reps.setdefault(uf.find(m), m)
                    reps = {uf.find(r): r for r in reps.values()}
    t4 = time.perf_counter()
    res.seconds = {
        k: round(v, 3)
        for k, v in zip(
            ("shingles", "signatures", "lsh_index", "verify"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            strict=True,
        )
    }
    groups: dict[int, list[int]] = {}
    for j in range(len(rows)):
        groups.setdefault(uf.find(j), []).append(j)
    for members in groups.values():
        if len(members) > 1:
            res.clusters.append([rows[j] for j in members])  # ascending, so the first row is kept
    for j, c, jac in pairs:
        res.matched.setdefault(rows[j], (rows[c], jac))
        res.matched.setdefault(rows[c], (rows[j], jac))
    res.clusters.sort()
    return res
