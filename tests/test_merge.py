"""The merge stage on the real shared QLoRA adapter of the bundled SmolLM2-135M."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures_export import MERGED_FILES
from tuneship.artifacts import read_record, sha256_dir
from tuneship.cli import main


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_merged_logits_match_base_plus_adapter(merged_dir, adapter_dir):
    """Recompute independently of the stage: merged (as saved) vs a fresh fp32 base with the adapter applied."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hiring: Staff Nurse at Mercy General, Leeds. On site, nights."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base_path = read_record(adapter_dir)["base_model"]["spec"]
    from tuneship.models import resolve

    fresh = AutoModelForCausalLM.from_pretrained(resolve(base_path).path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    want = _logits(reference, ids)
    with reference.disable_adapter():
        base_only = _logits(reference, ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), ids)

    diff = float((want - got).abs().max())
    effect = float((want - base_only).abs().max())
    assert effect > 0.1, "the shared adapter should move the logits, or this test proves nothing"
    assert diff < 0.5 * effect, f"merged logits differ by {diff}, adapter effect {effect}"
    assert float((want.argmax(-1) == got.argmax(-1)).float().mean()) >= 0.9
    # the merged model is really different from the base: the adapter went in
    assert float((got - base_only).abs().max()) > 0.5 * effect


def test_merged_files_and_record(merged, merged_dir, adapter_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert names == MERGED_FILES
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in MERGED_FILES if n.startswith("model-0")}
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"

    rec = read_record(merged_dir, kind="merged")
    adapter_rec = read_record(adapter_dir)
    assert rec["sha256"] == sha256_dir(merged_dir)
    assert rec["parent"]["kind"] == "adapter"
    assert rec["parent"]["sha256"] == (adapter_rec.get("sha256") or sha256_dir(adapter_dir))
    assert rec["base_model"]["sha256"] == adapter_rec["base_model"]["sha256"]
    assert rec["chat_template_sha256"] == adapter_rec["chat_template_sha256"]
    assert rec["stop_tokens"] == adapter_rec["stop_tokens"]
    assert rec["system_prompt"] == adapter_rec.get("system_prompt")
    m = rec["metrics"]
    assert rec["merge_max_abs_diff"] == m["max_abs_diff"] <= m["bound"]
    assert m["top1_agreement"] >= 0.9
    assert merged["merge_max_abs_diff"] == rec["merge_max_abs_diff"]

    from transformers import AutoTokenizer

    from tuneship.models import chat_template_info

    info = chat_template_info(AutoTokenizer.from_pretrained(merged_dir))
    assert info["chat_template_sha256"] == rec["chat_template_sha256"]


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A tiny random Llama saved as safetensors: a real HF checkpoint that is not the adapter's base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    out = tmp_path_factory.mktemp("other") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_merge_refuses_adapter_of_another_base(adapter_dir, other_base, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", str(adapter_dir), "--base", str(other_base), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "was trained on bundled:smollm2-135m-instruct" in err and str(other_base) in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_merge_accepts_matching_base(adapter_dir, tmp_path):
    """--base naming the same base passes the identity check (it fails later only on the existing --out)."""
    from tuneship.errors import TuneshipError
    from tuneship.merge import merge_adapter

    (tmp_path / "out").mkdir()
    with pytest.raises(TuneshipError, match="already exists"):
        merge_adapter(adapter_dir, tmp_path / "out", base="bundled:smollm2-135m-instruct")


def test_merge_refuses_existing_output(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["merge", str(adapter_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and "--overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "mine"


def test_merge_refuses_pickle_adapter(adapter_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "adapter"
    pickled.mkdir()
    for name in ("adapter_config.json", "tuneship.json"):
        shutil.copy(adapter_dir / name, pickled / name)
    torch.save(load_file(adapter_dir / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    out = tmp_path / "merged"
    rc = main(["merge", str(pickled), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pickle" in err and "--allow-pickle" in err and "\n" not in err
    assert not out.exists()


def test_merge_refuses_non_adapter(bundled_dir, tmp_path, capsys):
    rc = main(["merge", str(bundled_dir), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not an adapter" in err


def test_merge_help(capsys):
    assert main(["merge", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--base" in out and "--out" in out and "--overwrite" in out and "--json" in out
