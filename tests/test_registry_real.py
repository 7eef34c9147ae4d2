"""The registry with a real QLoRA adapter from `tuneship train` (the shared session fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneship import registry as reg
from tuneship.artifacts import read_record, sha256_dir

pytestmark = pytest.mark.slow


def test_register_a_real_trained_adapter(adapter_dir, tmp_path):
    root = tmp_path / "registry"
    record = read_record(adapter_dir, kind="adapter")
    ref = reg.add_version(adapter_dir, "demo", root=root)
    info = reg.show(ref, root=root)
    assert info["sha256"] == sha256_dir(adapter_dir)
    assert info["base_model"] == record["base_model"] and info["base_model"]["sha256"]
    assert info["dataset_sha256"] == record["dataset_sha256"] and len(info["dataset_sha256"]) == 64
    assert info["chat_template_sha256"] == record["chat_template_sha256"] and info["stop_tokens"]
    assert info["lora"]["r"] == json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    assert info["config"] == record["config"] and info["metrics"] == record["metrics"]
    assert "final_loss" in info["metrics"]
    # serving finds it through the route, with the base model it needs
    reg.promote(ref, to="stable", root=root)
    served = reg.export_route("demo", root=root)["versions"]["v1"]
    assert Path(served["adapter_path"]) == reg.resolve_ref("demo@stable", root=root)
    assert served["lora_r"] == info["lora"]["r"] and served["base_model"] == record["base_model"]
    # the training output dir itself (outside the registry) maps back to the version
    assert reg.ref_for_path(adapter_dir, root=root) == "demo@v1"
