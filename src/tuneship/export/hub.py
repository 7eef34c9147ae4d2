"""`export hub`: upload an adapter, merged model or GGUF export directory to the Hugging Face Hub, with a
model card generated from the artifact's record (lineage, template, metrics).

The token comes from $HF_TOKEN only and is never printed. `--dry-run` does no network at all: it lists the
exact files (path, size, sha256) and prints the card that would be uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuneship.artifacts import RECORD, read_record, sha256_bytes, sha256_file
from tuneship.errors import TuneshipError

CARD = "README.md"
# Hub ids for model specs that are not Hub ids themselves.
HUB_IDS = {"bundled:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSES = {"bundled:smollm2-135m-instruct": "apache-2.0"}
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
KIND_TAGS = {"adapter": ["lora", "peft"], "merged": ["merged-lora"], "gguf": ["gguf", "llama.cpp", "ollama"]}


def upload_files(artifact: Path) -> list[dict]:
    """The files that go up: everything in the artifact except hidden files and a stale card (we generate it)."""
    files = []
    for p in sorted(artifact.rglob("*")):
        rel = p.relative_to(artifact).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == CARD:
            continue
        files.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return files


def lineage(record: dict, depth: int = 6) -> list[dict]:
    """This record and its ancestors, following parent paths whose records are still on disk."""
    chain = [record]
    while len(chain) < depth:
        parent = chain[-1].get("parent") or {}
        path = parent.get("path")
        if not path or not (Path(path) / RECORD).exists():
            break
        chain.append(read_record(path))
    return chain


def _base_hub_id(record: dict) -> str | None:
    base = record.get("base_model") or {}
    for key in ("spec", "id"):
        value = base.get(key) or ""
        if value in HUB_IDS:
            return HUB_IDS[value]
        if value.count("/") == 1 and not value.startswith((".", "/")):
            return value
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(record: dict, repo_id: str, files: list[dict]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    kind = record.get("kind", "model")
    base = record.get("base_model") or {}
    base_hub = _base_hub_id(record)
    data = ModelCardData(
        base_model=base_hub,
        library_name=LIBRARY.get(kind),
        license=LICENSES.get(base.get("spec") or ""),
        pipeline_tag="text-generation",
        tags=["tuneship", *KIND_TAGS.get(kind, [])],
    )
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    lines.append(
        f"A {kind} artifact made with tuneship {record.get('tuneship_version', '')} from base model "
        f"`{base.get('spec') or base.get('id') or 'unknown'}`"
        + (f" ([{base_hub}](https://huggingface.co/{base_hub}))." if base_hub else ".")
    )
    lines += ["", "## Lineage", "", "| artifact | sha256 | created | git commit |", "|---|---|---|---|"]
    chain = lineage(record)
    for i, rec in enumerate(chain):
        # a record cannot hash its own dir unless its stage wrote it; its child's record names that hash
        sha = (
            rec.get("sha256") or (chain[i - 1].get("parent") or {}).get("sha256") if i else rec.get("sha256")
        )
        sha = sha or ""
        lines.append(
            f"| {rec.get('kind')} | `{sha[:16]}` | {rec.get('created_at', '')} | {rec.get('git_commit') or ''} |"
        )
    lines.append(
        f"| base | `{(base.get('sha256') or '')[:16]}` | {base.get('revision') or ''} | {base.get('id') or ''} |"
    )
    if record.get("dataset_sha256"):
        lines += ["", f"Training data sha256: `{record['dataset_sha256']}`"]
    if record.get("lora"):
        lines += ["", "LoRA: " + ", ".join(f"{k}={v}" for k, v in record["lora"].items())]

    lines += ["", "## Chat format", ""]
    lines.append(f"- chat template sha256: `{record.get('chat_template_sha256')}`")
    lines.append("- stop tokens: " + ", ".join(f"`{t}`" for t in record.get("stop_tokens") or []))
    if record.get("system_prompt"):
        lines.append(f"- system prompt: {record['system_prompt']!r}")

    metrics = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
    if kind == "gguf" and record.get("files"):
        lines += [
            "",
            "## GGUF files",
            "",
            "KL divergence and top-1 agreement vs the HF model in fp32 on held-out prompts.",
            "",
        ]
        lines += ["| file | quant | MB | KL (mean) | top-1 | gate |", "|---|---|---|---|---|---|"]
        for name, info in record["files"].items():
            gate = info.get("gate") or {}
            lines.append(
                f"| {name} | {info.get('quant')} | {info.get('bytes', 0) / 1e6:.0f} | {_fmt(info.get('kl'))} | "
                f"{info.get('top1', 0):.1%} | KL <= {_fmt(gate.get('max_kl'))}, top-1 >= {_fmt(gate.get('min_top1'))} |"
            )
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    eval_metrics = record.get("eval") or {}
    if isinstance(eval_metrics, dict) and eval_metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in eval_metrics.items() if isinstance(v, (int, float, str))]

    lines += ["", "## Usage", "", "```"]
    if kind == "adapter":
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
        ]
    elif kind == "gguf":
        model_file = record.get("model_file") or next(
            (f["path"] for f in files if f["path"].endswith(".gguf")), ""
        )
        lines += [
            f"hf download {repo_id} --local-dir model",
            "cd model && ollama create my-model -f Modelfile",
        ]
        lines += [f"# or: llama-server -m model/{model_file}"]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        ]
    lines += ["```", "", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {f['path']} | {f['bytes']} | `{f['sha256']}` |" for f in files]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def export_hub(artifact: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> dict:
    """Upload an artifact dir (adapter, merged or gguf) with a generated card; with dry_run, only describe it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise TuneshipError(
            f"--repo-id {repo_id!r} is not a valid Hub repo id (write it as user/name): {e}"
        ) from None
    p = Path(artifact)
    if not p.is_dir():
        from tuneship.models import REF_RE

        if REF_RE.match(str(artifact)):
            from tuneship.models import resolve

            spec = resolve(str(artifact))
            p = Path(spec.path)
            p = p if p.is_dir() else p.parent
        else:
            raise TuneshipError(
                f"{artifact} is not a directory; give an adapter, merged or GGUF export directory"
            )
    record = read_record(p)
    if record.get("kind") not in LIBRARY:
        raise TuneshipError(
            f"{p} is a {record.get('kind')!r} artifact; export hub uploads: {', '.join(LIBRARY)}"
        )
    files = upload_files(p)
    card = model_card(record, repo_id, files)
    result = {
        "repo_id": repo_id,
        "private": private,
        "artifact": str(p),
        "kind": record["kind"],
        "files": files
        + [{"path": CARD, "bytes": len(card.encode()), "sha256": sha256_bytes(card), "generated": True}],
        "total_bytes": sum(f["bytes"] for f in files) + len(card.encode()),
        "card": card,
        "dry_run": dry_run,
    }
    if dry_run:
        return result
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise TuneshipError(
            "no Hugging Face token: set HF_TOKEN to a token with write access (or use --dry-run)"
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(p / f["path"])) for f in files]
    ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=f"tuneship: {record['kind']} {str(record.get('sha256') or '')[:12]}".strip(),
        )
    except Exception as e:  # network, auth, quota: one line, never the token
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TuneshipError(f"upload to {repo_id} failed: {first.replace(token, '***')}") from None
    result["url"] = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return result
