"""The dataset hash that `data prepare` records and `train` must record for the same files.

Kept apart from `prepare` so that `train` can import it without the cleaning code's dependencies.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from tuneship.errors import TuneshipError

SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")


def dataset_sha256(paths: Sequence[str | os.PathLike]) -> str:
    """The dataset hash that `data prepare` and `train` both record: sha256 over the given files in order
    (train, valid, test), each fed as its byte length in decimal, a newline, then its bytes. The length
    framing makes moving a row from one split to another change the hash."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise TuneshipError(f"dataset file {p} does not exist")
        h.update(f"{p.stat().st_size}\n".encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def dataset_dir_sha256(directory: str | os.PathLike) -> str:
    """`dataset_sha256` of DIR/train.jsonl, DIR/valid.jsonl and DIR/test.jsonl."""
    return dataset_sha256([Path(directory) / f for f in SPLIT_FILES])
