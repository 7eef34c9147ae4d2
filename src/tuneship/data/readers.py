"""Reading raw rows from JSONL, JSON arrays, CSV/TSV, Parquet and `datasets` datasets.

Every reader yields `RawRow(where, row)`: `where` names the file and the line (text formats) or the row
number (columnar formats), so every bad row can be reported precisely. A line that cannot even be parsed
becomes a `BadRow` instead of stopping the read; only damage that makes the rest of a file unreadable
(a broken JSON array) is a `TuneshipError`.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tuneship.artifacts import sha256_path
from tuneship.errors import TuneshipError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq", ".txt")
# Cells of these CSV columns may hold JSON message lists.
_JSON_CELLS = ("messages", "prompt", "completion")


@dataclass(frozen=True, slots=True)
class Where:
    file: str
    line: int  # 1-based line number (text formats) or row number (columnar formats)
    unit: str = "line"  # "line" | "row"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}:row {self.line}"

    def to_dict(self) -> dict:
        return {"file": self.file, self.unit: self.line}


@dataclass(slots=True)
class RawRow:
    where: Where
    row: Any


@dataclass(slots=True)
class BadRow:
    where: Where
    reason: str

    def to_dict(self) -> dict:
        return {"where": str(self.where), **self.where.to_dict(), "reason": self.reason}


@dataclass
class Source:
    """One input: what it was read as, how many rows it gave, and its content hash."""

    path: str
    kind: str
    rows: int = 0
    sha256: str | None = None


def input_kind(path: str) -> str:
    """jsonl | json | csv | tsv | parquet | datasets_dir | hub, from the path (and its first byte if unsure)."""
    p = Path(path)
    if p.is_dir():
        if (
            (p / "dataset_info.json").exists()
            or (p / "dataset_dict.json").exists()
            or (p / "state.json").exists()
        ):
            return "datasets_dir"
        raise TuneshipError(
            f"input {p} is a directory but not a saved `datasets` dataset (no dataset_info.json or "
            "dataset_dict.json); pass the data files instead"
        )
    if not p.exists():
        if p.suffix.lower() not in DATA_SUFFIXES and _looks_like_hub_id(path):
            return "hub"
        raise TuneshipError(f"input {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in (".parquet", ".pq"):
        return "parquet"
    first = _first_char(p)
    if first == "[":
        return "json"
    if first == "{":
        return "jsonl"  # also a .json file holding one object per line
    if suffix == ".json":
        raise TuneshipError(f"{p} is neither a JSON array nor JSON lines (it starts with {first!r})")
    raise TuneshipError(
        f"cannot tell the format of {p}; use .jsonl, .json (array), .csv, .tsv, .parquet or a datasets directory"
    )


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and "." not in parts[0][:1]


def _first_char(p: Path) -> str:
    with open(p, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not head:
        raise TuneshipError(f"input {p} is empty")
    return head[0]


def read_input(path: str) -> tuple[Source, list[RawRow | BadRow]]:
    """Read one input: its Source and, in input order, the parsed rows and the lines that could not be parsed."""
    kind = input_kind(path)
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json_array,
        "csv": _read_csv,
        "tsv": _read_csv,
        "parquet": _read_parquet,
        "datasets_dir": _read_datasets_dir,
        "hub": _read_hub,
    }
    items = list(readers[kind](path, kind))
    digest = sha256_path(path) if kind != "hub" else None
    return Source(path=str(path), kind=kind, rows=len(items), sha256=digest), items


def _read_jsonl(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield RawRow(Where(path, n), json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8")))
            except UnicodeDecodeError:
                yield BadRow(Where(path, n), "not valid UTF-8")
            except json.JSONDecodeError as e:
                yield BadRow(Where(path, n), f"not valid JSON: {e.msg}, column {e.colno}")
            except ValueError as e:
                yield BadRow(Where(path, n), f"not valid JSON ({e})")


def _read_json_array(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    """Decode a JSON array element by element, so each row keeps the line it starts on."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TuneshipError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i = len(text) - len(text.lstrip(ws))
    line = 1 + text.count("\n", 0, i)
    if i >= len(text) or text[i] != "[":
        raise TuneshipError(f"{path}: expected a JSON array starting with '['")
    pos, i = i, i + 1
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == "]":
            return
        line += text.count("\n", pos, i)
        pos = i
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise TuneshipError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg}); the rest of the array cannot be read"
            ) from None
        yield RawRow(Where(path, line), obj)
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            return
        else:
            lineno = 1 + text.count("\n", 0, i)
            raise TuneshipError(f"{path}:{lineno}: expected ',' or ']' between array elements")


def _read_csv(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            raise TuneshipError(f"input {path} is empty") from None
        except UnicodeDecodeError as e:
            raise TuneshipError(f"{path} is not valid UTF-8 (byte {e.start})") from None
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise TuneshipError(f"{path}:{start}: not valid UTF-8 (byte {e.start})") from None
            except csv.Error as e:
                yield BadRow(Where(path, start), f"not valid CSV ({e})")
                start = reader.line_num + 1
                continue
            where = Where(path, start)
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield BadRow(where, f"has {len(cells)} fields but the header has {len(header)}")
                continue
            row = dict(zip(header, cells, strict=True))
            for key in _JSON_CELLS:
                v = row.get(key)
                if isinstance(v, str) and v.lstrip().startswith("["):
                    try:
                        row[key] = json.loads(v)
                    except ValueError:
                        pass  # stays a string; validation says what is wrong
            yield RawRow(where, row)


def _drop_nulls(row: Any) -> Any:
    """Columnar formats fill absent fields with null; treat those as absent, like JSON lines do."""
    if isinstance(row, dict):
        return {k: v for k, v in row.items() if v is not None}
    return row


def _read_parquet(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise TuneshipError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield RawRow(Where(path, n, "row"), _drop_nulls(row))


def _iter_dataset(ds: Any, label: str) -> Iterator[RawRow]:
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        for split in ds:
            yield from _iter_dataset(ds[split], f"{label}[{split}]")
        return
    for n, row in enumerate(ds, 1):
        yield RawRow(Where(label, n, "row"), _drop_nulls(row))


def _read_datasets_dir(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(path)
    except Exception as e:
        raise TuneshipError(
            f"{path} could not be loaded with datasets.load_from_disk ({type(e).__name__}: {e})"
        ) from None
    yield from _iter_dataset(ds, str(path))


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the Hub's host accepts a TCP connection, else the reason it does not."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def _read_hub(path: str, kind: str) -> Iterator[RawRow | BadRow]:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline:
        why = hub_reachable()
        if why is not None:
            raise TuneshipError(
                f"input {path!r} is not a local file, so it was taken as a Hub dataset id, but the Hugging Face Hub "
                f"cannot be reached ({why}); download it elsewhere and pass the file or a save_to_disk directory"
            )
    from datasets import load_dataset

    try:
        ds = load_dataset(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneshipError(f"could not load Hub dataset {path!r}: {first}") from None
    yield from _iter_dataset(ds, f"hub:{path}")
