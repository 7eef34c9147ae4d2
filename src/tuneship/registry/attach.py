"""Results flowing in: eval, merge and export stages attach what they produced to the version their input
came from, so that serving can find a version's merged model and GGUF files later."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from tuneship.artifacts import RECORD, now_iso, sha256_bytes, sha256_dir, whoami
from tuneship.errors import TuneshipError
from tuneship.registry import store
from tuneship.registry.refs import looks_like_ref, parse_ref, resolve_n, vtag
from tuneship.registry.versions import add_history, version_dir

KINDS = ("eval", "merged", "gguf")
MAX_PARENT_DEPTH = 8


def _version_of_registry_path(conn: sqlite3.Connection, root: Path, p: Path) -> tuple[str, int] | None:
    try:
        rel = p.resolve().relative_to((root / "versions").resolve())
    except ValueError:
        return None
    if len(rel.parts) < 2 or not rel.parts[1].startswith("v") or not rel.parts[1][1:].isdigit():
        return None
    name, n = rel.parts[0], int(rel.parts[1][1:])
    row = conn.execute("SELECT 1 FROM versions WHERE name=? AND n=?", (name, n)).fetchone()
    return (name, n) if row else None


def _by_sha(conn: sqlite3.Connection, sha: str | None) -> tuple[str, int] | None:
    if not sha:
        return None
    rows = conn.execute("SELECT name, n FROM versions WHERE sha256=?", (sha,)).fetchall()
    return (rows[0]["name"], rows[0]["n"]) if len(rows) == 1 else None


def _by_ref(conn: sqlite3.Connection, ref: str) -> tuple[str, int] | None:
    parsed = parse_ref(ref)
    try:
        return parsed.name, resolve_n(conn, parsed)
    except TuneshipError:
        return None


def locate(
    conn: sqlite3.Connection, root: Path, source: str | os.PathLike, depth: int = 0
) -> tuple[str, int] | None:
    """The registered version that `source` (a ref, or a path) came from, or None.

    A path counts when it lies inside a version's directory, when its record names a `registry_ref`, when
    its record's `parent` chain leads to one, or when it is an adapter whose hash matches exactly one version.
    """
    text = str(source)
    if looks_like_ref(text) and not Path(text).exists():
        parsed = parse_ref(text)
        return parsed.name, resolve_n(conn, parsed)
    p = Path(text)
    if not p.exists() or depth > MAX_PARENT_DEPTH:
        return None
    found = _version_of_registry_path(conn, root, p)
    if found:
        return found
    rec_path = p / RECORD if p.is_dir() else p.parent / RECORD
    record: dict = {}
    if rec_path.is_file():
        try:
            record = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            record = {}
    ref = record.get("registry_ref")
    if isinstance(ref, str) and looks_like_ref(ref) and (found := _by_ref(conn, ref)):
        return found
    parent = record.get("parent")
    if isinstance(parent, str):
        parent = {"registry_ref": parent} if looks_like_ref(parent) else {"path": parent}
    if isinstance(parent, dict):
        pref = parent.get("registry_ref")
        if isinstance(pref, str) and looks_like_ref(pref) and (found := _by_ref(conn, pref)):
            return found
        if found := _by_sha(conn, parent.get("sha256")):
            return found
        if parent.get("path") and (found := locate(conn, root, parent["path"], depth + 1)):
            return found
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _by_sha(conn, sha256_dir(p))
    return None


def ref_for_path(source: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
    """NAME@vN that a ref or path belongs to, or None (also None when there is no registry)."""
    root = store.registry_root(root)
    if not store.exists(root):
        return None
    conn = store.connect(root)
    try:
        found = locate(conn, root, source)
    finally:
        conn.close()
    return f"{found[0]}@{vtag(found[1])}" if found else None


def _key(kind: str, data: dict) -> str:
    if kind == "eval":
        if not isinstance(data.get("metrics"), dict):
            raise TuneshipError(
                "eval result has no 'metrics' mapping; attach the eval.json written by `tuneship eval`"
            )
        return str(data.get("data_sha256") or "")
    if kind == "gguf":
        quant = data.get("quant")
        if not quant or not str(quant).replace("_", "").isalnum():
            raise TuneshipError(f"gguf result needs a quant type such as Q4_K_M, got {quant!r}")
        return str(quant)
    return ""


def _gguf_file(payload: Path, quant: str) -> str | None:
    """Which file inside an attached export directory is the GGUF of this quant type."""
    ggufs = sorted(p.relative_to(payload).as_posix() for p in payload.rglob("*.gguf"))
    if len(ggufs) > 1:
        ggufs = [g for g in ggufs if quant.lower() in g.lower()] or ggufs
    return ggufs[0] if ggufs else None


def attach_result(
    source: str | os.PathLike,
    kind: str,
    data: dict,
    artifact: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    actor: str | None = None,
) -> str | None:
    """Attach a stage's result to the version `source` came from; return NAME@vN, or None (doing nothing)
    when `source` is not from the registry.

    kind: "eval" (data = eval.json), "merged" (artifact = merged checkpoint dir) or "gguf" (data has
    "quant"; artifact = .gguf file or export dir). An artifact is copied in, read-only, with its sha256.
    The latest attachment per eval set / quant type is the current one.
    """
    if kind not in KINDS:
        raise TuneshipError(f"unknown result kind {kind!r}; choose one of {', '.join(KINDS)}")
    key = _key(kind, data)
    root = store.registry_root(root)
    if not store.exists(root):
        if looks_like_ref(str(source)) and not Path(str(source)).exists():
            store.connect(root)  # raises the one-line "no registry" error
        return None
    conn = store.connect(root)
    try:
        found = locate(conn, root, source)
        if found is None:
            return None
        name, n = found
        payload_rel = sha = files = None
        is_file = False
        data = dict(data)
        stage = None
        who = actor or whoami()
        try:
            if artifact is not None:
                src = Path(artifact)
                if not src.exists():
                    raise TuneshipError(f"artifact {src} does not exist")
                stage = store.staging_dir(root)
                is_file = src.is_file()
                payload = stage / "payload"
                if is_file:
                    payload.mkdir()
                    sha, files = store.copy_hashed(src, payload / src.name)
                else:
                    sha, files = store.copy_hashed(src, payload)
                    if kind == "gguf" and not data.get("file"):
                        data["file"] = _gguf_file(payload, key)
                # the folder is named by the whole manifest (names and contents, record included), so an
                # identical re-attach reuses it and a different one never overwrites a registered folder
                cid = sha256_bytes(json.dumps(files, sort_keys=True))[:12]
                sub = {"eval": f"eval/{cid}", "merged": f"merged-{cid}", "gguf": f"gguf/{key}-{cid}"}[kind]
                target = version_dir(root, name, n) / sub
                payload_rel = target.relative_to(root).as_posix()
                if is_file:
                    payload_rel += "/" + src.name
            with store.transaction(conn):
                if stage is not None:
                    known = conn.execute("SELECT 1 FROM artifacts WHERE path=?", (payload_rel,)).fetchone()
                    if not known:
                        store.place(stage / "payload", target, root)
                conn.execute(
                    "INSERT INTO artifacts (name, n, kind, key, data, path, sha256, files, is_file, created_at,"
                    " created_by) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        name,
                        n,
                        kind,
                        key,
                        store.dumps(data),
                        payload_rel,
                        sha,
                        store.dumps(files),
                        int(is_file),
                        now_iso(),
                        who,
                    ),
                )
                details = {"key": key or None, "sha256": sha}
                add_history(conn, name, f"attach-{kind}", None, vtag(n), None, who, details=details)
                if kind != "eval":
                    conn.execute("UPDATE routes SET revision = revision + 1 WHERE name=?", (name,))
        finally:
            if stage is not None:
                store.remove_tree(stage)
    finally:
        conn.close()
    return f"{name}@{vtag(n)}"


def attach_eval(ref: str, eval_json: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """`registry attach-eval REF EVAL_JSON`: store an eval.json on a version."""
    path = Path(eval_json)
    if not path.is_file():
        raise TuneshipError(f"eval file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TuneshipError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TuneshipError(f"{path} must hold a JSON object with 'metrics', as written by `tuneship eval`")
    parse_ref(ref)
    attached = attach_result(ref, "eval", data, root=root)
    if attached is None:  # pragma: no cover - a parsed ref always locates or raises
        raise TuneshipError(f"{ref} is not a registered version")
    return {
        "ref": attached,
        "data_sha256": data.get("data_sha256"),
        "metrics": data.get("metrics"),
        "n": data.get("n"),
    }
