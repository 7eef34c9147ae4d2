"""Names and refs: `NAME@vN`, `NAME@stable`, `NAME@canary`, `NAME@latest`."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from tuneship.errors import TuneshipError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIASES = ("stable", "canary", "latest")
TAG_RE = re.compile(r"^(v(?P<n>[1-9]\d*)|stable|canary|latest)$")


def check_name(name: str) -> str:
    """A name is 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit:
    no spaces, no slashes, no '..', so it is safe as a directory name."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise TuneshipError(
            f"bad name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(no spaces, slashes or '..')"
        )
    return name


def vtag(n: int) -> str:
    return f"v{n}"


def parse_vtag(text: str, name: str) -> int:
    m = re.fullmatch(r"v([1-9]\d*)", text.strip())
    if not m:
        raise TuneshipError(f"bad version {text!r} for {name}: write it as v1, v2, ...")
    return int(m.group(1))


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str  # vN | stable | canary | latest

    def __str__(self) -> str:
        return f"{self.name}@{self.tag}"


def parse_ref(ref: str) -> Ref:
    """Parse NAME@vN|stable|canary|latest. A bad name or tag is a one-line error."""
    text = str(ref).strip()
    name, at, tag = text.partition("@")
    if not at:
        raise TuneshipError(f"bad ref {text!r}: write NAME@vN, NAME@stable, NAME@canary or NAME@latest")
    check_name(name)
    if not TAG_RE.match(tag):
        raise TuneshipError(f"bad ref {text!r}: the part after '@' must be vN, stable, canary or latest")
    return Ref(name, tag)


def looks_like_ref(text: str) -> bool:
    name, at, tag = str(text).partition("@")
    return bool(at and NAME_RE.match(name) and TAG_RE.match(tag))


def resolve_n(conn: sqlite3.Connection, ref: Ref) -> int:
    """The version number a ref points at now, or a one-line error saying what exists."""
    versions = [r[0] for r in conn.execute("SELECT n FROM versions WHERE name=? ORDER BY n", (ref.name,))]
    if not versions:
        raise TuneshipError(
            f"unknown ref {ref}: no versions named {ref.name!r}; see `tuneship registry list`"
        )
    have = f"{ref.name} has v{versions[0]}..v{versions[-1]}" if len(versions) > 1 else f"{ref.name} has v1"
    if ref.tag == "latest":
        return versions[-1]
    if ref.tag in ("stable", "canary"):
        row = conn.execute(f"SELECT {ref.tag} FROM routes WHERE name=?", (ref.name,)).fetchone()
        if row is None or row[0] is None:
            raise TuneshipError(
                f"unknown ref {ref}: {ref.name} has no {ref.tag} version; promote one with "
                f"`tuneship registry promote {ref.name}@vN --to {ref.tag}`"
            )
        return row[0]
    n = int(ref.tag[1:])
    if n not in versions:
        raise TuneshipError(f"unknown ref {ref}: {have}")
    return n
