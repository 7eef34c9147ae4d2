"""`run_eval`: one eval path for a candidate and an optional baseline.

Both models get the same prompt messages (system prompt as the candidate was trained, unless overridden), the
same greedy decoding and the same generation limits. Every metric gets a bootstrap CI; with a baseline, every
metric also gets a paired difference with its CI and a permutation p-value. The output directory holds
eval.json, report.md, samples.jsonl, metrics.png and the tuneship.json record, written atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneship.artifacts import atomic_dir, now_iso, sha256_file, write_record
from tuneship.data.schema import read_examples, split_prompt
from tuneship.errors import TuneshipError
from tuneship.eval.config import EvalConfig
from tuneship.eval.engines import EngineOptions, EngineResult, make_engine, recorded_settings
from tuneship.eval.metrics import check_metric_names, default_metrics, score, speed_scores
from tuneship.eval.stats import intervals, paired
from tuneship.models import resolve
from tuneship.progress import log

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
SAMPLES_JSONL = "samples.jsonl"
PLOT_PNG = "metrics.png"


def _has_reference(row: Any) -> bool:
    if not isinstance(row, dict):
        return True  # not this check's business; read_examples reports it
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return bool(msgs) and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"
    for key in ("completion", "output"):
        if key in row:
            return row[key] not in (None, "", [], {})
    return False


def _rows_without_reference(path: Path) -> tuple[int | None, int, int]:
    """(first line lacking a reference, rows lacking one, rows) for a JSONL file; best effort."""
    first, missing, total = None, 0, 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                total += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not _has_reference(row):
                    missing += 1
                    first = first or n
    except (OSError, UnicodeDecodeError):
        pass
    return first, missing, total


def load_examples(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[dict]:
    """Normalized examples of an eval file; every row must end with a reference answer."""
    p = Path(path)
    if not p.is_file():
        raise TuneshipError(f"eval data file {p} does not exist")
    try:
        examples = read_examples(p, fmt=fmt)
    except TuneshipError:
        first, missing, total = _rows_without_reference(p)
        if first is not None:
            raise TuneshipError(
                f"{p}:{first}: row has no reference answer ({missing} of {total} rows lack one); eval scores "
                "outputs against references, so every row needs a final assistant message, a completion or an output"
            ) from None
        raise
    if not examples:
        raise TuneshipError(f"eval data file {p} has no examples")
    return examples[:limit] if limit else examples


def build_prompts(examples: list[dict], system: str | None, replace_system: bool) -> list[list[dict]]:
    """The prompt messages of each example. `replace_system` drops the rows' own system messages first."""
    prompts = []
    for ex in examples:
        msgs = [dict(m) for m in split_prompt(ex)[0]]
        if replace_system:
            msgs = [m for m in msgs if m["role"] != "system"]
        if system and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": system}, *msgs]
        prompts.append(msgs)
    return prompts


def template_differences(cand: dict, base: dict, system_used: str | None, base_recorded: dict) -> dict:
    """Chat-template settings that differ between candidate and baseline (empty when they agree or are unknown)."""
    diff = {}
    for key in ("chat_template_sha256", "stop_tokens"):
        a, b = cand.get(key), base.get(key)
        if a is None or b is None:
            continue
        if (sorted(a) if key == "stop_tokens" else a) != (sorted(b) if key == "stop_tokens" else b):
            diff[key] = {"candidate": a, "baseline": b}
    recorded = base_recorded.get("system_prompt")
    if recorded is not None and recorded != (system_used or None):
        diff["system_prompt"] = {"used_for_both": system_used, "baseline_recorded": recorded}
    return diff


def _clean(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), rounded floats."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _check_out(cfg: EvalConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise TuneshipError(f"output {out} already exists; choose another --out or pass --overwrite")


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` (and `cfg.baseline`) on `cfg.data`; write `cfg.out`; return the --json summary:
    `{"metrics": {m: {"value", "ci"}}, "baseline": {...}, "diff": {m: {"value", "ci", "p_value"}}, "n": N}`."""
    t_start = time.perf_counter()
    _check_out(cfg)  # before minutes of generation, not after
    examples = load_examples(cfg.data, cfg.format, cfg.limit)
    refs = [split_prompt(e)[1] for e in examples]
    names = check_metric_names(cfg.metrics) if cfg.metrics else default_metrics(refs)
    data_sha = sha256_file(cfg.data)

    cand_spec = resolve(cfg.model, allow_pickle=cfg.allow_pickle, registry_root=cfg.registry_root)
    base_spec = (
        resolve(cfg.baseline, allow_pickle=cfg.allow_pickle, registry_root=cfg.registry_root)
        if cfg.baseline
        else None
    )
    recorded = recorded_settings(cand_spec)
    base_recorded = recorded_settings(base_spec) if base_spec else {}

    if cfg.system_prompt is not None:
        system, source = (cfg.system_prompt or None), "override"
    elif recorded.get("system_prompt"):
        system, source = recorded["system_prompt"], "record"
    else:
        system, source = (
            None,
            "data" if any(e["messages"][0]["role"] == "system" for e in examples) else "none",
        )
    prompts = build_prompts(examples, system, replace_system=cfg.system_prompt is not None)

    template_text = None
    if cfg.chat_template:
        tp = Path(cfg.chat_template)
        if not tp.is_file():
            raise TuneshipError(f"chat_template file {tp} does not exist; give the path of a Jinja template")
        template_text = tp.read_text()

    opts = EngineOptions(
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        timeout_s=cfg.timeout_s,
        device=cfg.device,
        n_ctx=cfg.n_ctx,
        threads=cfg.threads,
        seed=cfg.seed,
        allow_pickle=cfg.allow_pickle,
    )
    cand_engine = make_engine(
        cand_spec,
        replace(opts, chat_template=template_text, stop_tokens=tuple(recorded.get("stop_tokens") or ())),
    )
    base_engine = make_engine(base_spec, opts) if base_spec else None
    cand_engine.check()
    if base_engine is not None:
        base_engine.check()

    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"warning: {msg}")

    def check_candidate(template: dict) -> None:
        want, got = recorded.get("chat_template_sha256"), template.get("chat_template_sha256")
        if template_text is not None or not want or not got or want == got:
            return
        msg = (
            f"{cfg.model} was trained with chat template sha256 {want[:12]}, but the template found now is "
            f"{got[:12]}"
        )
        if cand_spec.kind in ("hf", "adapter"):
            raise TuneshipError(
                msg + "; pass --set chat_template=FILE.jinja to evaluate with another template on purpose"
            )
        warn(msg)

    log(f"candidate {cfg.model} on {len(prompts)} examples from {cfg.data}")
    cand = cand_engine.run(prompts, desc="candidate", after_load=check_candidate)

    mismatch: dict = {}
    base: EngineResult | None = None
    if base_engine is not None:

        def check_baseline(template: dict) -> None:
            mismatch.update(template_differences(cand.template, template, system, base_recorded))
            if mismatch:
                warn(
                    "baseline chat-template settings differ from the candidate's ("
                    + ", ".join(mismatch)
                    + "); the comparison also measures that difference (recorded in eval.json)"
                )

        log(f"baseline {cfg.baseline}")
        base = base_engine.run(prompts, desc="baseline", after_load=check_baseline)

    # Scores and statistics
    preds_c = [g.text for g in cand.outputs]
    scores_c = score(preds_c, refs, names)
    speed_c = speed_scores([g.latency_s for g in cand.outputs], [g.new_tokens for g in cand.outputs])
    stat_kw = {"n_boot": cfg.n_bootstrap, "seed": cfg.seed, "level": cfg.ci_level}
    summary: dict = {"metrics": intervals({**scores_c, **speed_c}, **stat_kw)}
    scores_b: dict = {}
    if base is not None:
        preds_b = [g.text for g in base.outputs]
        scores_b = score(preds_b, refs, names)
        speed_b = speed_scores([g.latency_s for g in base.outputs], [g.new_tokens for g in base.outputs])
        summary["baseline"] = intervals({**scores_b, **speed_b}, **stat_kw)
        summary["diff"] = paired({**scores_c, **speed_c}, {**scores_b, **speed_b}, **stat_kw)
    summary["n"] = len(examples)
    summary = _clean(summary)

    per_c = {k: s.per_example() for k, s in scores_c.items() if "." not in k}
    per_b = {k: s.per_example() for k, s in scores_b.items() if "." not in k}
    samples = []
    for i, ex in enumerate(examples):
        row = {
            "index": i,
            "id": ex.get("meta", {}).get("id"),
            "prompt": prompts[i],
            "reference": refs[i],
            "candidate": _sample(cand, per_c, i),
        }
        if base is not None:
            row["baseline"] = _sample(base, per_b, i)
        samples.append(row)

    result = {
        **summary,
        "data": str(cfg.data),
        "data_sha256": data_sha,
        "model": cand.identity,
        "baseline_model": base.identity if base else None,
        "metric_names": names,
        "settings": {
            "decoding": "greedy",
            "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size,
            "limit": cfg.limit,
            "n_bootstrap": cfg.n_bootstrap,
            "ci_level": cfg.ci_level,
            "p_value": "paired permutation (swap within example), two-sided",
            "seed": cfg.seed,
            "device": cfg.device,
            "threads": cfg.threads,
            "system_prompt": system,
            "system_prompt_source": source,
            "chat_template_override": cfg.chat_template,
        },
        "template": {"candidate": cand.template, "baseline": base.template if base else None},
        "template_mismatch": mismatch or None,
        "footprint": {"candidate": cand.footprint, "baseline": base.footprint if base else None},
        "warnings": warnings,
        "created_at": now_iso(),
        "elapsed_s": None,
    }

    from tuneship.eval.report import plot_metrics, write_report

    out = Path(cfg.out)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        with open(tmp / SAMPLES_JSONL, "w", encoding="utf-8") as f:
            for row in samples:
                f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
        write_report(tmp / REPORT_MD, result, samples, cfg.model, cfg.baseline, cfg.report_examples)
        plot_metrics(tmp / PLOT_PNG, result, cfg.model, cfg.baseline)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        (tmp / EVAL_JSON).write_text(json.dumps(_clean(result), indent=2, ensure_ascii=False) + "\n")
        write_record(
            tmp,
            "eval",
            model=cand.identity,
            baseline_model=base.identity if base else None,
            dataset_sha256=data_sha,
            data_sha256=data_sha,
            system_prompt=system,
            chat_template_sha256=cand.template.get("chat_template_sha256"),
            stop_tokens=cand.template.get("stop_tokens"),
            config=cfg.model_dump(),
            metrics=summary["metrics"],
            n=summary["n"],
            files=[EVAL_JSON, REPORT_MD, SAMPLES_JSONL, PLOT_PNG],
        )
    log(f"wrote {out} ({summary['n']} examples, {result['elapsed_s']} s)")
    _attach_to_registry(cfg, _clean(result))
    return summary


def _sample(res: EngineResult, per_example: dict, i: int) -> dict:
    g = res.outputs[i]
    scores = {k: float(v[i]) for k, v in per_example.items()}
    return {
        "output": g.text,
        "new_tokens": g.new_tokens,
        "latency_s": round(g.latency_s, 4),
        "scores": scores,
    }


def _attach_to_registry(cfg: EvalConfig, result: dict) -> None:
    """Store the result on the registry version the candidate came from (a no-op for other sources)."""
    try:
        from tuneship.registry import attach_result
    except ImportError:
        return
    attach_result(source=cfg.model, kind="eval", data=result, root=cfg.registry_root)
