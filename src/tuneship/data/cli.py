"""`tuneship data ...` commands."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option, overwrite_option


@click.group()
def data() -> None:
    """Generate the demo data set, or prepare (validate, clean, split, audit) your own."""


@data.command("demo")
@click.option(
    "--out", default="data/demo", show_default=True, help="Output directory for train/valid/test JSONL."
)
@click.option(
    "--rows", default=720, show_default=True, help="Number of rows to generate (at least 600 for the demo)."
)
@click.option("--seed", default=0, show_default=True, help="Seed; the same seed gives byte-identical files.")
@overwrite_option
@json_option
def demo(out: str, rows: int, seed: int, overwrite: bool, as_json: bool) -> None:
    """Generate the job-posting -> JSON extraction demo data, split into train, valid and test."""
    from tuneship.data.demo import write_demo_data

    summary = write_demo_data(out, n=rows, seed=seed, overwrite=overwrite)
    emit(summary, as_json, f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))


def _help(field: str) -> str:
    from tuneship.data.prepare import PrepareConfig

    info = PrepareConfig.model_fields[field]
    default = info.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    shown = (
        f" [default: {str(default).lower() if isinstance(default, bool) else default}]"
        if default is not None
        else ""
    )
    return (info.description or "") + shown


@data.command(
    "prepare", short_help="Validate, deduplicate, split and audit your own data into a dataset dir."
)
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    help="Output dataset directory (train/valid/test.jsonl, audit.json, audit.md, lengths.png).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "chat", "prompt_completion", "alpaca", "input_output"]),
    help=_help("format"),
)
@click.option("--system", help=_help("system"))
@click.option("--on-error", type=click.Choice(["fail", "skip"]), help=_help("on_error"))
@click.option("--keep-flagged", is_flag=True, default=None, help=_help("keep_flagged"))
@click.option("--near-dup-threshold", type=float, help=_help("near_dup_threshold"))
@click.option("--shingle", type=click.Choice(["word", "char"]), help=_help("shingle"))
@click.option("--shingle-size", type=int, help=_help("shingle_size"))
@click.option("--num-perm", type=int, help=_help("num_perm"))
@click.option("--splits", help=_help("splits"))
@click.option("--seed", type=int, help=_help("seed"))
@click.option("--group-key", help=_help("group_key"))
@click.option("--model", help=_help("model"))
@click.option("--max-length", type=int, help=_help("max_length"))
@click.option("--length-sample", type=int, help=_help("length_sample"))
@click.option("--pii", is_flag=True, default=None, help=_help("pii"))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML file with these settings (keys as below, underscores).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one setting, e.g. --set near_dup_threshold=0.85.",
)
@overwrite_option
@json_option
def prepare(inputs, out, fmt, config_path, overrides, overwrite, as_json, **values) -> None:
    """Validate, normalize, deduplicate, split and audit INPUT... into --out.

    INPUT is a .jsonl, .json (array), .csv/.tsv or .parquet file, a `datasets` save_to_disk directory, or a
    Hub dataset id. Every bad row is listed with its file and line. Exact duplicates, near-duplicates
    (MinHash/LSH) and contradictions are removed (or flagged with --keep-flagged); splits keep each
    --group-key group and each near-duplicate cluster in one split.
    """
    from tuneship.config import load_config
    from tuneship.data.prepare import PrepareConfig, prepare_data

    cfg = load_config(PrepareConfig, config_path, overrides, format=fmt, **values)
    s = prepare_data(list(inputs), out, cfg, overwrite=overwrite)
    removed = ", ".join(f"{k} {v}" for k, v in s["removed"].items() if v)
    flagged = ", ".join(f"{k} {v}" for k, v in s["flagged"].items() if v)
    human = (
        f"wrote {out}: {s['rows_out']} of {s['rows_in']} rows; "
        + ", ".join(f"{k}={v}" for k, v in s["splits"].items())
        + (f"; removed {removed}" if removed else "")
        + (f"; flagged and kept {flagged}" if cfg.keep_flagged and flagged else "")
        + f"\nsha256 {s['sha256']}\naudit: {out}/audit.md"
    )
    emit(s, as_json, human)
