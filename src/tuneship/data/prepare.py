"""`tuneship data prepare`: read, validate, normalize, clean, measure, split and audit a data set.

    prepare_data(["raw.jsonl"], "data/clean", PrepareConfig(group_key="user_id"))

writes `train.jsonl`, `valid.jsonl`, `test.jsonl` (normalized schema), `audit.json`, `audit.md`,
`lengths.png` and the `tuneship.json` record (kind "dataset", with `sha256` = `dataset_sha256` of the splits,
the value `tuneship train` records for the same files).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tuneship.artifacts import atomic_dir, write_json_atomic, write_record
from tuneship.config import StageConfig
from tuneship.data import audit as audit_mod
from tuneship.data.clean import dedup_text, find_contradictions, find_exact_duplicates, find_near_duplicates
from tuneship.data.hashing import SPLIT_FILES, dataset_sha256
from tuneship.data.readers import BadRow, Source, read_input
from tuneship.data.schema import RowError, normalize_row
from tuneship.data.split import SPLITS, assign_splits, components
from tuneship.errors import TuneshipError
from tuneship.models import DEFAULT_MODEL
from tuneship.progress import log

REASONS = ("invalid", "exact_duplicate", "near_duplicate", "contradiction")
EXAMPLES = 10  # examples per cleaning reason in the audit
FLAGS_KEY = "tuneship_flags"  # meta key naming why a kept row was flagged (only with --keep-flagged)


class PrepareConfig(StageConfig):
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "input_output"] = Field(
        "auto",
        description="Row shape; auto detects it per row (messages, prompt/completion, instruction/output, input/output).",
    )
    system: str | None = Field(None, description="System prompt to put first in every example that has none.")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="Bad rows: fail lists every one and writes nothing; skip drops them and lists them in the audit.",
    )
    keep_flagged: bool = Field(
        False,
        description="Keep duplicates, near-duplicates and contradictions (flagged in meta and the audit) instead of removing them.",
    )
    near_dup_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Jaccard similarity of shingle sets at or above which two rows are near-duplicates.",
    )
    shingle: Literal["word", "char"] = Field(
        "word", description="Shingles for near-duplicate detection: word n-grams or character n-grams."
    )
    shingle_size: int | None = Field(
        None, ge=1, description="Shingle length n (default 3 for word, 5 for char)."
    )
    num_perm: int = Field(
        64,
        ge=16,
        le=1024,
        description="MinHash permutations (LSH candidates are then checked with exact Jaccard).",
    )
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train,valid,test fractions; they must sum to 1."
    )
    seed: int = Field(
        0, description="Seed for the split shuffle and the length sample; the same seed gives the same files."
    )
    group_key: str | None = Field(
        None,
        description="Input field (dots reach into meta) whose rows must stay in one split, e.g. user_id or source_doc.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="Model whose tokenizer and chat template measure token lengths (adapter: its base); 'none' skips.",
    )
    max_length: int = Field(
        1024, ge=1, description="Training max_length in tokens; rows above it are counted in the audit."
    )
    length_sample: int = Field(
        10000,
        ge=0,
        description="Token-length percentiles from a seeded sample of this many rows (0 = every row); rows that "
        "could exceed max_length are always measured.",
    )
    pii: bool = Field(
        False, description="Scan for emails, phone numbers and card-like numbers and flag them in the audit."
    )

    @field_validator("splits", mode="before")
    @classmethod
    def _parse_splits(cls, v):
        if isinstance(v, str):
            try:
                v = tuple(float(x) for x in v.split(","))
            except ValueError:
                raise ValueError(f"splits {v!r} must be three numbers like 0.8,0.1,0.1") from None
        return v

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, v):
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"splits {','.join(map(str, v))} must be non-negative, train > 0, and sum to 1")
        return v


class BadRowsError(TuneshipError):
    """Raised with --on-error fail; `bad_rows` holds every bad row (dicts with where/file/line/reason)."""

    def __init__(self, message: str, bad_rows: list[dict]):
        super().__init__(message)
        self.bad_rows = bad_rows


def _meta_get(meta: dict, key: str):
    node = meta
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return json.dumps(node, sort_keys=True, ensure_ascii=False) if isinstance(node, (dict, list)) else node


def _flag_entry(i: int, reason: str, exact: dict, matched: dict, wheres: list[str]) -> dict:
    entry = {"where": wheres[i], "reason": reason}
    if reason == "exact_duplicate":
        entry["duplicate_of"] = wheres[exact[i]]
    elif reason == "near_duplicate":
        entry["similar_to"], entry["jaccard"] = wheres[matched[i][0]], round(matched[i][1], 4)
    return entry


def _last_user(example: dict) -> str:
    return next((m["content"] for m in reversed(example["messages"]) if m["role"] == "user"), "")


class _Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self.t, 3)
        self.t = now


def read_and_normalize(
    inputs: Sequence[str], cfg: PrepareConfig
) -> tuple[list[Source], list[dict], list[str], list[BadRow]]:
    """Read every input and normalize its rows. Returns sources, examples, their locations and bad rows."""
    sources, examples, wheres, bad = [], [], [], []
    for path in inputs:
        src, items = read_input(str(path))
        sources.append(src)
        for r in items:
            if isinstance(r, BadRow):
                bad.append(r)
                continue
            try:
                examples.append(normalize_row(r.row, fmt=cfg.format, system=cfg.system))
                wheres.append(str(r.where))
            except RowError as e:
                bad.append(BadRow(r.where, str(e)))
    return sources, examples, wheres, bad


def prepare_data(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: PrepareConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """Prepare `inputs` into the dataset directory `out`; returns the --json summary."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    if not inputs:
        raise TuneshipError("no inputs; pass one or more data files, datasets directories or Hub ids")
    if out.exists() and not overwrite:
        raise TuneshipError(f"output {out} already exists; choose another --out or pass --overwrite")
    timer = _Timer()

    sources, examples, wheres, bad = read_and_normalize([str(p) for p in inputs], cfg)
    rows_in = sum(s.rows for s in sources)
    timer.lap("read")
    log(f"read {rows_in} rows from {len(sources)} input(s): {len(examples)} valid, {len(bad)} bad")
    bad_dicts = [b.to_dict() for b in bad]
    if bad and cfg.on_error == "fail":
        for b in bad:
            log(f"bad row {b.where}: {b.reason}")
        raise BadRowsError(
            f"{len(bad)} bad row(s) (listed above; first {bad[0].where}: {bad[0].reason}); fix them or pass "
            "--on-error skip to drop them; nothing was written",
            bad_dicts,
        )
    if not examples:
        raise TuneshipError(f"no valid rows in {', '.join(map(str, inputs))}; nothing to write")

    # Cleaning: each row gets its first reason only (exact duplicate, contradiction, then near-duplicate).
    n = len(examples)
    flags: dict[int, str] = {}
    exact = find_exact_duplicates(examples)
    for i in exact:
        flags[i] = "exact_duplicate"
    contra = find_contradictions(examples, skip=exact)
    for group in contra:
        for i in group:
            flags.setdefault(i, "contradiction")
    timer.lap("exact_and_contradictions")
    texts = [dedup_text(ex) for ex in examples]
    nd_rows = [i for i in range(n) if i not in exact and (cfg.keep_flagged or i not in flags)]
    k = cfg.shingle_size or (3 if cfg.shingle == "word" else 5)
    near = find_near_duplicates(texts, nd_rows, cfg.near_dup_threshold, cfg.shingle, k, cfg.num_perm, seed=1)
    for cluster in near.clusters:
        for i in cluster[1:]:
            flags.setdefault(i, "near_duplicate")
    timer.lap("near_duplicates")
    flag_counts = {r: 0 for r in REASONS[1:]}
    for reason in flags.values():
        flag_counts[reason] += 1
    removed = {"invalid": len(bad), **({r: 0 for r in REASONS[1:]} if cfg.keep_flagged else flag_counts)}

    # Splits over the kept rows; linked rows (group key, kept clusters) form one component each.
    kept = [i for i in range(n) if cfg.keep_flagged or i not in flags]
    local = {i: j for j, i in enumerate(kept)}
    links: list[list[int]] = []
    group_of: dict[int, object] = {}
    if cfg.group_key:
        by_group: dict[object, list[int]] = {}
        for i in kept:
            g = _meta_get(examples[i]["meta"], cfg.group_key)
            if g is not None:
                group_of[i] = g
                by_group.setdefault(g, []).append(local[i])
        links += by_group.values()
    clusters = [[j, i] for i, j in exact.items()] + contra + near.clusters
    links += [[local[i] for i in c if i in local] for c in clusters]
    comps = components(len(kept), links)
    parts = assign_splits(comps, cfg.splits, cfg.seed)
    split_rows = {s: [kept[j] for j in parts[s]] for s in SPLITS}
    split_of = {i: s for s, rows in split_rows.items() for i in rows}
    timer.lap("split")

    groups_audit: dict = {"key": cfg.group_key}
    if cfg.group_key:
        spread: dict[object, set] = {}
        for i, g in group_of.items():
            spread.setdefault(g, set()).add(split_of[i])
        groups_audit.update(
            groups=len(spread),
            rows_without_key=len(kept) - len(group_of),
            leaking_groups=sum(len(v) > 1 for v in spread.values()),
        )
    leaking_clusters = sum(len({split_of[i] for i in c if i in split_of}) > 1 for c in clusters)

    # Token lengths with the target model's chat template.
    kept_examples = [examples[i] for i in kept]
    tokens: dict = {"measured": 0, "note": "not measured (--model none)"}
    lengths = None
    if cfg.model.lower() != "none":
        tl = audit_mod.token_lengths(kept_examples, cfg.model, cfg.length_sample, cfg.seed, cfg.max_length)
        lengths = tl["sample_lengths"]
        tokens = {"model": tl["model"], **audit_mod.length_stats(tl, cfg.max_length, len(kept))}
        longest = sorted(
            (
                (int(length), kept[j])
                for length, j in zip(tl["lengths"], tl["rows"], strict=True)
                if length > cfg.max_length
            ),
            reverse=True,
        )
        tokens["over_examples"] = [{"where": wheres[i], "tokens": t} for t, i in longest[:EXAMPLES]]
    timer.lap("token_lengths")

    pii_audit = None
    if cfg.pii:
        from tuneship.data.pii import KINDS, mask, scan

        counts = dict.fromkeys(KINDS, 0)
        hits, rows_hit = [], 0
        for i in kept:
            found = scan(texts[i])
            if found:
                rows_hit += 1
            for kind, match in found:
                counts[kind] += 1
                hits.append({"where": wheres[i], "kind": kind, "match": mask(match)})
        pii_audit = {"rows": rows_hit, "counts": counts, "examples": hits[:200]}
        timer.lap("pii")

    field_stats = audit_mod.json_field_stats([ex["messages"][-1]["content"] for ex in kept_examples])

    def text_of(i: int) -> str:
        return audit_mod._short(texts[i], 200)

    audit = {
        "summary": {},
        "config": cfg.model_dump(mode="json"),
        "inputs": [vars(s) for s in sources],
        "invalid": bad_dicts,
        "exact_duplicates": {
            "count": flag_counts["exact_duplicate"],
            "examples": [
                {"where": wheres[i], "duplicate_of": wheres[j], "text": text_of(i)}
                for i, j in list(exact.items())[:EXAMPLES]
            ],
        },
        "contradictions": {
            "count": flag_counts["contradiction"],
            "groups": len(contra),
            "examples": [
                {
                    "prompt": _last_user(examples[g[0]]),
                    "answers": [
                        {"where": wheres[i], "answer": examples[i]["messages"][-1]["content"]} for i in g
                    ],
                }
                for g in contra[:EXAMPLES]
            ],
        },
        "near_duplicates": {
            "count": flag_counts["near_duplicate"],
            "clusters": len(near.clusters),
            "threshold": cfg.near_dup_threshold,
            "shingle": cfg.shingle,
            "shingle_size": k,
            "num_perm": cfg.num_perm,
            "lsh_bands": near.bands,
            "candidates_checked": near.candidates,
            "seconds": near.seconds,
            "examples": [
                {
                    "kept": {"where": wheres[c[0]], "text": text_of(c[0])},
                    "members": [
                        {
                            "where": wheres[i],
                            "similar_to": wheres[near.matched[i][0]],
                            "jaccard": round(near.matched[i][1], 4),
                            "text": text_of(i),
                        }
                        for i in c[1:]
                    ],
                }
                for c in near.clusters[:EXAMPLES]
            ],
        },
        "flagged_rows": [_flag_entry(i, r, exact, near.matched, wheres) for i, r in sorted(flags.items())],
        "groups": groups_audit,
        "linked_components": {
            "components": len(comps),
            "linked": sum(len(c) for c in comps if len(c) > 1),
            "leaking_clusters": leaking_clusters,
        },
        "tokens": tokens,
        "json_fields": field_stats,
        "pii": pii_audit,
        "histogram": None,
    }

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for s in SPLITS:
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for i in split_rows[s]:
                    ex = examples[i]
                    if i in flags:  # only kept with --keep-flagged
                        ex = {"messages": ex["messages"], "meta": {**ex["meta"], FLAGS_KEY: [flags[i]]}}
                    f.write(json.dumps(ex, ensure_ascii=False, default=str) + "\n")
        digest = dataset_sha256([tmp / f for f in SPLIT_FILES])
        if lengths is not None and len(lengths):
            audit["histogram"] = "lengths.png"
            audit_mod.histogram_png(
                lengths, cfg.max_length, tmp / "lengths.png", f"{len(lengths)} rows, {cfg.model}"
            )
        timer.lap("write")
        summary = {
            "out": str(out),
            "rows_in": rows_in,
            "rows_out": len(kept),
            "removed": removed,
            "flagged": flag_counts,
            "splits": {s: len(split_rows[s]) for s in SPLITS},
            "sha256": digest,
            "tokens": {k: tokens[k] for k in ("p50", "p95", "max", "over_max_length") if k in tokens} or None,
            "seconds": round(sum(timer.times.values()), 2),
        }
        audit["summary"] = summary
        audit["timings"] = timer.times
        write_json_atomic(tmp / "audit.json", audit)
        (tmp / "audit.md").write_text(audit_mod.render_markdown(audit), encoding="utf-8")
        write_record(
            tmp,
            "dataset",
            sha256=digest,
            dataset_sha256=digest,
            files=list(SPLIT_FILES),
            splits=summary["splits"],
            rows_in=rows_in,
            rows_out=summary["rows_out"],
            removed=removed,
            flagged=flag_counts,
            inputs=[vars(s) for s in sources],
            system_prompt=cfg.system,
            seed=cfg.seed,
            config=cfg.model_dump(mode="json"),
            tokenizer=tokens.get("model"),
            chat_template_sha256=(tokens.get("model") or {}).get("chat_template_sha256"),
            metrics={
                k: v for k, v in tokens.items() if k in ("p50", "p95", "max", "mean", "over_max_length")
            },
        )
    log(
        f"wrote {out}: {summary['rows_out']} of {rows_in} rows "
        + ", ".join(f"{s}={c}" for s, c in summary["splits"].items())
        + f" in {summary['seconds']} s"
    )
    return summary
