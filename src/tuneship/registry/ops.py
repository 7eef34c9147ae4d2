"""Routes: which versions serve a name and with what weights; promotion (gated), weights, rollback, history.

Each operation is one `BEGIN IMMEDIATE` transaction that reads the route, changes it, bumps its revision
and appends to the history, so concurrent callers serialize and nothing is lost.
"""

from __future__ import annotations

import os
import sqlite3

from tuneship.artifacts import whoami
from tuneship.errors import TuneshipError
from tuneship.registry import gate, store
from tuneship.registry.refs import check_name, parse_ref, parse_vtag, resolve_n, vtag
from tuneship.registry.versions import add_history, get_version, verify_adapter

ROLES = ("stable", "canary")
DEFAULT_CANARY_WEIGHT = 10


def require_name(conn: sqlite3.Connection, name: str) -> None:
    check_name(name)
    if conn.execute("SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone() is None:
        raise TuneshipError(
            f"unknown name {name!r}: nothing is registered under it; see `tuneship registry list`"
        )


def route_state(conn: sqlite3.Connection, name: str) -> dict:
    """The route's state: stable/canary version numbers, weights {vN: int}, the stack of previous stables."""
    row = conn.execute("SELECT * FROM routes WHERE name=?", (name,)).fetchone()
    if row is None:
        return {"stable": None, "canary": None, "weights": {}, "previous": [], "revision": 0}
    return {
        "stable": row["stable"],
        "canary": row["canary"],
        "weights": store.loads(row["weights"], {}),
        "previous": store.loads(row["previous"], []),
        "revision": row["revision"],
    }


def public_route(name: str, r: dict) -> dict:
    """The route as the `route --json` contract: {"name", "stable", "canary", "weights"}."""
    return {
        "name": name,
        "stable": vtag(r["stable"]) if r["stable"] else None,
        "canary": vtag(r["canary"]) if r["canary"] else None,
        "weights": dict(r["weights"]),
    }


def _save(conn: sqlite3.Connection, name: str, r: dict) -> None:
    conn.execute(
        "INSERT INTO routes (name, stable, canary, weights, previous, revision) VALUES (?,?,?,?,?,1)"
        " ON CONFLICT(name) DO UPDATE SET stable=excluded.stable, canary=excluded.canary,"
        " weights=excluded.weights, previous=excluded.previous, revision=routes.revision + 1",
        (name, r["stable"], r["canary"], store.dumps(r["weights"]), store.dumps(r["previous"])),
    )


def _canary_weight(r: dict) -> int:
    return int(r["weights"].get(vtag(r["canary"]), 0)) if r["canary"] else 0


def _weights(stable: int, canary: int | None, canary_weight: int) -> dict[str, int]:
    if canary is None:
        return {vtag(stable): 100}
    return {vtag(stable): 100 - canary_weight, vtag(canary): canary_weight}


def _evals(conn: sqlite3.Connection, name: str, n: int) -> list[dict]:
    rows = conn.execute(
        "SELECT data FROM artifacts WHERE name=? AND n=? AND kind='eval' ORDER BY id", (name, n)
    )
    return [store.loads(r["data"], {}) for r in rows]


def get_route(name: str, root: str | os.PathLike | None = None) -> dict:
    """{"name", "stable", "canary", "weights"} for NAME (stable None before the first promotion)."""
    conn = store.connect(store.registry_root(root))
    try:
        require_name(conn, name)
        return public_route(name, route_state(conn, name))
    finally:
        conn.close()


def promote(
    ref: str,
    to: str = "stable",
    weight: int | None = None,
    root: str | os.PathLike | None = None,
    force: bool = False,
    reason: str | None = None,
    metric: str | None = None,
    threshold: float | str | None = None,
    actor: str | None = None,
) -> dict:
    """Make REF the stable (through the gate) or the canary (with `weight` percent of traffic)."""
    if to not in ROLES:
        raise TuneshipError(f"cannot promote to {to!r}; choose stable or canary")
    if force and not (reason and reason.strip()):
        raise TuneshipError(
            "--force needs --reason TEXT: say why the promotion gate is overridden (it is recorded)"
        )
    if to == "stable" and weight is not None:
        raise TuneshipError(
            "--weight applies to --to canary; a new stable takes the traffic the canary does not"
        )
    if weight is not None and not 0 <= int(weight) <= 100:
        raise TuneshipError(f"bad --weight {weight}: give a percentage from 0 to 100")
    metric = gate.gate_metric(metric)
    threshold = gate.parse_threshold(threshold)
    parsed = parse_ref(ref)
    name = parsed.name
    who = actor or whoami()
    root_p = store.registry_root(root)
    conn = store.connect(root_p)
    try:
        with store.transaction(conn):
            n = resolve_n(conn, parsed)
            verify_adapter(root_p, get_version(conn, name, n))  # never route traffic to changed files
            r = route_state(conn, name)
            result: dict = {"ref": f"{name}@{vtag(n)}", "to": to, "gate": None}
            if to == "canary":
                if r["stable"] is None:
                    raise TuneshipError(
                        f"{name} has no stable version; promote one with --to stable before a canary"
                    )
                if n == r["stable"]:
                    raise TuneshipError(
                        f"{name}@{vtag(n)} is already the stable; a canary must be another version"
                    )
                w = DEFAULT_CANARY_WEIGHT if weight is None else int(weight)
                old = r["canary"]
                r.update(canary=n, weights=_weights(r["stable"], n, w))
                action, from_v = "canary", vtag(old) if old else None
                details = {"weight": w}
            else:
                if n == r["stable"]:
                    raise TuneshipError(f"{name}@{vtag(n)} is already the stable version")
                stable = r["stable"]
                gate_result = None
                if stable is not None:
                    try:
                        gate_result = gate.check(
                            f"{name}@{vtag(n)}",
                            _evals(conn, name, n),
                            f"{name}@{vtag(stable)}",
                            _evals(conn, name, stable),
                            metric,
                            threshold,
                        )
                    except TuneshipError as e:
                        if not force:
                            raise
                        gate_result = {"error": str(e), "passed": False}
                    if not gate_result["passed"] and not force:
                        raise TuneshipError(
                            f"promotion gate: {name}@{vtag(n)} regresses {metric} from {gate_result['stable']:.4g} to "
                            f"{gate_result['candidate']:.4g} ({-gate_result['relative_change']:.1%} worse, threshold "
                            f"{threshold:.1%}); fix the model or pass --force --reason TEXT"
                        )
                    gate_result["forced"] = bool(force)
                canary = r["canary"] if r["canary"] != n else None
                previous = r["previous"] + ([stable] if stable is not None else [])
                r.update(
                    stable=n, canary=canary, previous=previous, weights=_weights(n, canary, _canary_weight(r))
                )
                action = "force-promote" if force else "promote"
                from_v = vtag(stable) if stable else None
                details = {"gate": gate_result}
                result["gate"] = gate_result
            _save(conn, name, r)
            add_history(conn, name, action, from_v, vtag(n), reason, who, details=details)
        result["route"] = public_route(name, r)
        return result
    finally:
        conn.close()


def parse_weights(pairs: list[str] | dict) -> dict[str, int]:
    """["v3=90", "v4=10"] (or a dict) -> {"v3": 90, "v4": 10}; aliases stable/canary are allowed as keys."""
    items = pairs.items() if isinstance(pairs, dict) else [p.partition("=")[::2] for p in pairs]
    out: dict[str, int] = {}
    for key, value in items:
        key = str(key).strip()
        try:
            w = int(str(value).strip())
        except ValueError:
            raise TuneshipError(
                f"bad weight {key}={value!r}: write vN=PERCENT, for example v3=90 v4=10"
            ) from None
        if not key or not 0 <= w <= 100:
            raise TuneshipError(f"bad weight {key}={value}: write vN=PERCENT with a percentage from 0 to 100")
        out[key] = w
    if not out:
        raise TuneshipError("no weights given: write vN=PERCENT pairs, for example v3=90 v4=10")
    return out


def set_weights(
    name: str,
    weights: list[str] | dict,
    root: str | os.PathLike | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> dict:
    """Split NAME's traffic between its stable and canary, in percentages that sum to 100."""
    wanted = parse_weights(weights)
    conn = store.connect(store.registry_root(root))
    try:
        with store.transaction(conn):
            require_name(conn, name)
            r = route_state(conn, name)
            if r["stable"] is None:
                raise TuneshipError(f"{name} has no route yet; promote a version with --to stable first")
            members = {r["stable"]} | ({r["canary"]} if r["canary"] else set())
            new: dict[str, int] = {}
            for key, w in wanted.items():
                n = r.get(key) if key in ROLES else parse_vtag(key.split("@")[-1], name)
                if n is None or n not in members:
                    serving = ", ".join(vtag(m) for m in sorted(members))
                    raise TuneshipError(
                        f"{name}: {key} is not on the route (serving: {serving}); promote it with --to canary first"
                    )
                new[vtag(n)] = w
            if sum(new.values()) != 100:
                raise TuneshipError(f"weights for {name} sum to {sum(new.values())}, not 100: {wanted}")
            for m in members:
                new.setdefault(vtag(m), 0)
            old = r["weights"]
            r["weights"] = {vtag(m): new[vtag(m)] for m in sorted(members, key=lambda m: m != r["stable"])}
            _save(conn, name, r)
            fmt = ",".join
            add_history(
                conn,
                name,
                "set-weights",
                fmt(f"{k}={v}" for k, v in old.items()),
                fmt(f"{k}={v}" for k, v in r["weights"].items()),
                reason,
                actor,
            )
        return public_route(name, r)
    finally:
        conn.close()


def rollback(
    name: str,
    to: str | None = None,
    reason: str | None = None,
    evidence: dict | None = None,
    actor: str | None = None,
    root: str | os.PathLike | None = None,
    only_canary: bool = False,
    canary_version: str | None = None,
) -> dict:
    """One transaction, recorded in history:
    - a canary carrying traffic is taken off the route (stable keeps 100%);
    - otherwise stable moves back to the previous stable;
    - with `to`, that version becomes the stable and any canary leaves the route.
    `only_canary` (for automated watchers) refuses anything but ending a canary, so a repeated alarm can
    never walk the stable back; `canary_version` (vN) further refuses to end any canary but that one, so an
    alarm about an old canary cannot end a newer experiment."""
    check_name(name)
    root_p = store.registry_root(root)
    conn = store.connect(root_p)
    try:
        with store.transaction(conn):
            require_name(conn, name)
            r = route_state(conn, name)
            if r["stable"] is None:
                raise TuneshipError(f"nothing to roll back: {name} has no stable version")
            stable, canary = r["stable"], r["canary"]
            live_canary = canary is not None and _canary_weight(r) > 0
            if to is not None:
                target = parse_ref(to if "@" in to else f"{name}@{to}")
                if target.name != name:
                    raise TuneshipError(f"cannot roll {name} back to {to}: it is a version of {target.name}")
                n = resolve_n(conn, target)
                verify_adapter(root_p, get_version(conn, name, n))
                if n == stable and not live_canary:
                    raise TuneshipError(
                        f"nothing to roll back: {name}@{vtag(n)} is already the stable and no canary carries traffic"
                    )
                mode, from_v = "to", vtag(stable)
                previous = r["previous"] + ([stable] if n != stable else [])
                r.update(stable=n, canary=None, previous=previous, weights=_weights(n, None, 0))
            elif live_canary and canary_version and canary_version.split("@")[-1] != vtag(canary):
                raise TuneshipError(
                    f"nothing to roll back: the canary of {name} is now {vtag(canary)}, not {canary_version}"
                )
            elif live_canary:
                mode, from_v, n = "canary", vtag(canary), stable
                r.update(canary=None, weights=_weights(stable, None, 0))
            elif only_canary:
                raise TuneshipError(f"nothing to roll back: {name} has no canary carrying traffic")
            else:
                previous = list(r["previous"])
                while previous and previous[-1] == stable:
                    previous.pop()
                if not previous:
                    raise TuneshipError(
                        f"nothing to roll back: {name}@{vtag(stable)} is the stable, no canary carries traffic "
                        "and there is no previous stable"
                    )
                n = previous.pop()
                verify_adapter(root_p, get_version(conn, name, n))
                mode, from_v = "previous-stable", vtag(stable)
                r.update(stable=n, canary=None, previous=previous, weights=_weights(n, None, 0))
            _save(conn, name, r)
            details = {"mode": mode, "ended_canary": vtag(canary) if canary else None}
            add_history(
                conn, name, "rollback", from_v, vtag(n), reason, actor, evidence=evidence, details=details
            )
        return {"name": name, "mode": mode, "from": from_v, "to": vtag(n), "route": public_route(name, r)}
    finally:
        conn.close()


def history(name: str, root: str | os.PathLike | None = None, details: bool = False) -> list[dict]:
    """NAME's history, oldest first: {"at", "action", "from", "to", "reason"} (+ "by", "evidence", "details")."""
    check_name(name)
    conn = store.connect(store.registry_root(root))
    try:
        rows = conn.execute("SELECT * FROM history WHERE name=? ORDER BY id", (name,)).fetchall()
        if not rows:
            require_name(conn, name)
        out = []
        for h in rows:
            item = {
                "at": h["at"],
                "action": h["action"],
                "from": h["from_v"],
                "to": h["to_v"],
                "reason": h["reason"],
            }
            if details:
                item.update(
                    by=h["actor"], evidence=store.loads(h["evidence"]), details=store.loads(h["details"])
                )
            out.append(item)
        return out
    finally:
        conn.close()
