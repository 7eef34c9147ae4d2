"""Versions: register an adapter as NAME@vN, list them, show one, resolve a ref to its files."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from tuneship.artifacts import RECORD, now_iso, whoami
from tuneship.errors import TuneshipError
from tuneship.registry import store
from tuneship.registry.refs import Ref, check_name, looks_like_ref, parse_ref, resolve_n, vtag

ADAPTER_DIR = "adapter"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def version_dir(root: Path, name: str, n: int) -> Path:
    return root / "versions" / name / vtag(n)


def adapter_path(root: Path, name: str, n: int) -> Path:
    return version_dir(root, name, n) / ADAPTER_DIR


def _read_adapter(artifact: Path) -> tuple[dict, dict]:
    """Check that `artifact` is an adapter directory and return (record, adapter_config)."""
    if not artifact.is_dir():
        raise TuneshipError(
            f"{artifact} is not a directory; `registry add` takes an adapter directory from `tuneship train`"
        )
    cfg_path = artifact / "adapter_config.json"
    if not cfg_path.is_file():
        raise TuneshipError(f"{artifact} has no adapter_config.json; is it a PEFT adapter directory?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise TuneshipError(f"{cfg_path} is not valid JSON ({e})") from e
    names = [p.name for p in artifact.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        hint = f" (it holds pickle weights {pickles[0]}; convert them to safetensors)" if pickles else ""
        raise TuneshipError(f"{artifact} has no adapter_model.safetensors{hint}")
    record: dict = {}
    if (artifact / RECORD).is_file():
        try:
            record = json.loads((artifact / RECORD).read_text())
        except json.JSONDecodeError as e:
            raise TuneshipError(
                f"{artifact / RECORD} is not valid JSON ({e}); the artifact is damaged"
            ) from e
        if record.get("kind") not in (None, "adapter"):
            raise TuneshipError(
                f"{artifact} is a {record.get('kind')!r} artifact; `registry add` takes an adapter "
                "(attach merged models and GGUF files through `tuneship merge`/`export` on a registry ref)"
            )
    return record, cfg


def _lineage(record: dict, cfg: dict) -> dict[str, Any]:
    """What a version records, from the training record, falling back to PEFT's adapter_config.json."""
    base = record.get("base_model") or {
        "spec": cfg.get("base_model_name_or_path"),
        "id": cfg.get("base_model_name_or_path"),
        "revision": cfg.get("revision"),
        "sha256": None,
    }
    lora = record.get("lora") or {}
    targets = lora.get("target_modules", cfg.get("target_modules"))
    if isinstance(targets, (set, tuple)):
        targets = sorted(targets)
    return {
        "base_model": base,
        "lora": {
            **lora,
            "r": lora.get("r", cfg.get("r")),
            "alpha": lora.get("alpha", cfg.get("lora_alpha")),
            "target_modules": targets,
        },
        "dataset_sha256": record.get("dataset_sha256"),
        "chat_template_sha256": record.get("chat_template_sha256"),
        "stop_tokens": record.get("stop_tokens"),
        "system_prompt": record.get("system_prompt"),
        "config": record.get("config"),
        "git_commit": record.get("git_commit"),
        "metrics": record.get("metrics") or {},
    }


def _parent_from_record(conn: sqlite3.Connection, record: dict) -> str | None:
    """A parent version named by the training record: `registry_ref`, or a parent whose sha256 is registered."""
    ref = record.get("registry_ref")
    if isinstance(ref, str) and looks_like_ref(ref):
        try:
            return f"{ref.split('@')[0]}@{vtag(resolve_n(conn, parse_ref(ref)))}"
        except TuneshipError:
            return None
    parent = record.get("parent")
    if isinstance(parent, str) and looks_like_ref(parent):
        return _parent_from_record(conn, {"registry_ref": parent})
    if isinstance(parent, dict):
        if parent.get("registry_ref"):
            return _parent_from_record(conn, {"registry_ref": parent["registry_ref"]})
        if parent.get("sha256"):
            rows = conn.execute("SELECT name, n FROM versions WHERE sha256=?", (parent["sha256"],)).fetchall()
            if len(rows) == 1:
                return f"{rows[0]['name']}@{vtag(rows[0]['n'])}"
    return None


def add_version(
    artifact: str | os.PathLike,
    name: str,
    root: str | os.PathLike | None = None,
    parent: str | None = None,
    notes: str | None = None,
    tags: tuple[str, ...] | list[str] = (),
    actor: str | None = None,
) -> str:
    """Copy an adapter directory into the registry as the next NAME@vN and return that ref.

    The copy is hashed while it is made, staged invisibly, and published in one transaction.
    """
    check_name(name)
    artifact = Path(artifact)
    record, cfg = _read_adapter(artifact)
    root = store.registry_root(root)
    conn = store.connect(root, create=True)
    try:
        if parent:
            p = parse_ref(parent)
            parent = f"{p.name}@{vtag(resolve_n(conn, p))}"
        else:
            parent = _parent_from_record(conn, record)
        stage = store.staging_dir(root)
        try:
            sha, files = store.copy_hashed(artifact, stage / ADAPTER_DIR)
            lineage = _lineage(record, cfg)
            who = actor or whoami()
            with store.transaction(conn):
                n = conn.execute(
                    "SELECT COALESCE(MAX(n), 0) + 1 FROM versions WHERE name=?", (name,)
                ).fetchone()[0]
                target = version_dir(root, name, n)
                store.place(stage, target, root)
                try:
                    conn.execute(
                        "INSERT INTO versions (name, n, created_at, created_by, path, sha256, files, source, record,"
                        " base_model, lora, dataset_sha256, chat_template_sha256, stop_tokens, system_prompt, config,"
                        " git_commit, metrics, parent, notes, tags)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            name,
                            n,
                            now_iso(),
                            who,
                            (target / ADAPTER_DIR).relative_to(root).as_posix(),
                            sha,
                            store.dumps(files),
                            str(artifact.resolve()),
                            store.dumps(record),
                            store.dumps(lineage["base_model"]),
                            store.dumps(lineage["lora"]),
                            lineage["dataset_sha256"],
                            lineage["chat_template_sha256"],
                            store.dumps(lineage["stop_tokens"]),
                            lineage["system_prompt"],
                            store.dumps(lineage["config"]),
                            lineage["git_commit"],
                            store.dumps(lineage["metrics"]),
                            parent,
                            notes,
                            store.dumps(list(tags)),
                        ),
                    )
                    add_history(conn, name, "add", parent, vtag(n), notes, who, details={"sha256": sha})
                except BaseException:
                    store.remove_tree(target)
                    raise
        finally:
            store.remove_tree(stage)
    finally:
        conn.close()
    return f"{name}@{vtag(n)}"


def add_history(
    conn: sqlite3.Connection,
    name: str,
    action: str,
    from_v: str | None,
    to_v: str | None,
    reason: str | None,
    actor: str | None,
    evidence: dict | None = None,
    details: dict | None = None,
) -> None:
    conn.execute(
        "INSERT INTO history (name, at, action, from_v, to_v, reason, actor, evidence, details)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        (
            name,
            now_iso(),
            action,
            from_v,
            to_v,
            reason,
            actor or whoami(),
            store.dumps(evidence),
            store.dumps(details),
        ),
    )


def aliases_of(conn: sqlite3.Connection, name: str, n: int) -> list[str]:
    out = []
    route = conn.execute("SELECT stable, canary FROM routes WHERE name=?", (name,)).fetchone()
    if route is not None:
        if route["stable"] == n:
            out.append("stable")
        if route["canary"] == n:
            out.append("canary")
    latest = conn.execute("SELECT MAX(n) FROM versions WHERE name=?", (name,)).fetchone()[0]
    if latest == n:
        out.append("latest")
    return out


def list_versions(root: str | os.PathLike | None = None, name: str | None = None) -> list[dict]:
    """Every version as {"name", "version", "created_at", "aliases"}, by name then number."""
    root = store.registry_root(root)
    if not store.exists(root):
        return []
    if name is not None:
        check_name(name)
    conn = store.connect(root)
    try:
        routes = {r["name"]: r for r in conn.execute("SELECT name, stable, canary FROM routes")}
        latest = dict(conn.execute("SELECT name, MAX(n) FROM versions GROUP BY name").fetchall())
        query = "SELECT name, n, created_at FROM versions"
        rows = conn.execute(
            query + (" WHERE name=?" if name else "") + " ORDER BY name, n", (name,) if name else ()
        )
        out = []
        for r in rows:
            aliases = []
            route = routes.get(r["name"])
            if route is not None and route["stable"] == r["n"]:
                aliases.append("stable")
            if route is not None and route["canary"] == r["n"]:
                aliases.append("canary")
            if latest.get(r["name"]) == r["n"]:
                aliases.append("latest")
            out.append(
                {
                    "name": r["name"],
                    "version": vtag(r["n"]),
                    "created_at": r["created_at"],
                    "aliases": aliases,
                }
            )
        return out
    finally:
        conn.close()


def get_version(conn: sqlite3.Connection, name: str, n: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM versions WHERE name=? AND n=?", (name, n)).fetchone()
    if row is None:
        raise TuneshipError(f"unknown ref {name}@{vtag(n)}")
    return row


def artifacts_of(conn: sqlite3.Connection, root: Path, name: str, n: int) -> dict:
    """The current attachments of a version: evals (one per eval set), merged, gguf per quant."""
    evals: dict[str, dict] = {}
    merged = None
    gguf: dict[str, dict] = {}
    rows = conn.execute("SELECT * FROM artifacts WHERE name=? AND n=? ORDER BY id", (name, n))
    for r in rows:
        item = {
            "data": store.loads(r["data"], {}),
            "path": str(root / r["path"]) if r["path"] else None,
            "sha256": r["sha256"],
            "attached_at": r["created_at"],
            "attached_by": r["created_by"],
        }
        if r["kind"] == "eval":
            evals[r["key"]] = item
        elif r["kind"] == "merged":
            merged = item
        elif r["kind"] == "gguf":
            gguf[r["key"]] = item
    return {"evals": list(evals.values()), "merged": merged, "gguf": gguf}


def describe(conn: sqlite3.Connection, root: Path, name: str, n: int) -> dict:
    """Everything a version records, as one JSON-able dict."""
    r = get_version(conn, name, n)
    return {
        "ref": f"{name}@{vtag(n)}",
        "name": name,
        "version": vtag(n),
        "created_at": r["created_at"],
        "created_by": r["created_by"],
        "aliases": aliases_of(conn, name, n),
        "adapter_path": str(root / r["path"]),
        "sha256": r["sha256"],
        "base_model": store.loads(r["base_model"], {}),
        "lora": store.loads(r["lora"], {}),
        "dataset_sha256": r["dataset_sha256"],
        "chat_template_sha256": r["chat_template_sha256"],
        "stop_tokens": store.loads(r["stop_tokens"]),
        "system_prompt": r["system_prompt"],
        "config": store.loads(r["config"]),
        "git_commit": r["git_commit"],
        "metrics": store.loads(r["metrics"], {}),
        **artifacts_of(conn, root, name, n),
        "parent": r["parent"],
        "notes": r["notes"],
        "tags": store.loads(r["tags"], []),
        "source": r["source"],
    }


def show(ref: str, root: str | os.PathLike | None = None) -> dict:
    parsed = parse_ref(ref)
    root = store.registry_root(root)
    conn = store.connect(root)
    try:
        return describe(conn, root, parsed.name, resolve_n(conn, parsed))
    finally:
        conn.close()


def verify_adapter(root: Path, row: sqlite3.Row) -> Path:
    """The adapter directory of a version row, after checking its files against their recorded hashes."""
    path = root / row["path"]
    problems = store.check_files(path, store.loads(row["files"], {}))
    if problems:
        raise TuneshipError(
            f"{row['name']}@{vtag(row['n'])} failed its integrity check: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; run `tuneship registry verify` and re-register the adapter"
        )
    return path


def resolve_ref(ref: str | Ref, root: str | os.PathLike | None = None) -> Path:
    """The registered adapter directory of NAME@vN|stable|canary|latest, with its files verified."""
    parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
    root = store.registry_root(root)
    conn = store.connect(root)
    try:
        n = resolve_n(conn, parsed)
        return verify_adapter(root, get_version(conn, parsed.name, n)).resolve()
    finally:
        conn.close()


def normalize_ref(ref: str, root: str | os.PathLike | None = None) -> str:
    """NAME@stable -> NAME@vN (what the alias points at now)."""
    parsed = parse_ref(ref)
    conn = store.connect(store.registry_root(root))
    try:
        return f"{parsed.name}@{vtag(resolve_n(conn, parsed))}"
    finally:
        conn.close()
