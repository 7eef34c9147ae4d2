"""`diff` (what changed between two versions) and `verify` (re-hash every registered artifact)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneship.registry import gate, store
from tuneship.registry.refs import parse_ref, resolve_n, vtag
from tuneship.registry.versions import describe


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _changes(a: Any, b: Any) -> dict[str, dict]:
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _numbers(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in _flatten(metrics).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def diff(ref_a: str, ref_b: str, root: str | os.PathLike | None = None) -> dict:
    """What changed from A to B: config, data, base model, LoRA, template, training and eval metrics."""
    root_p = store.registry_root(root)
    conn = store.connect(root_p)
    try:
        pa, pb = parse_ref(ref_a), parse_ref(ref_b)
        a = describe(conn, root_p, pa.name, resolve_n(conn, pa))
        b = describe(conn, root_p, pb.name, resolve_n(conn, pb))
    finally:
        conn.close()
    train = {}
    ma, mb = _numbers(a["metrics"]), _numbers(b["metrics"])
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k) != mb.get(k):
            delta = mb[k] - ma[k] if k in ma and k in mb else None
            train[k] = {"a": ma.get(k), "b": mb.get(k), "delta": delta}
    evals = {}
    eb = {e["data"].get("data_sha256"): e["data"] for e in b["evals"]}
    for e in a["evals"]:
        data_sha = e["data"].get("data_sha256")
        if data_sha in eb:
            for metric in sorted(set(e["data"].get("metrics", {})) | set(eb[data_sha].get("metrics", {}))):
                va, vb = gate.metric_value(e["data"], metric), gate.metric_value(eb[data_sha], metric)
                delta = vb - va if va is not None and vb is not None else None
                evals[metric] = {"a": va, "b": vb, "delta": delta, "data_sha256": data_sha}
    lineage = {}
    for key in (
        "dataset_sha256",
        "chat_template_sha256",
        "stop_tokens",
        "system_prompt",
        "git_commit",
        "parent",
    ):
        if a[key] != b[key]:
            lineage[key] = {"a": a[key], "b": b[key]}
    return {
        "a": a["ref"],
        "b": b["ref"],
        "data": {
            "a": a["dataset_sha256"],
            "b": b["dataset_sha256"],
            "changed": a["dataset_sha256"] != b["dataset_sha256"],
        },
        "config": _changes(a["config"], b["config"]),
        "base_model": _changes(a["base_model"], b["base_model"]),
        "lora": _changes(a["lora"], b["lora"]),
        "lineage": lineage,
        "metrics": {"train": train, "eval": evals},
    }


def verify(root: str | os.PathLike | None = None, name: str | None = None) -> dict:
    """Re-hash every registered adapter and attached artifact. {"ok", "checked", "problems": [...]}."""
    root_p = store.registry_root(root)
    conn = store.connect(root_p)
    try:
        args = (name,) if name else ()
        only = " AND name=?" if name else ""
        versions = conn.execute(
            "SELECT name, n, path, files FROM versions WHERE 1=1" + only + " ORDER BY name, n", args
        ).fetchall()
        artifacts = conn.execute(
            "SELECT name, n, kind, key, path, files, is_file FROM artifacts WHERE path IS NOT NULL"
            + only
            + " GROUP BY path ORDER BY MIN(id)",
            args,
        ).fetchall()
    finally:
        conn.close()
    problems = []
    checked = 0
    for v in versions:
        checked += 1
        for p in store.check_files(root_p / v["path"], store.loads(v["files"], {})):
            problems.append({"ref": f"{v['name']}@{vtag(v['n'])}", "artifact": "adapter", "problem": p})
    for a in artifacts:
        checked += 1
        path = Path(root_p / a["path"])
        for p in store.check_files(path, store.loads(a["files"], {}), is_file=bool(a["is_file"])):
            label = a["kind"] + (f":{a['key']}" if a["key"] and a["kind"] == "gguf" else "")
            problems.append({"ref": f"{a['name']}@{vtag(a['n'])}", "artifact": label, "problem": p})
    return {"ok": not problems, "checked": checked, "problems": problems}
