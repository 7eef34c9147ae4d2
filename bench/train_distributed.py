"""Distributed QLoRA training throughput: `tuneship train` through its launcher (DDP, FSDP-QLoRA) per GPU.

    python bench/train_distributed.py prepare                       # here: tokenizer files + long rows -> .distbench/
    python bench/train_distributed.py run --nproc 1 --modes none,ddp,fsdp   # on a GPU host (one GPU)
    python bench/train_distributed.py run --nproc 2 --modes none,ddp,fsdp   # on two GPUs: scaling efficiency
    python bench/train_distributed.py run --tiny --nproc 2 --modes ddp      # on the CPU: checks the script runs

Every measured run is the real CLI, `tuneship train --set distributed.mode=MODE --nproc N --json`, in its own
process tree, so it measures the same code path users run: `none` is the plain single-process path, `ddp` and
`fsdp` go through `accelerate launch` (torchrun on the CPU). The model has Qwen2.5-1.5B's shape (the shape of
bench/train_speed.py) with random weights, built on the GPU from a config: speed and memory do not depend on the
values, and the GPU host has no network. The tokenizer is SmolLM2's (bundled), copied by `prepare`; its ids fit
in Qwen's larger vocabulary. Rows are English text (.benchdata/real_tokens.npy when present) cut into
prompt/completion pairs of about 1,000 tokens, truncated to max_length 1024, batch 8 per GPU.

Throughput is steady state: tokens (summed over ranks, non-padding) between the step after the warm-up steps and
the last step, over the trainer's own elapsed time between them, from the adapter's log_history.json. Per GPU
= that / processes. Scaling efficiency = per-GPU tokens/s at N processes / tokens/s of the one-process `none`
run. Peak memory is torch.cuda.max_memory_allocated on each rank, as the train record stores it.
Writes bench/results/train_distributed.json (and a copy under $OUT when that is set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_speed import QWEN15, TINY  # noqa: E402  (the shared model shapes)

BENCH = ROOT / ".distbench"  # git-ignored; carried to the GPU host
RESULT = ROOT / "bench" / "results" / "train_distributed.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(n_rows: int = 320, prompt_tokens: int = 620, completion_tokens: int = 340) -> None:
    """Tokenizer files and long prompt/completion rows into .distbench/ (run where the bundled model exists)."""
    from transformers import AutoTokenizer

    from tuneship.models import bundled_checkpoint

    src = bundled_checkpoint("smollm2-135m-instruct")
    tok_dir = BENCH / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tok_dir / name)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids_path = ROOT / ".benchdata" / "real_tokens.npy"
    if ids_path.exists():
        import numpy as np

        ids = np.load(ids_path).astype("int64").tolist()
    else:  # plain generated text, when the real-text ids are not there
        words = "the model reads a long posting and writes a short answer about each field it finds".split()
        ids = tok(" ".join(words[i % len(words)] for i in range(200_000)))["input_ids"]
    per_row = prompt_tokens + completion_tokens
    with open(BENCH / "rows.jsonl", "w") as f:
        for i in range(n_rows):
            start = (i * per_row) % max(1, len(ids) - per_row)
            chunk = ids[start : start + per_row]
            row = {"input": tok.decode(chunk[:prompt_tokens]), "output": tok.decode(chunk[prompt_tokens:])}
            f.write(json.dumps(row) + "\n")
    log(f"wrote {tok_dir} and {n_rows} rows to {BENCH / 'rows.jsonl'}")


def build_model(path: Path, tiny: bool) -> None:
    """A random-weight model of the benchmark shape, saved as sharded safetensors with the tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (path / "config.json").exists():
        return
    t0 = time.time()
    cfg = Qwen2Config(**(TINY if tiny else QWEN15))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(
        tmp, safe_serialization=True, max_shard_size="1GB"
    )  # several shards: no whole-file hash
    for name in TOKENIZER_FILES:
        if (BENCH / "tokenizer" / name).exists():
            shutil.copy2(BENCH / "tokenizer" / name, tmp / name)
    tmp.rename(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are separate processes: leave them the whole card
    log(
        f"built {'tiny' if tiny else 'Qwen2.5-1.5B-shaped'} random model at {path} in {time.time() - t0:.0f} s"
    )


def steady_tokens_per_s(history: list[dict], warmup: int) -> dict:
    steps = [h for h in history if "loss" in h and "num_input_tokens_seen" in h and "train_runtime" in h]
    if len(steps) <= warmup + 1:
        return {"tokens_per_s": None, "measured_steps": 0}
    a, b = steps[warmup], steps[-1]
    dt = float(b["train_runtime"]) - float(a["train_runtime"])
    dtok = int(b["num_input_tokens_seen"]) - int(a["num_input_tokens_seen"])
    return {
        "tokens_per_s": round(dtok / dt, 1) if dt > 0 else None,
        "measured_steps": b["step"] - a["step"],
        "s_per_step": round(dt / (b["step"] - a["step"]), 3),
    }


def run_one(mode: str, nproc: int, a, model_dir: Path, work: Path) -> dict:
    out = work / mode / "adapter"
    shutil.rmtree(out.parent, ignore_errors=True)
    n = 1 if mode == "none" else nproc
    sets = {
        "base_model": model_dir,
        "data.train": BENCH / "rows.jsonl",
        "data.valid": "null",
        "data.system_prompt": "null",
        "data.system_prompt_file": "null",
        "max_steps": a.steps,
        "batch_size": a.batch,
        "max_length": a.seq,
        "logging_steps": 1,
        "save_steps": 100000,
        "warmup_ratio": 0.0,
        "learning_rate": 1e-4,
        "distributed.mode": mode,
        "distributed.nproc": n,
    }
    if a.tiny:
        sets["device"] = "cpu"
    cmd = [sys.executable, "-m", "tuneship.cli", "train", "--out", str(out), "--json"]
    cmd += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    log(f"{mode} x{n}: {' '.join(cmd[3:6])} ...")
    t0 = time.time()
    row: dict = {"mode": mode, "processes": n}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the CLI hands it to the launcher, which stops its workers
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        (work / f"{mode}.stderr.log").write_text(stderr)
        return row | {"ok": False, "error": f"timed out after {a.timeout} s", "stderr_tail": stderr[-4000:]}
    p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    row["wall_s"] = round(time.time() - t0, 1)
    (work / f"{mode}.stderr.log").write_text(p.stderr)
    if p.returncode != 0:
        return row | {"ok": False, "rc": p.returncode, "stderr_tail": p.stderr[-4000:]}
    text = p.stdout
    summary = json.loads(text[text.index("\n{\n") + 1 :] if not text.startswith("{\n") else text)
    history = json.loads((out / "log_history.json").read_text())
    steady = steady_tokens_per_s(history, a.warmup)
    dist = summary.get("distributed") or {}
    per_gpu = round(steady["tokens_per_s"] / n, 1) if steady["tokens_per_s"] else None
    digests = dist.get("lora_sha256_per_rank") or []
    return row | {
        "ok": True,
        **steady,
        "tokens_per_s_per_gpu": per_gpu,
        "peak_mem_gib_per_gpu": dist.get("peak_mem_gib_per_rank") or [summary["peak_mem_gib"]],
        "whole_run_tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary["final_loss"],
        "steps": summary["steps"],
        "world_size": summary.get("world_size", 1),
        "lora_in_sync": len(set(digests)) == 1 if len(digests) > 1 else None,
        "notes": [n for n in (json.loads((out / "tuneship.json").read_text()).get("notes") or [])],
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "cores": os.cpu_count()}
    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}  # fmt: skip


def run(a) -> None:
    t0 = time.time()
    if not (BENCH / "rows.jsonl").exists():
        raise SystemExit(
            "run `python bench/train_distributed.py prepare` first (here, where the bundled model is)"
        )
    model_dir = Path(a.model_dir)
    build_model(model_dir, a.tiny)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for mode in a.modes.split(","):
        rows.append(run_one(mode, a.nproc, a, model_dir, work))
        r = rows[-1]
        log(
            f"{mode}: "
            + (f"{r['tokens_per_s']} tok/s, peak {r['peak_mem_gib_per_gpu']} GiB" if r["ok"] else "FAILED")
        )
        write_result(a, rows, t0)  # after every run: a cut-off session keeps what finished


def write_result(a, rows: list[dict], t0: float) -> None:
    base = next((r for r in rows if r["mode"] == "none" and r["ok"]), None)
    for r in rows:
        if base and r["ok"] and r["tokens_per_s_per_gpu"] and base["tokens_per_s"]:
            r["per_gpu_vs_single_process"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s"], 3)
    result = {
        "what": "tuneship train through its distributed launcher: tokens/s per GPU and peak memory per GPU",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "tiny Qwen2 (CPU script check)" if a.tiny else "Qwen2.5-1.5B shape, random weights",
        "settings": {
            "batch_per_gpu": a.batch,
            "max_length": a.seq,
            "steps": a.steps,
            "warmup_steps": a.warmup,
            "nproc": a.nproc,
            "recipe": "tuneship default: QLoRA NF4+DQ, r=16 all-linear, paged AdamW 8-bit, speed levers on",
        },
        "machine": machine(),
        "versions": versions(),
        "runs": rows,
        "not_run": []
        if a.nproc > 1
        else [f"{m} with 2 processes (needs 2 GPUs; nvidia-h200-x2 not lent)" for m in ("ddp", "fsdp")],
        "bench_wall_s": round(time.time() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    out = Path(a.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.parent.resolve():
        Path(os.environ["OUT"], out.name).write_text(text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="copy the tokenizer and write the rows into .distbench/ (CPU)")
    r = sub.add_parser("run", help="build the model and run each mode through the CLI")
    r.add_argument("--nproc", type=int, default=1)
    r.add_argument("--modes", default="none,ddp,fsdp")
    r.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    r.add_argument("--steps", type=int, default=14)
    r.add_argument("--warmup", type=int, default=4, help="steps left out of the steady-state rate")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--seq", type=int, default=1024)
    r.add_argument("--timeout", type=int, default=300, help="seconds per run")
    r.add_argument("--model-dir", default="/tmp/tuneship-distbench-model")
    r.add_argument("--work", default="/tmp/tuneship-distbench")
    r.add_argument("--result", default=str(RESULT))
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare()
    else:
        run(a)


if __name__ == "__main__":
    main()
