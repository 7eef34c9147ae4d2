"""`tuneship eval`: parse, build the config, call `run_eval`, print."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option, overwrite_option
from tuneship.config import config_help
from tuneship.eval.config import EvalConfig

EPILOG = "\b\nConfig keys (--config FILE.yaml or --set key=value):\n" + "\n".join(
    "  " + line for line in config_help(EvalConfig)
)


@click.command("eval", epilog=EPILOG)
@click.option(
    "--model", help="Candidate: HF id or dir, bundled:NAME, adapter dir, .gguf, http://host:port/v1#name."
)
@click.option("--data", help="Eval data file (JSONL; any row shape that `data prepare` accepts).")
@click.option("--baseline", help="Baseline model spec; adds paired differences with CIs and p-values.")
@click.option("--out", help="Output directory.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with config keys.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable)."
)
@overwrite_option
@json_option
def eval_cmd(
    model: str | None,
    data: str | None,
    baseline: str | None,
    out: str | None,
    config_file: str | None,
    overrides: tuple[str, ...],
    overwrite: bool,
    as_json: bool,
) -> None:
    """Evaluate a model (and a baseline) on the same prompts with greedy decoding: metrics with bootstrap CIs,
    paired differences with p-values, and a side-by-side report."""
    from tuneship.config import load_config
    from tuneship.eval.run import run_eval

    cfg = load_config(
        EvalConfig,
        config_file,
        overrides,
        model=model,
        data=data,
        baseline=baseline,
        out=out,
        overwrite=overwrite or None,
    )
    summary = run_eval(cfg)
    emit(summary, as_json, human(summary, cfg.out))


def human(summary: dict, out: str) -> str:
    has_base = "baseline" in summary
    head = f"{'metric':<24}{'candidate':<28}" + (f"{'baseline':<28}{'difference':<28}p" if has_base else "")
    lines = [f"wrote {out} (n={summary['n']})", head]
    for name, e in summary["metrics"].items():
        line = f"{name:<24}{_cell(e):<28}"
        if has_base:
            d = summary["diff"].get(name, {})
            p = d.get("p_value")
            line += f"{_cell(summary['baseline'].get(name)):<28}{_cell(d):<28}" + (
                "" if p is None else f"{p:.4f}"
            )
        lines.append(line)
    return "\n".join(lines)


def _cell(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    lo, hi = e["ci"]
    return f"{_num(e['value'])} [{_num(lo)}, {_num(hi)}]"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
