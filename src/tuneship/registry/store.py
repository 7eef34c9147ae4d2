"""The registry's storage: one SQLite database plus immutable version directories.

Layout under the root:
    registry.db                        SQLite (WAL): versions, artifacts, routes, history
    versions/NAME/vN/adapter/          the registered adapter, files read-only
    versions/NAME/vN/merged-SHA12/     attached merged checkpoint
    versions/NAME/vN/gguf/QUANT-SHA12/ attached GGUF export
    .staging/HOST-PID-RAND/            copies in progress (invisible; stale ones are swept)

Visibility is decided by the database alone. Files are copied into `.staging` outside any lock, then
renamed into place and recorded inside one `BEGIN IMMEDIATE` transaction, so a process killed at any
moment leaves either a whole version or nothing that `list`/`show`/refs can see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tuneship.artifacts import RECORD
from tuneship.errors import TuneshipError

DB_NAME = "registry.db"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
STALE_STAGING_S = 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    n INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    files TEXT NOT NULL,
    source TEXT,
    record TEXT NOT NULL,
    base_model TEXT,
    lora TEXT,
    dataset_sha256 TEXT,
    chat_template_sha256 TEXT,
    stop_tokens TEXT,
    system_prompt TEXT,
    config TEXT,
    git_commit TEXT,
    metrics TEXT,
    parent TEXT,
    notes TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (name, n)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    n INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL DEFAULT '',
    data TEXT NOT NULL,
    path TEXT,
    sha256 TEXT,
    files TEXT,
    is_file INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    FOREIGN KEY (name, n) REFERENCES versions (name, n)
);
CREATE INDEX IF NOT EXISTS artifacts_version ON artifacts (name, n, kind, key);
CREATE TABLE IF NOT EXISTS routes (
    name TEXT PRIMARY KEY,
    stable INTEGER,
    canary INTEGER,
    weights TEXT NOT NULL DEFAULT '{}',
    previous TEXT NOT NULL DEFAULT '[]',
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    from_v TEXT,
    to_v TEXT,
    reason TEXT,
    actor TEXT NOT NULL,
    evidence TEXT,
    details TEXT
);
CREATE INDEX IF NOT EXISTS history_name ON history (name, id);
"""


def registry_root(root: str | os.PathLike | None = None) -> Path:
    """`--root DIR`, else $TUNESHIP_REGISTRY, else ./registry."""
    if root:
        return Path(root)
    env = os.environ.get("TUNESHIP_REGISTRY")
    return Path(env) if env else Path("registry")


def db_path(root: Path) -> Path:
    return root / DB_NAME


def exists(root: Path) -> bool:
    return db_path(root).is_file()


def connect(root: str | os.PathLike | None = None, create: bool = False) -> sqlite3.Connection:
    """Open the registry database (autocommit mode; write with `transaction`).

    With `create`, a missing registry is created; otherwise a missing one is a one-line error.
    """
    root = registry_root(root)
    path = db_path(root)
    if not path.is_file():
        if not create:
            raise TuneshipError(
                f"no registry at {root} (no {DB_NAME}); pass --root DIR or set TUNESHIP_REGISTRY, "
                "or register a version with `tuneship registry add`"
            )
        root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        _init_schema(conn)
    return conn


def _init_schema(conn: sqlite3.Connection) -> None:
    # journal_mode needs a moment without other writers; retry while a sibling process initializes.
    for attempt in range(200):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            time.sleep(0.05 * (1 + attempt % 5))
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise TuneshipError(
                f"registry schema {version} is newer than this tuneship understands ({SCHEMA_VERSION}); upgrade tuneship"
            )
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so read-then-write sequences
    (next version number, route updates) cannot interleave with another process."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


# ---------------------------------------------------------------- files


def _digest_dir(files: dict[str, str]) -> str:
    """The same digest as `artifacts.sha256_dir` (record excluded), from a {relpath: sha256} manifest."""
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: PurePosixPath(r).parts):
        if PurePosixPath(rel).name == RECORD:
            continue
        h.update(rel.encode() + b"\0")
        h.update(files[rel].encode() + b"\n")
    return h.hexdigest()


def _copy_file_hashed(src: Path, dst: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(chunk):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return h.hexdigest()


def copy_hashed(src: Path, dst: Path) -> tuple[str, dict[str, str]]:
    """Copy a file or a directory tree to `dst`, hashing while copying. Files become read-only.

    Returns (sha256, manifest): for a directory the sha256 is `artifacts.sha256_dir`'s digest and the
    manifest maps every relative path (the record included) to its file hash; for a file both describe it.
    """
    if src.is_file():
        digest = _copy_file_hashed(src, dst)
        return digest, {dst.name: digest}
    if not src.is_dir():
        raise TuneshipError(f"{src} does not exist")
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        (dst / rel_dir).mkdir(parents=True, exist_ok=True)
        for d in dirnames:
            if (here / d).is_symlink():
                raise TuneshipError(
                    f"{here / d} is a symlinked directory; copy the real files into the artifact"
                )
        for f in sorted(filenames):
            p = here / f
            if not p.is_file():
                raise TuneshipError(f"{p} is not a regular file; an artifact may hold only files")
            rel = (rel_dir / f).as_posix()
            files[rel] = _copy_file_hashed(p, dst / rel_dir / f)
    return _digest_dir(files), files


def check_files(path: Path, files: dict[str, str], is_file: bool = False) -> list[str]:
    """Re-hash `path` against its manifest. Returns problems, one line each (empty when intact)."""
    from tuneship.artifacts import sha256_file

    if is_file:
        if not path.is_file():
            return [f"{path} is missing"]
        (expected,) = files.values()
        return (
            [] if sha256_file(path) == expected else [f"{path} changed after registration (sha256 differs)"]
        )
    if not path.is_dir():
        return [f"{path} is missing"]
    problems = []
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    for rel, expected in sorted(files.items()):
        p = path / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif sha256_file(p) != expected:
            problems.append(f"{p} changed after registration (sha256 differs)")
    for rel in sorted(on_disk - set(files)):
        problems.append(f"{path / rel} was added after registration")
    return problems


def staging_dir(root: Path) -> Path:
    """A fresh private directory under root/.staging for a copy in progress."""
    base = root / ".staging"
    base.mkdir(parents=True, exist_ok=True)
    sweep_staging(root)
    d = base / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(root: Path) -> list[Path]:
    """Remove copies left by processes that died (same host, pid gone) or that are older than a day."""
    removed = []
    base = root / ".staging"
    if not base.is_dir():
        return removed
    host = socket.gethostname()
    for d in base.iterdir():
        parts = d.name.rsplit("-", 2)
        h = parts[0]
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
        dead_here = h == host and pid > 0 and not _pid_alive(pid)
        try:
            old = time.time() - d.stat().st_mtime > STALE_STAGING_S
        except FileNotFoundError:
            continue
        if dead_here or old:
            remove_tree(d)
            removed.append(d)
    return removed


def remove_tree(path: Path) -> None:
    """Remove a tree whose files were made read-only."""

    def onerror(func, p, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)

    if path.is_dir():
        shutil.rmtree(path, onerror=onerror)
    elif path.exists():
        path.unlink()


def place(staged: Path, target: Path, root: Path) -> None:
    """Rename a staged copy into its final place. Call inside the write transaction: anything already at
    `target` that the database does not know is debris from a killed process, and is swept aside first."""
    if target.exists():
        debris = root / ".staging" / f"{socket.gethostname()}-{os.getpid()}-debris{uuid.uuid4().hex[:8]}"
        os.replace(target, debris)
        remove_tree(debris)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
