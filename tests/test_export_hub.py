"""`export hub --dry-run`: the exact files and the model card, for each kind of artifact. No network."""

from __future__ import annotations

import json

import pytest

from tuneship.artifacts import read_record, sha256_bytes, sha256_file
from tuneship.cli import main

SECRET = "hf_testtoken_do_not_print_123"


def _dry_run(capsys, monkeypatch, artifact) -> dict:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    rc = main(["export", "hub", str(artifact), "--repo-id", "someone/smol-jobs", "--dry-run", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert SECRET not in captured.out + captured.err
    return json.loads(captured.out)


def _check_files(result, artifact):
    listed = {f["path"]: f for f in result["files"]}
    on_disk = {p.name for p in artifact.iterdir() if p.is_file() and p.name != "README.md"}
    assert set(listed) == on_disk | {"README.md"}
    for name in on_disk:
        assert listed[name]["bytes"] == (artifact / name).stat().st_size
        assert listed[name]["sha256"] == sha256_file(artifact / name)
    assert listed["README.md"]["generated"] is True
    assert listed["README.md"]["sha256"] == sha256_bytes(result["card"])
    assert result["total_bytes"] == sum(f["bytes"] for f in result["files"])


def test_hub_dry_run_gguf(gguf_export, merged_dir, capsys, monkeypatch):
    result = _dry_run(capsys, monkeypatch, gguf_export)
    _check_files(result, gguf_export)
    assert result["kind"] == "gguf" and result["dry_run"] is True
    card = result["card"]
    rec = read_record(gguf_export)
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: gguf" in card
    q4 = rec["files"]["model-Q4_K_M.gguf"]
    assert "| model-Q4_K_M.gguf | Q4_K_M |" in card and f"{q4['kl']:.4g}" in card
    # lineage: this export, its merged parent and the adapter, each with its hash
    assert rec["sha256"][:16] in card
    assert read_record(merged_dir)["sha256"][:16] in card
    assert read_record(merged_dir)["parent"]["sha256"][:16] in card


def test_hub_dry_run_merged_and_adapter(merged_dir, adapter_dir, capsys, monkeypatch):
    merged = _dry_run(capsys, monkeypatch, merged_dir)
    _check_files(merged, merged_dir)
    assert "library_name: transformers" in merged["card"]
    assert f"{read_record(merged_dir)['merge_max_abs_diff']:.4g}" in merged["card"]

    adapter = _dry_run(capsys, monkeypatch, adapter_dir)
    _check_files(adapter, adapter_dir)
    assert "library_name: peft" in adapter["card"] and "AutoPeftModelForCausalLM" in adapter["card"]
    assert read_record(adapter_dir)["chat_template_sha256"] in adapter["card"]


def test_hub_dry_run_human_output(merged_dir, capsys):
    assert main(["export", "hub", str(merged_dir), "--repo-id", "someone/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"would upload merged {merged_dir} -> someone/x:")
    assert "model.safetensors.index.json" in out and "--- README.md ---" in out


def test_hub_upload_needs_token(merged_dir, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc = main(["export", "hub", str(merged_dir), "--repo-id", "someone/x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "HF_TOKEN" in err and "\n" not in err


@pytest.mark.parametrize("repo_id", ["no spaces/allowed", "a/b/c"])
def test_hub_bad_repo_id(merged_dir, capsys, repo_id):
    rc = main(["export", "hub", str(merged_dir), "--repo-id", repo_id, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a valid Hub repo id" in err


def test_hub_refuses_non_artifact(tmp_path, capsys):
    rc = main(["export", "hub", str(tmp_path), "--repo-id", "someone/x", "--dry-run"])
    assert rc == 2 and "tuneship.json" in capsys.readouterr().err
