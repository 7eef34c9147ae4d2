"""Where the router's routes come from: the registry (polled for changes) or a fixed table (tests, benchmarks).

A route maps one public model name to versions with weights, plus which version is stable and which is the
canary. The router reads it through a `RouteSource`:
- `revision()` is cheap and changes whenever the route does, so the router can poll it;
- `load()` returns the current `Route`;
- `rollback(...)` drops the canary to weight 0 and records why (in the registry's history for the registry).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneship.errors import TuneshipError


@dataclass(frozen=True)
class Route:
    name: str
    weights: dict[str, float]
    stable: str | None = None
    canary: str | None = None
    revision: int = 0
    versions: dict[str, dict] = field(default_factory=dict)

    @property
    def fallback(self) -> str | None:
        """The version that takes traffic when another fails: stable, else the heaviest version."""
        if self.stable and self.stable in self.weights:
            return self.stable
        live = [v for v, w in self.weights.items() if w > 0]
        return max(live, key=lambda v: self.weights[v]) if live else None

    @classmethod
    def from_export(cls, data: dict) -> Route:
        """Build from `tuneship.registry.export_route`'s dict."""
        weights = {str(v): float(w) for v, w in (data.get("weights") or {}).items()}
        return cls(
            name=data["name"],
            weights=weights,
            stable=data.get("stable"),
            canary=data.get("canary"),
            revision=int(data.get("revision") or 0),
            versions=dict(data.get("versions") or {}),
        )


class RouteSource(Protocol):
    name: str

    def revision(self) -> int: ...

    def load(self) -> Route: ...

    def rollback(self, version: str, reason: str, evidence: dict) -> None: ...


class RegistryRouteSource:
    """The route of `name` in the registry at `root` (None: the default registry)."""

    def __init__(self, name: str, root: str | None = None, actor: str = "tuneship-router"):
        self.name = name
        self.root = root
        self.actor = actor

    def revision(self) -> int:
        from tuneship import registry

        return int(registry.route_revision(self.name, root=self.root))

    def load(self) -> Route:
        from tuneship import registry

        return Route.from_export(registry.export_route(self.name, root=self.root))

    def rollback(self, version: str, reason: str, evidence: dict) -> None:
        from tuneship import registry

        registry.rollback(
            self.name, reason=reason, evidence=evidence, actor=self.actor, root=self.root, only_canary=True
        )


class StaticRouteSource:
    """A route held in memory. `set_weights` and `rollback` bump the revision like the registry does."""

    def __init__(
        self, name: str, weights: dict[str, float], stable: str | None = None, canary: str | None = None
    ):
        if not weights:
            raise TuneshipError(f"route {name!r} has no versions")
        self.name = name
        self._lock = threading.Lock()
        self._route = Route(name=name, weights=dict(weights), stable=stable, canary=canary, revision=1)
        self.history: list[dict[str, Any]] = []

    def revision(self) -> int:
        return self._route.revision

    def load(self) -> Route:
        return self._route

    def set_weights(self, weights: dict[str, float]) -> None:
        with self._lock:
            r = self._route
            self._route = Route(r.name, dict(weights), r.stable, r.canary, r.revision + 1, r.versions)

    def rollback(self, version: str, reason: str, evidence: dict) -> None:
        with self._lock:
            r = self._route
            weights = dict(r.weights)
            weights[version] = 0.0
            self._route = Route(r.name, weights, r.stable, r.canary, r.revision + 1, r.versions)
            self.history.append(
                {"action": "rollback", "version": version, "reason": reason, "evidence": evidence}
            )
