"""`make demo`: the whole path on the bundled model, on the CPU, ending in out/demo/summary.json.

data -> QLoRA train -> eval (base vs tuned, paired, with CIs) -> merge -> GGUF f16 + Q4_K_M + Modelfile
-> serve the GGUF over HTTP and ask it one test posting -> summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneship.progress import log

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def ask_server(gguf: Path, prompt_messages: list[dict], port: int, timeout: float = 180) -> str:
    """Start `tuneship serve GGUF`, wait until it answers, ask one chat completion over HTTP, stop it."""
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneship.cli",
            "serve",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            try:
                if httpx.get(base + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not come up in time")
            time.sleep(0.5)
        r = httpx.post(
            base + "/chat/completions",
            json={"model": "tuneship", "messages": prompt_messages, "temperature": 0, "max_tokens": 96},
            timeout=120,
        )
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuneship.demo", description=__doc__)
    ap.add_argument("--out", default="out/demo", help="Output root (default out/demo).")
    ap.add_argument("--config", default="configs/demo.yaml", help="Train config.")
    ap.add_argument("--eval-limit", type=int, default=None, help="Evaluate only the first N test rows.")
    ap.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("TUNESHIP_DEMO_PORT", "0")),
        help="Server port (0: a free one).",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="Train config override key=value."
    )
    args = ap.parse_args(argv)

    from tuneship.config import load_config
    from tuneship.data.demo import write_demo_data
    from tuneship.data.schema import read_examples, split_prompt
    from tuneship.errors import TuneshipError
    from tuneship.eval import run_eval
    from tuneship.eval.config import EvalConfig
    from tuneship.export import export_gguf
    from tuneship.merge import merge_adapter
    from tuneship.serve.launch import free_port
    from tuneship.train.config import TrainConfig
    from tuneship.train.run import run_train

    out = Path(args.out)
    data, adapter, merged, gguf_dir = out / "data", out / "adapter", out / "merged", out / "gguf"
    seconds: dict[str, float] = {}

    def stage(name: str):
        log(f"== {name} ==")
        seconds[name] = time.time()

    def done(name: str):
        seconds[name] = round(time.time() - seconds[name], 1)

    try:
        stage("data")
        write_demo_data(data, overwrite=True)
        done("data")

        stage("train")
        cfg = load_config(
            TrainConfig,
            args.config,
            [
                f"data.train={data / 'train.jsonl'}",
                f"data.valid={data / 'valid.jsonl'}",
                f"data.system_prompt_file={data / 'system_prompt.txt'}",
                f"output_dir={adapter}",
                *args.overrides,
            ],
        )
        train = run_train(cfg, overwrite=True)
        done("train")

        stage("eval")
        ev = run_eval(
            EvalConfig(
                model=str(adapter),
                baseline="bundled:smollm2-135m-instruct",
                data=str(data / "test.jsonl"),
                out=str(out / "eval"),
                limit=args.eval_limit,
                overwrite=True,
            )
        )
        done("eval")

        stage("merge")
        mg = merge_adapter(adapter, merged, overwrite=True)
        done("merge")

        stage("export")
        ex = export_gguf(merged, gguf_dir, quants=["Q4_K_M"], overwrite=True)
        done("export")

        stage("serve")
        test_rows = read_examples(
            data / "test.jsonl", system=(data / "system_prompt.txt").read_text().strip()
        )
        prompt, reference = split_prompt(test_rows[0])
        q4 = Path(ex["model_path"])
        answer = ask_server(q4, prompt, args.port or free_port())
        done("serve")
    except TuneshipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def metric(block: dict, key: str):
        return block.get(key, {}).get("value")

    try:
        answer_valid = json.loads(answer) is not None
    except json.JSONDecodeError:
        answer_valid = False
    fid = ex["metrics"]
    summary = {
        "base_exact_match": metric(ev["baseline"], "exact_match"),
        "tuned_exact_match": metric(ev["metrics"], "exact_match"),
        "tuned_exact_match_ci": ev["metrics"]["exact_match"]["ci"],
        "base_json_valid": metric(ev["baseline"], "json_valid"),
        "tuned_json_valid": metric(ev["metrics"], "json_valid"),
        "exact_match_diff_p_value": ev.get("diff", {}).get("exact_match", {}).get("p_value"),
        "eval_n": ev["n"],
        "adapter_dir": _rel(adapter),
        "merged_dir": _rel(merged),
        "gguf_path": _rel(q4),
        "gguf_f16_kl": fid.get("f16_kl"),
        "gguf_q4_k_m_kl": fid.get("q4_k_m_kl"),
        "gguf_q4_k_m_top1": fid.get("q4_k_m_top1"),
        "merge_max_abs_diff": mg.get("merge_max_abs_diff", mg.get("max_abs_diff")),
        "train_final_loss": train["final_loss"],
        "train_tokens_per_s": train["tokens_per_s"],
        "served_prompt": prompt[-1]["content"],
        "served_reference": reference,
        "served_answer": answer,
        "served_answer_is_json": answer_valid,
        "stage_seconds": {k: v for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1),
        "machine": f"{os.cpu_count()} CPU cores, {sys.platform}",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        (
            "exact match (base -> tuned)",
            f"{summary['base_exact_match']:.3f} -> {summary['tuned_exact_match']:.3f}",
        ),
        (
            "valid JSON (base -> tuned)",
            f"{summary['base_json_valid']:.3f} -> {summary['tuned_json_valid']:.3f}",
        ),
        (
            "eval rows / p-value of the difference",
            f"{summary['eval_n']} / {summary['exact_match_diff_p_value']}",
        ),
        ("final train loss", f"{summary['train_final_loss']:.4f}"),
        ("merge max |logit diff|", f"{summary['merge_max_abs_diff']}"),
        ("GGUF f16 KL", f"{summary['gguf_f16_kl']}"),
        ("GGUF Q4_K_M KL / top-1", f"{summary['gguf_q4_k_m_kl']} / {summary['gguf_q4_k_m_top1']}"),
        ("served answer", answer.strip()[:90]),
        ("stage seconds", ", ".join(f"{k} {v}" for k, v in seconds.items())),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    print(f"\nwrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
