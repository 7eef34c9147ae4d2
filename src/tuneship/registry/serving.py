"""What serving reads: the route with each served version's files (`export_route`) and a cheap revision
number to poll (`route_revision`)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.registry import store
from tuneship.registry.ops import public_route, require_name, route_state
from tuneship.registry.refs import vtag
from tuneship.registry.versions import artifacts_of, get_version, verify_adapter


def route_revision(name: str, root: str | os.PathLike | None = None) -> int:
    """A number that changes whenever NAME's route (or a served version's exports) changes. Cheap: one query."""
    conn = store.connect(store.registry_root(root))
    try:
        row = conn.execute("SELECT revision FROM routes WHERE name=?", (name,)).fetchone()
        if row is None:
            require_name(conn, name)
            return 0
        return row[0]
    finally:
        conn.close()


def export_route(name: str, root: str | os.PathLike | None = None) -> dict:
    """The route plus what serving needs per version (paths, base model, LoRA r, exports) and its revision.

    Read in one snapshot; adapters are verified against their recorded hashes."""
    root_p = store.registry_root(root)
    conn = store.connect(root_p)
    try:
        conn.execute("BEGIN")
        try:
            require_name(conn, name)
            r = route_state(conn, name)
            if r["stable"] is None:
                raise TuneshipError(
                    f"{name} has no stable version; promote one with `tuneship registry promote`"
                )
            out = public_route(name, r)
            out["versions"] = {vtag(n): _serving_info(conn, root_p, name, n) for n in _members(r)}
            out["revision"] = r["revision"]
        finally:
            conn.execute("COMMIT")
        return out
    finally:
        conn.close()


def _members(r: dict) -> list[int]:
    return [r["stable"]] + ([r["canary"]] if r["canary"] else [])


def _serving_info(conn: sqlite3.Connection, root: Path, name: str, n: int) -> dict:
    row = get_version(conn, name, n)
    adapter = verify_adapter(root, row).resolve()
    arts = artifacts_of(conn, root, name, n)
    gguf = {}
    for quant, item in arts["gguf"].items():
        path = Path(item["path"])
        if path.is_dir() and item["data"].get("file"):
            path = path / item["data"]["file"]
        gguf[quant] = str(path.resolve())
    lora = store.loads(row["lora"], {})
    return {
        "ref": f"{name}@{vtag(n)}",
        "adapter_path": str(adapter),
        "sha256": row["sha256"],
        "base_model": store.loads(row["base_model"], {}),
        "lora_r": lora.get("r"),
        "chat_template_sha256": row["chat_template_sha256"],
        "stop_tokens": store.loads(row["stop_tokens"]),
        "system_prompt": row["system_prompt"],
        "gguf": gguf,
        "merged_path": str(Path(arts["merged"]["path"]).resolve()) if arts["merged"] else None,
    }
