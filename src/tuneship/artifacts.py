"""Artifacts: directories written atomically, each with a small JSON record.

Contract shared by every stage:
- An artifact is a directory (or a single file for GGUF exports inside an export directory).
- It is written under a hidden temporary name beside its destination and renamed into place only when
  complete (`atomic_dir`). A crash leaves at most a `.NAME.tmp-*` directory, never a half artifact.
- It holds `tuneship.json` (RECORD), written by `write_record`: kind, schema, what it came from, and its
  measured figures. The next stage reads it with `read_record`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneship import __version__
from tuneship.errors import TuneshipError

RECORD = "tuneship.json"
SCHEMA_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def sha256_dir(path: str | os.PathLike, exclude: tuple[str, ...] = (RECORD,)) -> str:
    """Hash a directory's files (relative path + content), in sorted order. The record is excluded by
    default so a record can name the hash of the directory that holds it."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    p = Path(path)
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def whoami() -> str:
    try:
        return os.environ.get("TUNESHIP_USER") or getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return f"uid{os.getuid()}"


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit (with `-dirty` when the tree has changes), or None outside a repo."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without error.

    Refuses an existing `out` unless `overwrite`. On error the temporary directory is removed and `out` is
    left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise TuneshipError(f"output {out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_record(directory: str | os.PathLike, kind: str, **fields: Any) -> dict:
    """Write `tuneship.json` into `directory`.

    Conventional fields (all optional): base_model {spec,id,revision,sha256}, parent {path,sha256,kind},
    dataset_sha256, chat_template_sha256, stop_tokens, system_prompt, config, metrics, lora {r,alpha,target_modules}.
    """
    record = {
        "kind": kind,
        "schema": SCHEMA_VERSION,
        "tuneship_version": __version__,
        "created_at": now_iso(),
        "created_by": whoami(),
        "git_commit": git_commit(),
        **fields,
    }
    write_json_atomic(Path(directory) / RECORD, record)
    return record


def read_record(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Read an artifact's record. `path` is the artifact directory (or a file inside an export directory)."""
    p = Path(path)
    rec_path = p / RECORD if p.is_dir() else p.parent / RECORD
    if not rec_path.exists():
        raise TuneshipError(f"{p} has no {RECORD} record; is it a tuneship artifact?")
    try:
        record = json.loads(rec_path.read_text())
    except json.JSONDecodeError as e:
        raise TuneshipError(f"{rec_path} is not valid JSON ({e}); the artifact is damaged") from e
    if kind is not None and record.get("kind") != kind:
        raise TuneshipError(f"{p} is a {record.get('kind')!r} artifact, expected {kind!r}")
    return record
