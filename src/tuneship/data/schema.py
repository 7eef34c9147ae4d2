"""Row shapes and the one normalized schema that `train` and `eval` consume.

Normalized example: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "meta": {...}}`,
ending with the assistant turn that is the target. Accepted input shapes (auto-detected per row, or forced):
- chat: `{"messages": [...]}`
- prompt/completion: `{"prompt": str|messages, "completion": str|messages}`
- alpaca: `{"instruction", "input"?, "output"}`
- input/output: `{"input": str, "output": str|object}`; an object is serialized as compact JSON.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

from tuneship.errors import TuneshipError

FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "input_output")
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that cannot be normalized; the message says why."""


def compact_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def clean_text(s: str) -> str:
    """NFC-normalize and tidy whitespace (keeps newlines, strips trailing spaces)."""
    s = unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    lines = [" ".join(line.split()) for line in s.split("\n")]
    return "\n".join(lines).strip()


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "input" in row and "output" in row:
        return "input_output"
    for present, missing in (
        ("prompt", "completion"),
        ("completion", "prompt"),
        ("instruction", "output"),
        ("input", "output"),
        ("output", "input"),
    ):
        if present in row:
            raise RowError(f"missing field {missing!r} (row has {present!r}; keys: {', '.join(sorted(row))})")
    keys = ", ".join(sorted(row)) or "none"
    raise RowError(
        f"unrecognized row shape (keys: {keys}); expected messages, prompt/completion, instruction/output or input/output"
    )


def _text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(f"missing field {field!r}")
    if not isinstance(value, str):
        raise RowError(f"field {field!r} must be a string, got {type(value).__name__}")
    text = clean_text(value)
    if not text:
        raise RowError(f"field {field!r} is empty")
    return text


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"{field}[{i}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m["content"], f"{field}[{i}].content")})
    return out


def check_roles(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in body:
        raise RowError("a system message may only come first")
    if not body or body[0] != "user":
        raise RowError("the first non-system message must be from the user")
    if body[-1] != "assistant":
        raise RowError("the last message must be the assistant's answer")
    for a, b in zip(body, body[1:], strict=False):
        if a == b:
            raise RowError(f"two {a} messages in a row; roles must alternate user/assistant")


def normalize_row(row: Any, fmt: str = "auto", system: str | None = None) -> dict:
    """Normalize one row to `{"messages": [...], "meta": {...}}`, or raise RowError."""
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    used: set[str]
    if fmt == "chat":
        messages = _messages(row.get("messages"), "messages")
        used = {"messages"}
    elif fmt == "prompt_completion":
        p, c = row.get("prompt"), row.get("completion")
        prompt = (
            _messages(p, "prompt")
            if isinstance(p, list)
            else [{"role": "user", "content": _text(p, "prompt")}]
        )
        if isinstance(c, list):
            completion = _messages(c, "completion")
        else:
            completion = [{"role": "assistant", "content": _text(c, "completion")}]
        messages = prompt + completion
        used = {"prompt", "completion"}
    elif fmt == "alpaca":
        instr = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        user = instr + ("\n\n" + _text(extra, "input") if isinstance(extra, str) and extra.strip() else "")
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _output(row, "output")},
        ]
        used = {"instruction", "input", "output"}
    elif fmt == "input_output":
        if "input" not in row:
            raise RowError("missing field 'input'")
        messages = [
            {"role": "user", "content": _text(row["input"], "input")},
            {"role": "assistant", "content": _output(row, "output")},
        ]
        used = {"input", "output"}
    else:
        raise RowError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": clean_text(system)}] + messages
    check_roles(messages)
    meta = dict(row.get("meta") or {}) if isinstance(row.get("meta"), dict) else {}
    meta.update({k: v for k, v in row.items() if k not in used and k != "meta"})
    return {"messages": messages, "meta": meta}


def _output(row: dict, field: str) -> str:
    if field not in row or row[field] is None:
        raise RowError(f"missing field {field!r}")
    value = row[field]
    if isinstance(value, (dict, list)):
        if not value:
            raise RowError(f"field {field!r} is empty")
        return compact_json(value)
    return _text(value, field)


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a line that is not JSON raises with its number."""
    p = Path(path)
    if not p.exists():
        raise TuneshipError(f"data file {p} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TuneshipError(
                    f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
    if not rows:
        raise TuneshipError(f"data file {p} is empty; it needs one JSON object per line")
    return rows


def read_examples(path: str | Path, fmt: str = "auto", system: str | None = None) -> list[dict]:
    """Read a JSONL file and normalize every row. The first bad row raises with file:line and the reason."""
    out = []
    for n, row in read_jsonl(path):
        try:
            out.append(normalize_row(row, fmt=fmt, system=system))
        except RowError as e:
            raise TuneshipError(f"{path}:{n}: {e}") from None
    return out


def split_prompt(example: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of a normalized example."""
    msgs = example["messages"]
    return msgs[:-1], msgs[-1]["content"]
