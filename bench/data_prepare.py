"""Benchmark `tuneship data prepare` at scale: generate N rows of about 500 characters, run the CLI, print a table.

    .venv/bin/python bench/data_prepare.py                      # 100k rows, bundled tokenizer, every row measured
    .venv/bin/python bench/data_prepare.py --rows 20000 --pii   # smaller, with the PII scan

The data has planted exact duplicates (2 %), near-duplicates (2 %, one word changed), contradictions
(0.5 %, pairs) and bad rows (0.1 %), so every stage does real work. prepare runs in a child process
(`tuneship data prepare ... --on-error skip --json`); the table shows its wall time and peak RSS, the stage
timings from audit.json, and the machine (cores and load average: other jobs on a shared box slow it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_vocab(rng: np.random.Generator, n: int = 20000) -> list[str]:
    syll = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "ta",
        "ve",
        "so",
        "pi",
        "da",
        "ro",
        "le",
        "mu",
        "zi",
        "fa",
        "go",
        "be",
        "ti",
    ]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syll, size=int(rng.integers(2, 5)))))
    return sorted(words)


def make_rows(n: int, chars: int, seed: int = 0) -> tuple[list[str], dict]:
    """JSON lines: input/output rows with planted duplicates, near-duplicates, contradictions and bad rows."""
    rng = np.random.default_rng(seed)
    vocab = np.array(make_vocab(rng))
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()
    words_per_row = max(8, chars // 7)
    planted = {
        "exact": int(n * 0.02),
        "near": int(n * 0.02),
        "contradiction_pairs": int(n * 0.0025),
        "bad": int(n * 0.001),
    }
    n_base = n - planted["exact"] - planted["near"] - 2 * planted["contradiction_pairs"] - planted["bad"]
    ids = rng.choice(len(vocab), size=(n_base, words_per_row), p=zipf)
    answers = rng.choice(len(vocab), size=(n_base, 6), p=zipf)
    rows = []
    for i in range(n_base):
        text = " ".join(vocab[ids[i]])
        rows.append(
            {
                "input": f"Summarize record {i}: {text}.",
                "output": " ".join(vocab[answers[i]]),
                "doc": f"d{i % 5000}",
            }
        )
    lines = [json.dumps(r) for r in rows]
    for _ in range(planted["exact"]):
        lines.append(lines[int(rng.integers(n_base))])
    for _ in range(planted["near"]):
        r = dict(rows[int(rng.integers(n_base))])
        w = r["input"].split()
        w[int(rng.integers(3, len(w) - 3))] = "changed"
        r["input"] = " ".join(w)
        lines.append(json.dumps(r))
    for j in range(planted["contradiction_pairs"]):
        q = f"Which answer is right for question {j}?"
        lines += [json.dumps({"input": q, "output": "yes"}), json.dumps({"input": q, "output": "no"})]
    lines += ['{"input": "broken' for _ in range(planted["bad"])]
    order = rng.permutation(len(lines))
    return [lines[i] for i in order], planted


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), load avg {load}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--chars", type=int, default=500, help="approximate characters per prompt")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="tokenizer for lengths, or none")
    ap.add_argument(
        "--length-sample",
        type=int,
        help="rows sampled for token-length percentiles (prepare's default if unset; 0 = all)",
    )
    ap.add_argument("--pii", action="store_true")
    ap.add_argument("--keep", help="write the data and the output here instead of a temp dir")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "raw.jsonl", work / "out"
    t0 = time.perf_counter()
    lines, planted = make_rows(args.rows, args.chars)
    src.write_text("\n".join(lines) + "\n")
    avg_chars = sum(map(len, lines)) / len(lines)
    print(
        f"generated {len(lines)} rows ({avg_chars:.0f} chars of JSON per row) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    exe = Path(sys.executable).with_name("tuneship")
    cmd = [str(exe), "data", "prepare", str(src), "--out", str(out), "--overwrite", "--on-error", "skip", "--json",
           "--model", args.model]  # fmt: skip
    if args.length_sample is not None:
        cmd += ["--length-sample", str(args.length_sample)]
    if args.pii:
        cmd.append("--pii")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb, cpu_s = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    summary = json.loads(proc.stdout)
    audit = json.loads((out / "audit.json").read_text())

    print(f"\nmachine: {machine()}")
    print(f"planted: {planted}")
    print(f"removed: {summary['removed']}")
    print(f"tokens:  {summary['tokens']}\n")
    print(
        f"| {'rows':>8} | {'seconds':>7} | {'rows/s':>7} | {'CPU s':>7} | {'peak RSS MB':>11} | {'rows out':>8} |"
    )
    print(f"|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 10}|")
    print(
        f"| {args.rows:>8} | {wall:>7.1f} | {args.rows / wall:>7.0f} | {cpu_s:>7.1f} | {peak_mb:>11.0f} "
        f"| {summary['rows_out']:>8} |"
    )
    print("\nstages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in audit["timings"].items()))
    print(
        f"(the rest of the {wall:.1f} s is interpreter start-up and imports; CPU s = user + system time of prepare)"
    )
    if args.rows >= 100_000:
        target = 60 * args.rows / 100_000
        verdict = "met" if wall <= target else "missed"
        print(f"{target:.0f} s target for {args.rows} rows: {verdict} on the wall clock ({wall:.1f} s)")
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
        if busy or cpu_s < wall:
            print(
                f"the machine was shared (load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); prepare used "
                f"{cpu_s:.1f} CPU s, which bounds its wall time when it has the cores to itself: "
                f"{'met' if cpu_s <= target else 'missed'} by that measure"
            )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
