"""`tuneship registry ...` commands. Imports nothing heavy: every command starts in well under a second."""

from __future__ import annotations

import json

import click

from tuneship import registry as reg
from tuneship.cli import emit, json_option
from tuneship.errors import TuneshipError


def root_option(f):
    return click.option(
        "--root",
        metavar="DIR",
        default=None,
        help="Registry directory (default: $TUNESHIP_REGISTRY, else ./registry).",
    )(f)


def _route_line(r: dict) -> str:
    weights = ", ".join(f"{v}={w}%" for v, w in r["weights"].items()) or "no traffic"
    return f"{r['name']}: stable={r['stable'] or '-'} canary={r['canary'] or '-'} ({weights})"


@click.group()
def registry() -> None:
    """Versioned adapters with lineage, aliases (stable, canary, latest), gated promotion and rollback.

    \b
    Refs: NAME@vN, NAME@stable, NAME@canary, NAME@latest.
    Root: --root DIR, else $TUNESHIP_REGISTRY, else ./registry.
    """


@registry.command("add")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Registered name; the version becomes NAME@vN.")
@click.option("--parent", default=None, help="Parent version ref (default: from the artifact's record).")
@click.option("--notes", default=None, help="Free-form notes stored with the version.")
@click.option("--tag", "tags", multiple=True, help="A free-form tag (repeatable).")
@root_option
@json_option
def add_cmd(artifact, name, parent, notes, tags, root, as_json):
    """Copy an adapter directory into the registry as the next version of NAME."""
    ref = reg.add_version(artifact, name, root=root, parent=parent, notes=notes, tags=tags)
    info = reg.show(ref, root=root)
    out = {
        "ref": ref,
        "name": name,
        "version": info["version"],
        "sha256": info["sha256"],
        "path": info["adapter_path"],
    }
    emit(out, as_json, f"registered {ref} (sha256 {info['sha256'][:12]})")


@registry.command("list")
@click.option("--name", default=None, help="Only this name's versions.")
@root_option
@json_option
def list_cmd(name, root, as_json):
    """List versions: name, version, creation time and aliases."""
    rows = reg.list_versions(root=root, name=name)
    human = "\n".join(
        f"{r['name']}@{r['version']}\t{r['created_at']}\t{','.join(r['aliases'])}" for r in rows
    )
    emit(rows, as_json, human or "no versions registered")


@registry.command("show")
@click.argument("ref")
@root_option
@json_option
def show_cmd(ref, root, as_json):
    """Everything recorded for a version: lineage, metrics, evals, exports."""
    info = reg.show(ref, root=root)
    emit(info, as_json, json.dumps(info, indent=2, default=str))


@registry.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@root_option
@json_option
def diff_cmd(ref_a, ref_b, root, as_json):
    """What changed between two versions: config, data, base, LoRA and metrics."""
    d = reg.diff(ref_a, ref_b, root=root)
    lines = [f"{d['a']} -> {d['b']}"]
    if d["data"]["changed"]:
        lines.append(f"  data: {d['data']['a']} -> {d['data']['b']}")
    for section in ("config", "base_model", "lora", "lineage"):
        for key, ch in d[section].items():
            lines.append(f"  {section}.{key}: {ch['a']!r} -> {ch['b']!r}")
    for kind in ("train", "eval"):
        for key, ch in d["metrics"][kind].items():
            delta = f" ({ch['delta']:+.4g})" if ch["delta"] is not None else ""
            lines.append(f"  {kind}.{key}: {ch['a']} -> {ch['b']}{delta}")
    emit(d, as_json, "\n".join(lines) if len(lines) > 1 else lines[0] + ": no differences")


@registry.command("attach-eval")
@click.argument("ref")
@click.argument("eval_json", type=click.Path(dir_okay=False))
@root_option
@json_option
def attach_eval_cmd(ref, eval_json, root, as_json):
    """Store an eval.json (from `tuneship eval`) on a version, for the promotion gate."""
    out = reg.attach_eval(ref, eval_json, root=root)
    emit(out, as_json, f"attached eval on data {str(out['data_sha256'])[:12]} to {out['ref']}")


@registry.command("promote")
@click.argument("ref")
@click.option(
    "--to", "to", type=click.Choice(["stable", "canary"]), required=True, help="The role to give REF."
)
@click.option(
    "--weight", type=click.IntRange(0, 100), default=None, help="Canary traffic percentage (default 10)."
)
@click.option("--force", is_flag=True, help="Override the promotion gate (needs --reason; recorded).")
@click.option("--reason", default=None, help="Why; stored in the history.")
@click.option("--metric", default=None, help="Gate metric (default $TUNESHIP_GATE_METRIC, else exact_match).")
@click.option(
    "--threshold",
    default=None,
    help="Allowed regression, 0.05 or 5% (default $TUNESHIP_GATE_THRESHOLD, else 5%).",
)
@root_option
@json_option
def promote_cmd(ref, to, weight, force, reason, metric, threshold, root, as_json):
    """Make REF the stable (through the gate) or the canary with --weight percent of traffic."""
    out = reg.promote(
        ref, to=to, weight=weight, root=root, force=force, reason=reason, metric=metric, threshold=threshold
    )
    emit(out, as_json, f"{out['ref']} is now {to}; " + _route_line(out["route"]))


@registry.command("route")
@click.argument("name")
@root_option
@json_option
def route_cmd(name, root, as_json):
    """Which versions serve NAME, with what weights."""
    r = reg.get_route(name, root=root)
    emit(r, as_json, _route_line(r))


@registry.command("set-weights")
@click.argument("name")
@click.argument("weights", nargs=-1, required=True)
@click.option("--reason", default=None, help="Why; stored in the history.")
@root_option
@json_option
def set_weights_cmd(name, weights, reason, root, as_json):
    """Split NAME's traffic: set-weights NAME v3=90 v4=10 (percentages summing to 100)."""
    r = reg.set_weights(name, list(weights), root=root, reason=reason)
    emit(r, as_json, _route_line(r))


@registry.command("rollback")
@click.argument("name")
@click.option("--to", "to", default=None, help="Make this version (vN or NAME@vN) the stable.")
@click.option("--reason", default=None, help="Why; stored in the history.")
@root_option
@json_option
def rollback_cmd(name, to, reason, root, as_json):
    """End a live canary, else move stable back to the previous stable (or --to REF)."""
    out = reg.rollback(name, to=to, reason=reason, root=root)
    emit(
        out,
        as_json,
        f"rolled back {name} ({out['mode']}): {out['from']} -> {out['to']}; " + _route_line(out["route"]),
    )


@registry.command("history")
@click.argument("name")
@click.option("--details", is_flag=True, help="Also show who, evidence and details of each entry.")
@root_option
@json_option
def history_cmd(name, details, root, as_json):
    """NAME's history, oldest first: adds, attachments, promotions, weights, rollbacks."""
    rows = reg.history(name, root=root, details=details)
    human = "\n".join(
        f"{h['at']}  {h['action']:<14} {h['from'] or '-'} -> {h['to'] or '-'}"
        + (f"  ({h['reason']})" if h["reason"] else "")
        for h in rows
    )
    emit(rows, as_json, human)


@registry.command("verify")
@click.option("--name", default=None, help="Only this name's versions.")
@root_option
@json_option
def verify_cmd(name, root, as_json):
    """Re-hash every registered artifact; exits non-zero if any changed."""
    out = reg.verify(root=root, name=name)
    human = "\n".join(f"{p['ref']} {p['artifact']}: {p['problem']}" for p in out["problems"])
    emit(out, as_json, human or f"ok: {out['checked']} artifacts intact")
    if not out["ok"]:
        raise TuneshipError(
            f"verify found {len(out['problems'])} problem(s); first: {out['problems'][0]['problem']}"
        )


@registry.command("export-route")
@click.argument("name")
@click.option(
    "--out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON to this file."
)
@root_option
@json_option
def export_route_cmd(name, out, root, as_json):
    """The route as JSON, with each version's paths and exports, for the router and manifests."""
    from tuneship.artifacts import write_json_atomic

    data = reg.export_route(name, root=root)
    if out:
        write_json_atomic(out, data)
    emit(data, True)


@registry.command("push")
@click.argument("ref")
@click.option("--repo-id", required=True, help="Hub repository, owner/name.")
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded; send nothing.")
@click.option("--private", is_flag=True, default=None, help="Create the repository as private.")
@root_option
@json_option
def push_cmd(ref, repo_id, dry_run, private, root, as_json):
    """Mirror a version to the Hugging Face Hub: adapter files, a model card with its record, tag vN."""
    from tuneship.registry.hub import push

    out = push(ref, repo_id, root=root, dry_run=dry_run, private=private)
    verb = "would upload" if dry_run else "uploaded"
    human = "\n".join(
        [f"{verb} {out['ref']} to {repo_id} with tag {out['tag']}:"]
        + [f"  {f['path_in_repo']} ({f['size']} bytes)" for f in out["files"]]
        + (["", out["model_card"]] if dry_run else [])
    )
    emit(out, as_json, human)
