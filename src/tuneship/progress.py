"""Logging to stderr (stdout is reserved for --json output) and progress bars."""

from __future__ import annotations

import os
import sys
import time


def log(msg: str) -> None:
    if os.environ.get("TUNESHIP_QUIET"):
        return
    print(f"[tuneship {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bar(iterable=None, **kw):
    """A tqdm progress bar on stderr, hidden when TUNESHIP_QUIET is set."""
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("disable", bool(os.environ.get("TUNESHIP_QUIET")))
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
