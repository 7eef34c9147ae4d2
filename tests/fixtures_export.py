"""Session fixtures of the merge and export stages, built once on the shared QLoRA adapter (`adapter_dir`).

- `merged` / `merged_dir`: `tuneship.merge.merge_adapter(adapter_dir, ...)`, sharded at 150MB so the sharded
  path is what every later stage reads.
- `gguf_result` / `gguf_export`: `tuneship.export.export_gguf(merged_dir, ..., quants=["Q4_K_M"])`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MERGE_SHARD_SIZE = "150MB"
MERGED_FILES = {
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tuneship.json",
}
GGUF_FILES = {"model-f16.gguf", "model-Q4_K_M.gguf", "Modelfile", "tuneship.json"}


@pytest.fixture(scope="session")
def merged(adapter_dir, tmp_path_factory) -> dict:
    """The summary dict `merge_adapter` returned for the shared adapter (see `merged_dir` for the files)."""
    from tuneship.merge import merge_adapter

    out = tmp_path_factory.mktemp("merge") / "merged"
    return merge_adapter(adapter_dir, out, max_shard_size=MERGE_SHARD_SIZE)


@pytest.fixture(scope="session")
def merged_dir(merged) -> Path:
    """The merged bf16 checkpoint directory of the shared adapter. Its files (MERGED_FILES):
    model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json,
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja and
    tuneship.json (kind "merged": sha256, parent {kind, path, sha256}, base_model, chat_template_sha256,
    stop_tokens, system_prompt, merge_max_abs_diff, metrics)."""
    return Path(merged["out"])


@pytest.fixture(scope="session")
def gguf_result(merged_dir, tmp_path_factory) -> dict:
    """The summary dict `export_gguf` returned for `merged_dir` (metrics: f16_kl, f16_top1, q4_k_m_kl, q4_k_m_top1)."""
    from tuneship.export import export_gguf

    out = tmp_path_factory.mktemp("export") / "gguf"
    return export_gguf(merged_dir, out, quants=["Q4_K_M"])


@pytest.fixture(scope="session")
def gguf_export(gguf_result) -> Path:
    """The GGUF export directory of `merged_dir`. Its files (GGUF_FILES):
    model-f16.gguf (llama.cpp's converter output), model-Q4_K_M.gguf (quantized from it), Modelfile (Ollama:
    FROM ./model-Q4_K_M.gguf, TEMPLATE, PARAMETER stop ..., SYSTEM) and tuneship.json (kind "gguf":
    files {name: {quant, sha256, bytes, kl, kl_max, kl_p99, top1, gate}}, model_file "model-Q4_K_M.gguf",
    metrics {f16_kl, f16_top1, q4_k_m_kl, q4_k_m_top1}, parent = the merged dir, base_model, stops)."""
    return Path(gguf_result["out"])
