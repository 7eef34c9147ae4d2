"""`registry push`: mirror a version to the Hugging Face Hub with its record in the model card and a tag vN.

The plan (files, card, tag) is built from huggingface_hub's own commit operations, so `--dry-run` shows
exactly what a real push would send. Tokens come from huggingface_hub's usual sources and are never printed.
"""

from __future__ import annotations

import json
import os
import re

from tuneship.errors import TuneshipError
from tuneship.registry import gate
from tuneship.registry.versions import resolve_ref, show

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def model_card(info: dict) -> str:
    """The README.md: Hub metadata, then the version's lineage, metrics and full registry record."""
    from huggingface_hub import ModelCardData

    base = info["base_model"] or {}
    base_id = base.get("id") or base.get("spec")
    data = ModelCardData(
        base_model=base_id if isinstance(base_id, str) and HUB_ID_RE.match(base_id) else None,
        library_name="peft",
        tags=["tuneship", "lora", "qlora", info["name"]],
    )
    lora = info["lora"] or {}
    rows = [
        ("registry version", info["ref"]),
        ("created", f"{info['created_at']} by {info['created_by']}"),
        ("parent", info["parent"]),
        (
            "base model",
            f"{base_id} (revision {_fmt(base.get('revision'))}, sha256 {_fmt(base.get('sha256'))})",
        ),
        ("adapter sha256", info["sha256"]),
        (
            "LoRA",
            f"r={_fmt(lora.get('r'))}, alpha={_fmt(lora.get('alpha'))}, targets={_fmt(lora.get('target_modules'))}",
        ),
        ("dataset sha256", info["dataset_sha256"]),
        ("chat template sha256", info["chat_template_sha256"]),
        ("stop tokens", info["stop_tokens"]),
        ("git commit", info["git_commit"]),
    ]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {info['name']} {info['version']}",
        "",
        f"A LoRA adapter registered by tuneship as `{info['ref']}`.",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | `{_fmt(v)}` |" for k, v in rows),
        "",
        "## Training metrics",
        "",
        *(f"- {k}: {_fmt(v)}" for k, v in sorted(info["metrics"].items())),
    ]
    if info["evals"]:
        lines += ["", "## Evaluation", ""]
        for e in info["evals"]:
            d = e["data"]
            lines.append(f"Eval set sha256 `{_fmt(d.get('data_sha256'))}`, n={_fmt(d.get('n'))}:")
            for metric, value in sorted((d.get("metrics") or {}).items()):
                ci = value.get("ci") if isinstance(value, dict) else None
                ci_text = (
                    f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
                )
                lines.append(f"- {metric}: {_fmt(gate.metric_value(d, metric))}{ci_text}")
    if info["gguf"] or info["merged"]:
        lines += ["", "## Exports", ""]
        if info["merged"]:
            lines.append(f"- merged bf16 checkpoint, sha256 `{info['merged']['sha256']}`")
        for quant, g in sorted(info["gguf"].items()):
            figures = ", ".join(f"{k}={_fmt(g['data'].get(k))}" for k in ("kl", "top1") if k in g["data"])
            lines.append(f"- GGUF {quant}, sha256 `{g['sha256']}`" + (f" ({figures})" if figures else ""))
    if info["notes"]:
        lines += ["", "## Notes", "", info["notes"]]
    record = {k: v for k, v in info.items() if k not in ("adapter_path", "source")}
    lines += ["", "## Registry record", "", "```json", json.dumps(record, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def plan_push(ref: str, repo_id: str, root: str | os.PathLike | None = None) -> tuple[dict, list]:
    """What a push of REF would upload: (summary, huggingface_hub CommitOperationAdd list)."""
    from huggingface_hub import CommitOperationAdd

    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id:
        raise TuneshipError(
            f"bad --repo-id {repo_id!r}: write it as owner/name (letters, digits, '.', '_', '-')"
        )
    adapter = resolve_ref(ref, root=root)  # verifies the files' hashes
    info = show(ref, root=root)
    card = model_card(info)
    ops = []
    files = []
    for p in sorted(adapter.rglob("*")):
        if p.is_file():
            rel = p.relative_to(adapter).as_posix()
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)))
            files.append({"path_in_repo": rel, "size": p.stat().st_size, "local_path": str(p)})
    card_bytes = card.encode()
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
    files.append({"path_in_repo": "README.md", "size": len(card_bytes), "local_path": None})
    summary = {
        "repo_id": repo_id,
        "ref": info["ref"],
        "tag": info["version"],
        "commit_message": f"tuneship: {info['ref']} (adapter sha256 {info['sha256'][:12]})",
        "files": files,
        "model_card": card,
    }
    return summary, ops


def push(
    ref: str,
    repo_id: str,
    root: str | os.PathLike | None = None,
    dry_run: bool = False,
    private: bool | None = None,
) -> dict:
    """Upload REF's adapter and model card to `repo_id` in one commit and tag it vN (unless dry_run)."""
    summary, ops = plan_push(ref, repo_id, root=root)
    summary["dry_run"] = dry_run
    if dry_run:
        return summary
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=ops, commit_message=summary["commit_message"])
        api.create_tag(repo_id, tag=summary["tag"], revision=commit.oid, exist_ok=True)
    except Exception as e:  # network, auth, permissions: one line, never the token
        first_line = (str(e).splitlines() or [""])[0]
        raise TuneshipError(
            f"push of {summary['ref']} to {repo_id} failed: {type(e).__name__}: {first_line}"
        ) from e
    _record_push(summary, repo_id, root)
    summary["commit"] = commit.oid
    summary["url"] = str(getattr(commit, "commit_url", "")) or None
    return summary


def _record_push(summary: dict, repo_id: str, root: str | os.PathLike | None) -> None:
    from tuneship.registry import store
    from tuneship.registry.versions import add_history

    name, _, tag = summary["ref"].partition("@")
    conn = store.connect(store.registry_root(root))
    try:
        with store.transaction(conn):
            add_history(conn, name, "push", None, tag, None, None, details={"repo_id": repo_id})
    finally:
        conn.close()
