"""report.md (side by side, worst disagreements first) and metrics.png (bars with CI whiskers)."""

from __future__ import annotations

import math
from pathlib import Path

from tuneship.eval.metrics import SPEED_METRICS

PRIMARY_ORDER = ("field_accuracy", "token_f1", "exact_match", "json_f1", "json_valid")


def primary_metric(samples: list[dict]) -> str | None:
    """The per-example score used to rank examples: field accuracy for JSON, else token F1, else exact match."""
    if not samples:
        return None
    have = samples[0]["candidate"]["scores"]
    return next((m for m in PRIMARY_ORDER if m in have), None)


def _score(side: dict, metric: str | None) -> float:
    v = side["scores"].get(metric) if metric else None
    return v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0


def rank_samples(samples: list[dict]) -> list[dict]:
    """Worst first. With a baseline: the largest drop of candidate vs baseline first, then differing outputs
    before identical ones, then the lowest candidate score. Without: the lowest candidate score first."""
    metric = primary_metric(samples)

    def key(s: dict) -> tuple:
        c = _score(s["candidate"], metric)
        if "baseline" in s:
            b = _score(s["baseline"], metric)
            same = s["candidate"]["output"] == s["baseline"]["output"]
            return (c - b, same, c, s["index"])
        return (c, s["index"])

    return sorted(samples, key=key)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _cell(entry: dict | None, signed: bool = False) -> str:
    if not entry:
        return ""
    v, ci = entry.get("value"), entry.get("ci") or [None, None]
    sign = "+" if signed and isinstance(v, (int, float)) and v > 0 else ""
    return f"{sign}{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MB"


def write_report(
    path: Path, result: dict, samples: list[dict], model: str, baseline: str | None, n_examples: int
) -> None:
    has_base = baseline is not None
    s = result["settings"]
    lines = ["# Eval report", ""]
    lines.append(f"- candidate: `{model}` ({result['model'].get('kind')})")
    if has_base:
        lines.append(f"- baseline: `{baseline}` ({result['baseline_model'].get('kind')})")
    lines.append(f"- data: `{result['data']}`, {result['n']} examples, sha256 `{result['data_sha256'][:16]}`")
    system = s["system_prompt"]
    lines.append(
        f"- decoding: greedy, at most {s['max_new_tokens']} new tokens; system prompt from {s['system_prompt_source']}"
        + (f': "{system}"' if system else "")
    )
    lines.append(
        f"- intervals: {int(s['ci_level'] * 100)} % percentile bootstrap, {s['n_bootstrap']} resamples, seed {s['seed']}"
    )
    for w in result.get("warnings") or []:
        lines.append(f"- **warning:** {w}")
    lines += ["", "## Metrics", ""]
    if has_base:
        lines += ["| metric | candidate | baseline | difference | p |", "|---|---|---|---|---|"]
    else:
        lines += ["| metric | candidate |", "|---|---|"]
    for name, entry in result["metrics"].items():
        if name in SPEED_METRICS:
            continue
        row = f"| {name} | {_cell(entry)} |"
        if has_base:
            d = result["diff"].get(name, {})
            row += f" {_cell(result['baseline'].get(name))} | {_cell(d, signed=True)} | {_fmt(d.get('p_value'), 4)} |"
        lines.append(row)

    lines += ["", "## Speed and footprint", ""]
    fc, fb = result["footprint"]["candidate"], (result["footprint"].get("baseline") or {})
    lines += ["| | candidate | baseline |", "|---|---|---|"] if has_base else ["| | candidate |", "|---|---|"]
    rows = [
        (
            "latency per example (s)",
            _cell(result["metrics"].get("latency_s")),
            _cell((result.get("baseline") or {}).get("latency_s")),
        ),
        (
            "tokens/s",
            _cell(result["metrics"].get("tokens_per_s")),
            _cell((result.get("baseline") or {}).get("tokens_per_s")),
        ),
        ("weights on disk", _mb(fc.get("file_bytes")), _mb(fb.get("file_bytes"))),
        ("peak RSS (process)", _mb(fc.get("peak_rss_bytes")), _mb(fb.get("peak_rss_bytes"))),
        ("RSS growth while loaded", _mb(fc.get("rss_delta_bytes")), _mb(fb.get("rss_delta_bytes"))),
        ("CUDA peak", _mb(fc.get("cuda_peak_bytes")), _mb(fb.get("cuda_peak_bytes"))),
        ("load time (s)", _fmt(fc.get("load_s"), 1), _fmt(fb.get("load_s"), 1)),
    ]
    for label, c, b in rows:
        lines.append(f"| {label} | {c} | {b} |" if has_base else f"| {label} | {c} |")
    if result.get("template_mismatch"):
        lines += ["", "## Chat-template differences", ""]
        for key, v in result["template_mismatch"].items():
            lines.append(f"- `{key}`: {v}")

    metric = primary_metric(samples)
    ranked = rank_samples(samples)
    lines += ["", "## Examples, worst " + ("disagreements" if has_base else "answers") + " first", ""]
    if has_base and metric:
        better = sum(_score(x["candidate"], metric) > _score(x["baseline"], metric) for x in samples)
        worse = sum(_score(x["candidate"], metric) < _score(x["baseline"], metric) for x in samples)
        same_out = sum(x["candidate"]["output"] == x["baseline"]["output"] for x in samples)
        lines.append(
            f"By {metric}: the candidate is better on {better}, worse on {worse}, tied on {len(samples) - better - worse} "
            f"examples; the outputs are identical on {same_out}."
        )
        lines.append("")
    for rank, x in enumerate(ranked[:n_examples], 1):
        title = f"### {rank}. example {x['index']}" + (f" (`{x['id']}`)" if x.get("id") else "")
        if metric:
            title += f": {metric} candidate {_fmt(_score(x['candidate'], metric), 2)}"
            if has_base:
                title += f", baseline {_fmt(_score(x['baseline'], metric), 2)}"
        user = next((m["content"] for m in reversed(x["prompt"]) if m["role"] == "user"), "")
        lines += [title, "", "Prompt (last user turn):", "", _block(user), ""]
        lines += [
            "Reference:",
            "",
            _block(x["reference"]),
            "",
            "Candidate:",
            "",
            _block(x["candidate"]["output"]),
            "",
        ]
        if has_base:
            lines += ["Baseline:", "", _block(x["baseline"]["output"]), ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def plot_metrics(path: Path, result: dict, model: str, baseline: str | None) -> None:
    """Bars with CI whiskers: quality metrics (0..1) on the left, tokens/s on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("candidate", result["metrics"])]
    if baseline is not None:
        series.append(("baseline", result["baseline"]))
    quality = [m for m in result["metrics"] if m not in SPEED_METRICS]
    fig, (ax, ax2) = plt.subplots(
        1,
        2,
        figsize=(max(7.0, 1.1 * len(quality) + 4), 4.2),
        gridspec_kw={"width_ratios": [max(len(quality), 1), 1.4]},
    )
    width = 0.8 / len(series)
    x = np.arange(len(quality))
    for j, (label, metrics) in enumerate(series):
        vals, lo, hi = _bars(metrics, quality)
        ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(quality, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"value ({int(result['settings']['ci_level'] * 100)} % CI)")
    ax.set_title(f"n = {result['n']}")
    ax.legend(fontsize=8)
    for j, (_, metrics) in enumerate(series):
        vals, lo, hi = _bars(metrics, ["tokens_per_s"])
        ax2.bar([j], vals, 0.6, yerr=[lo, hi], capsize=3, color=f"C{j}")
    ax2.set_xticks(range(len(series)))
    ax2.set_xticklabels([s[0] for s in series], fontsize=8)
    ax2.set_title("tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(metrics: dict, names: list[str]) -> tuple[list[float], list[float], list[float]]:
    vals, lo, hi = [], [], []
    for m in names:
        e = metrics.get(m) or {}
        v = e.get("value")
        ci = e.get("ci") or [None, None]
        v = v if v is not None else 0.0
        vals.append(v)
        lo.append(max(0.0, v - ci[0]) if ci[0] is not None else 0.0)
        hi.append(max(0.0, ci[1] - v) if ci[1] is not None else 0.0)
    return vals, lo, hi
