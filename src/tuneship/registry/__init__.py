"""The adapter registry: versions NAME@vN with their whole lineage, aliases, gated promotion, routes and
one-command rollback, stored in SQLite under a configurable root.

This package imports no torch or transformers, so registry commands start fast and the router can poll it.
"""

from tuneship.registry.attach import attach_eval, attach_result, ref_for_path
from tuneship.registry.ops import get_route, history, promote, rollback, set_weights
from tuneship.registry.refs import check_name, looks_like_ref, parse_ref
from tuneship.registry.report import diff, verify
from tuneship.registry.serving import export_route, route_revision
from tuneship.registry.store import registry_root
from tuneship.registry.versions import add_version, list_versions, normalize_ref, resolve_ref, show

__all__ = [
    "add_version",
    "attach_eval",
    "attach_result",
    "check_name",
    "diff",
    "export_route",
    "get_route",
    "history",
    "list_versions",
    "looks_like_ref",
    "normalize_ref",
    "parse_ref",
    "promote",
    "ref_for_path",
    "registry_root",
    "resolve_ref",
    "rollback",
    "route_revision",
    "set_weights",
    "show",
    "verify",
]
