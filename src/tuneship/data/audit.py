"""The audit: token lengths, JSON answer fields, the length histogram and the readable `audit.md`."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tuneship.errors import TuneshipError

MD_LIST_LIMIT = 50  # rows listed per section in audit.md (audit.json lists every bad row)


@lru_cache(maxsize=4)
def _tokenizer_for(spec: str):
    """(tokenizer, identity) for a model spec; an adapter measures with its base model's tokenizer."""
    from tuneship.models import chat_template_info, load_tokenizer, resolve

    m = resolve(spec)
    if m.kind == "adapter" and m.base is not None:
        m = m.base
    if m.kind == "endpoint":
        raise TuneshipError(
            f"--model {spec!r} is an endpoint; token lengths need a local tokenizer (HF dir, bundled, adapter)"
        )
    try:
        if m.kind == "gguf":
            from transformers import AutoTokenizer

            p = Path(m.path)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        else:
            tok = load_tokenizer(m.path)
    except TuneshipError:
        raise
    except Exception as e:
        raise TuneshipError(
            f"could not load the tokenizer of {spec!r} ({type(e).__name__}: {e}); pass --model none to skip token lengths"
        ) from None
    if not tok.chat_template:
        raise TuneshipError(
            f"the tokenizer of {spec!r} has no chat template; pick a chat model or pass --model none"
        )
    info = {"spec": spec, "id": (m.identity or {}).get("id", m.path), **chat_template_info(tok)}
    return tok, info


LONGEST = 500  # with sampling, the rows longest in characters that are always measured too


def token_lengths(
    examples: list[dict], model: str, sample: int, seed: int, max_length: int, batch: int = 2048
) -> dict:
    """Token counts of the full conversations as the model's chat template renders them.

    Every row is measured when `sample` is 0 or the data has at most `sample` rows. Otherwise a seeded random
    sample gives p50/p95/mean and the histogram, and max/over-max come from every row long enough to matter:
    the LONGEST rows by characters, plus every row with at least 80 % of the characters that `max_length`
    tokens took at the densest chars-per-token ratio seen in the sample.
    """
    tok, info = _tokenizer_for(model)
    n = len(examples)

    def measure(idx: list[int]) -> np.ndarray:
        out = np.empty(len(idx), dtype=np.int64)
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            try:
                texts = tok.apply_chat_template([examples[i]["messages"] for i in part], tokenize=False)
            except Exception as e:  # jinja raises for roles a template refuses (e.g. no system role)
                raise TuneshipError(
                    f"the chat template of {model!r} rejected a row ({type(e).__name__}: {e}); "
                    "check --system and the roles, pick another --model, or pass --model none"
                ) from None
            enc = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            out[s : s + len(part)] = [len(e) for e in enc]
        return out

    if sample <= 0 or n <= sample:
        lengths = measure(list(range(n)))
        return {
            "model": info,
            "sampled": False,
            "sample_lengths": lengths,
            "rows": list(range(n)),
            "lengths": lengths,
        }
    picked = sorted(random.Random(seed).sample(range(n), sample))
    sample_lengths = measure(picked)
    chars = np.array([sum(len(m["content"]) for m in ex["messages"]) for ex in examples])
    densest = float((chars[picked] / np.maximum(sample_lengths, 1)).min())
    cutoff = 0.8 * max_length * densest
    in_sample = set(picked)
    long_rows = set(np.argsort(-chars, kind="stable")[:LONGEST].tolist()) | set(
        np.nonzero(chars >= cutoff)[0].tolist()
    )
    extra = sorted(long_rows - in_sample)
    extra_lengths = measure(extra)
    return {
        "model": info,
        "sampled": True,
        "sample_lengths": sample_lengths,
        "rows": picked + extra,
        "lengths": np.concatenate([sample_lengths, extra_lengths]),
        "extra": len(extra),
        "cutoff_chars": round(cutoff),
    }


def length_stats(tl: dict, max_length: int, n_total: int) -> dict:
    sample, lengths = tl["sample_lengths"], tl["lengths"]
    if len(sample) == 0:
        return {"measured": 0}
    stats = {
        "measured": int(len(sample)),
        "of": n_total,
        "sampled": tl["sampled"],
        "p50": int(np.percentile(sample, 50, method="lower")),
        "p95": int(np.percentile(sample, 95, method="lower")),
        "max": int(lengths.max()),
        "mean": round(float(sample.mean()), 1),
        "total_tokens": int(lengths.sum()) if not tl["sampled"] else int(round(sample.mean() * n_total)),
        "max_length": max_length,
        "over_max_length": int((lengths > max_length).sum()),
    }
    if tl["sampled"]:
        stats["also_measured"] = tl["extra"]
        stats["note"] = (
            f"p50, p95, mean, total_tokens and the histogram come from a seeded sample of {len(sample)} of {n_total} "
            f"rows; max and over_max_length also measured the {tl['extra']} other rows that could come near "
            f"max_length (the {LONGEST} longest in characters and all with at least {tl['cutoff_chars']} characters); "
            "pass --length-sample 0 to measure every row"
        )
    return stats


def histogram_png(lengths: np.ndarray, max_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths.tolist())))), color="#4878a8")
    for q, style in ((50, ":"), (95, "-.")):
        v = float(np.percentile(lengths, q))
        ax.axvline(v, color="#333333", linestyle=style, label=f"p{q} {v:.0f}")
    if max_length <= lengths.max() * 1.5:
        ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    else:
        ax.plot([], [], " ", label=f"max_length {max_length} (off the scale)")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def json_field_stats(answers: list[str]) -> dict | None:
    """Per-field presence and distinct-value counts over answers that are JSON objects (None if there are none)."""
    present: dict[str, int] = {}
    distinct: dict[str, set] = {}
    n_obj = 0
    for a in answers:
        s = a.strip()
        if not s.startswith("{"):
            continue
        try:
            obj = json.loads(s)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        n_obj += 1
        for k, v in obj.items():
            present[k] = present.get(k, 0) + 1
            distinct.setdefault(k, set()).add(json.dumps(v, sort_keys=True, ensure_ascii=False))
    if not n_obj:
        return None
    fields = {
        k: {"present": present[k], "presence": round(present[k] / n_obj, 4), "distinct": len(distinct[k])}
        for k in sorted(present, key=lambda k: (-present[k], k))
    }
    return {
        "answers": len(answers),
        "json_objects": n_obj,
        "not_json_objects": len(answers) - n_obj,
        "fields": fields,
    }


def _short(s: Any, n: int = 120) -> str:
    s = s if isinstance(s, str) else json.dumps(s, ensure_ascii=False)
    s = " ".join(s.split())
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("|", "\\|")


def render_markdown(audit: dict) -> str:
    """A readable report of the audit dict (audit.json holds everything; this shows the essentials)."""
    s = audit["summary"]
    out = ["# Data audit", ""]
    inputs = ", ".join(f"`{i['path']}` ({i['kind']}, {i['rows']} rows)" for i in audit["inputs"])
    out.append(f"Inputs: {inputs}")
    out.append("")
    out.append(f"**{s['rows_in']} rows in, {s['rows_out']} rows out.** Dataset sha256 `{s['sha256']}`.")
    out.append("")
    action = "kept and flagged (--keep-flagged)" if audit["config"]["keep_flagged"] else "removed"
    out += [
        "## Removed and flagged",
        "",
        f"Duplicates, near-duplicates and contradictions were {action}.",
        "",
    ]
    out += ["| reason | removed | flagged |", "|---|---:|---:|"]
    for reason, count in s["removed"].items():
        out.append(f"| {reason} | {count} | {s['flagged'].get(reason, 0)} |")
    out.append("")

    inv = audit["invalid"]
    if inv:
        out += [f"### Invalid rows ({len(inv)})", "", "| where | reason |", "|---|---|"]
        out += [f"| `{r['where']}` | {_short(r['reason'], 200)} |" for r in inv[:MD_LIST_LIMIT]]
        if len(inv) > MD_LIST_LIMIT:
            out.append(f"| … | {len(inv) - MD_LIST_LIMIT} more in audit.json |")
        out.append("")
    ex = audit["exact_duplicates"]
    if ex["count"]:
        out += [f"### Exact duplicates ({ex['count']})", "", "| row | duplicate of | text |", "|---|---|---|"]
        out += [f"| `{e['where']}` | `{e['duplicate_of']}` | {_short(e['text'])} |" for e in ex["examples"]]
        out.append("")
    nd = audit["near_duplicates"]
    if nd["count"]:
        out += [
            f"### Near-duplicates ({nd['count']} rows in {nd['clusters']} clusters, Jaccard ≥ {nd['threshold']})",
            "",
            "| row | kept row | Jaccard | text |",
            "|---|---|---:|---|",
        ]
        for c in nd["examples"]:
            for m in c["members"]:
                out.append(
                    f"| `{m['where']}` | `{c['kept']['where']}` | {m['jaccard']:.3f} | {_short(m['text'])} |"
                )
        out.append("")
    co = audit["contradictions"]
    if co["count"]:
        out += [f"### Contradictions ({co['count']} rows in {co['groups']} prompts)", ""]
        for g in co["examples"]:
            out.append(f"- prompt: {_short(g['prompt'], 160)}")
            for a in g["answers"]:
                out.append(f"  - `{a['where']}` → {_short(a['answer'])}")
        out.append("")

    out += ["## Splits", "", "| split | rows |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in s["splits"].items()]
    out.append("")
    g = audit["groups"]
    if g.get("key"):
        out.append(
            f"Grouped by `{g['key']}`: {g['groups']} groups, {g['rows_without_key']} rows without the key, "
            f"{g['leaking_groups']} groups in more than one split."
        )
        out.append("")
    out.append(
        f"{audit['linked_components']['linked']} rows sit in linked components (groups and kept clusters) that "
        "were each placed in one split."
    )
    out.append("")

    t = audit["tokens"]
    out += ["## Token lengths", ""]
    if t.get("measured"):
        m = t["model"]
        out.append(
            f"Model `{m['spec']}` (chat template sha256 `{(m.get('chat_template_sha256') or '')[:12]}`)."
        )
        out.append("")
        out += ["| p50 | p95 | max | mean | over max_length |", "|---:|---:|---:|---:|---:|"]
        out.append(
            f"| {t['p50']} | {t['p95']} | {t['max']} | {t['mean']} | {t['over_max_length']} (> {t['max_length']}) |"
        )
        out.append("")
        if t.get("note"):
            out += [f"Note: {t['note']}.", ""]
        if audit.get("histogram"):
            out += [f"![token length histogram]({audit['histogram']})", ""]
        if t.get("over_examples"):
            out += ["Longest rows over max_length:", ""]
            out += [f"- `{e['where']}`: {e['tokens']} tokens" for e in t["over_examples"]]
            out.append("")
    else:
        out += [t.get("note", "not measured"), ""]

    fs = audit.get("json_fields")
    if fs:
        out += [
            "## JSON answers",
            "",
            f"{fs['json_objects']} of {fs['answers']} answers are JSON objects.",
            "",
            "| field | present | presence | distinct values |",
            "|---|---:|---:|---:|",
        ]
        out += [
            f"| `{k}` | {v['present']} | {v['presence']:.1%} | {v['distinct']} |"
            for k, v in fs["fields"].items()
        ]
        out.append("")
    pii = audit.get("pii")
    if pii is not None:
        out += [
            "## PII scan",
            "",
            f"{pii['rows']} rows flagged: " + ", ".join(f"{k} {v}" for k, v in pii["counts"].items()),
            "",
        ]
        if pii["examples"]:
            out += ["| row | kind | match (masked) |", "|---|---|---|"]
            out += [
                f"| `{e['where']}` | {e['kind']} | `{e['match']}` |" for e in pii["examples"][:MD_LIST_LIMIT]
            ]
            out.append("")
    return "\n".join(out) + "\n"
