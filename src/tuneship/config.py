"""Typed configs: YAML files plus `--set key=value` overrides, validated once, with one help text per field.

Every stage's config is a `StageConfig` (pydantic, unknown keys forbidden). Help text lives in each field's
`description` and is rendered into the command's `--help` by `config_help`, so it is written once.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tuneship.errors import TuneshipError

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(pairs: typing.Iterable[str]) -> dict[str, Any]:
    """Turn `a.b=1`-style pairs into a nested dict. Values are parsed as YAML scalars/lists (`x=[q,v]`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TuneshipError(f"--set {pair!r} is not of the form key=value (for example --set lora.r=8)")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise TuneshipError(f"--set {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TuneshipError(f"--set {key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise TuneshipError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise TuneshipError(f"config file {p} is not valid YAML{where}") from e
    if not isinstance(data, dict):
        raise TuneshipError(f"config file {p} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _allowed(cls: type[BaseModel], loc: tuple) -> str:
    """The allowed values or type of the field at `loc`, for error messages."""
    model: Any = cls
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            break
        field = model.model_fields[part]
        model = field.annotation
    if field is None:
        return ""
    ann = field.annotation
    lits = [a for a in _flatten(ann) if typing.get_origin(a) is typing.Literal]
    if lits:
        vals = [v for lit in lits for v in typing.get_args(lit)]
        return "allowed: " + ", ".join(map(str, vals))
    return ""


def _flatten(ann: Any) -> list:
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [x for a in args for x in _flatten(a)]
    return [ann]


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str = "config") -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if isinstance(p, str))
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        parent = cls
        for part in loc[:-1]:
            parent = (
                parent.model_fields[part].annotation
                if part in getattr(parent, "model_fields", {})
                else parent
            )
        known = ", ".join(getattr(parent, "model_fields", {}).keys())
        return f"{source}: unknown key {key!r}; known keys here: {known}"
    allowed = _allowed(cls, loc)
    more = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    msg = first["msg"]
    return f"{source}: key {key!r}: {msg}" + (f"; {allowed}" if allowed and allowed not in msg else "") + more


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: typing.Iterable[str] = (), **extra: Any
) -> C:
    """Build a config from an optional YAML file, then `--set` overrides, then keyword values."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    data = deep_merge(data, {k: v for k, v in extra.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise TuneshipError(format_validation_error(cls, e, source=str(path) if path else "config")) from None


def config_help(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Lines `key (default): description` for every field, recursing into sections."""
    lines = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(config_help(ann, f"{prefix}{name}."))
            continue
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default if field.default is not None else "none"
        lines.append(f"{prefix}{name} [{default}]: {field.description or ''}")
    return lines
