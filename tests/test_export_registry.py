"""Merge and export results flow into the registry version their input came from."""

from __future__ import annotations

from pathlib import Path

from tuneship.artifacts import read_record


def test_merge_and_gguf_attach_to_the_registered_version(
    adapter_dir, merged_dir, gguf_export, tmp_path, monkeypatch
):
    from tuneship.export.gguf import _attach as attach_gguf
    from tuneship.export.gguf import _model_dir
    from tuneship.merge.merge import _attach as attach_merged
    from tuneship.registry import add_version, show

    monkeypatch.setenv("TUNESHIP_REGISTRY", str(tmp_path / "registry"))
    ref = add_version(adapter_dir, "jobs")
    # the stages pass the user's input as the source: a ref, or the registered adapter's own directory
    assert attach_merged(ref, merged_dir, read_record(merged_dir)) == ref
    assert attach_gguf(merged_dir, gguf_export, read_record(gguf_export)) == [ref]
    shown = show(ref)
    assert shown["merged"]["sha256"] == read_record(merged_dir)["sha256"]
    # `export gguf NAME@vN` exports the merged model attached to that version
    assert _model_dir(ref, allow_pickle=False) == Path(shown["merged"]["path"])
    assert read_record(shown["merged"]["path"])["sha256"] == read_record(merged_dir)["sha256"]
    q4 = shown["gguf"]["Q4_K_M"]
    assert q4["data"]["file"] == "model-Q4_K_M.gguf"
    assert q4["data"]["kl"] == read_record(gguf_export)["files"]["model-Q4_K_M.gguf"]["kl"]
