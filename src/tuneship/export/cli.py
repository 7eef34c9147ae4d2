"""`tuneship export gguf ...` and `tuneship export hub ...`."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option, overwrite_option


@click.group()
def export() -> None:
    """Export a model: to GGUF (+ Ollama Modelfile) or to the Hugging Face Hub."""


@export.command(short_help="HF checkpoint -> f16 + quantized GGUFs (KL-gated) + Ollama Modelfile.")
@click.argument("model_dir")
@click.option("--out", required=True, type=click.Path(), help="Export directory to write.")
@click.option(
    "--quant",
    "quants",
    multiple=True,
    default=("Q4_K_M",),
    show_default=True,
    help="llama.cpp quant type to write after f16 (repeatable): Q4_K_M, Q5_K_M, Q8_0, ...",
)
@click.option(
    "--gate-kl", type=float, help="Max mean KL vs the HF model for every quant (default: per type)."
)
@click.option(
    "--gate-top1",
    type=float,
    help="Min top-1 agreement with the HF model for every quant (default: per type).",
)
@click.option("--system", help="SYSTEM prompt for the Modelfile (default: the one recorded with the model).")
@click.option("--no-modelfile", is_flag=True, help="Write only the GGUF files, no Ollama Modelfile.")
@click.option(
    "--allow-pickle", is_flag=True, help="Convert pickle (.bin) weights; they can run code, trust the source."
)
@overwrite_option
@json_option
def gguf(
    model_dir, out, quants, gate_kl, gate_top1, system, no_modelfile, allow_pickle, overwrite, as_json
) -> None:
    """Convert MODEL_DIR (a merged checkpoint or any HF checkpoint dir, or NAME@vN) to GGUF with llama.cpp's own
    converter: f16 first, then each --quant. Each file's KL and top-1 agreement against the HF model are
    measured and gated (f16: KL <= 1e-3). Writes model-f16.gguf, model-<QUANT>.gguf, Modelfile, tuneship.json."""
    from tuneship.export.gguf import export_gguf

    result = export_gguf(
        model_dir,
        out,
        quants=quants,
        gate_kl=gate_kl,
        gate_top1=gate_top1,
        system=system,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        modelfile=not no_modelfile,
    )
    rows = [
        f"  {name:<22} {info['bytes'] / 1e6:7.1f} MB  KL {info['kl']:.3g}  top-1 {info['top1']:.1%}"
        for name, info in result["files"].items()
    ]
    emit(result, as_json, f"wrote {result['out']}\n" + "\n".join(rows))


@export.command(short_help="Upload an adapter, merged or GGUF dir to the Hub with a model card.")
@click.argument("artifact")
@click.option("--repo-id", required=True, help="Hub repo to create or update, as user/name.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option(
    "--dry-run", is_flag=True, help="Print the files and model card that would be uploaded; upload nothing."
)
@json_option
def hub(artifact, repo_id, private, dry_run, as_json) -> None:
    """Upload ARTIFACT (an adapter, merged or GGUF export dir) to the Hub with a generated model card.
    The token comes from $HF_TOKEN."""
    from tuneship.export.hub import export_hub

    result = export_hub(artifact, repo_id, private=private, dry_run=dry_run)
    head = "would upload" if dry_run else "uploaded"
    rows = [
        f"  {f['path']:<32} {f['bytes']:>12,} B  {f['sha256']}{'  (generated model card)' if f.get('generated') else ''}"
        for f in result["files"]
    ]
    text = (
        f"{head} {result['kind']} {result['artifact']} -> {repo_id}{' (private)' if private else ''}:\n"
        + "\n".join(rows)
    )
    if dry_run:
        text += "\n\n--- README.md ---\n" + result["card"]
    elif result.get("url"):
        text += f"\n{result['url']}"
    emit(result, as_json, text)
