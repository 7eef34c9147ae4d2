"""`export gguf` on the real merged SmolLM2-135M: llama.cpp's converter and quantizer, fidelity gates, the
Ollama Modelfile, and the bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures_export import GGUF_FILES
from tuneship.artifacts import read_record, sha256_file
from tuneship.cli import main
from tuneship.errors import TuneshipError
from tuneship.export import llamacpp, ollama
from tuneship.export.gguf import DEFAULT_GATES, F16_MAX_KL


def test_gguf_files_and_fidelity(gguf_export, gguf_result, merged_dir):
    assert {p.name for p in gguf_export.iterdir()} == GGUF_FILES
    rec = read_record(gguf_export, kind="gguf")
    f16, q4 = rec["files"]["model-f16.gguf"], rec["files"]["model-Q4_K_M.gguf"]
    # the f16 GGUF reproduces the HF model; the Q4_K_M stays within its gate
    assert f16["kl"] <= F16_MAX_KL and f16["top1"] >= 0.99
    max_kl, min_top1 = DEFAULT_GATES["Q4_K_M"]
    assert 0 < q4["kl"] <= max_kl and min_top1 <= q4["top1"] < 1.0
    assert q4["kl"] > f16["kl"]  # quantization costs something; a no-op "quantization" would not
    assert q4["bytes"] < 0.5 * f16["bytes"]
    # SmolLM2's rows of 576 are not multiples of 256, so llama.cpp falls back from K-quants for many tensors
    assert 0 < q4["fallback_tensors"] < q4["tensors"]
    for name, info in rec["files"].items():
        assert info["sha256"] == sha256_file(gguf_export / name)
    assert rec["model_file"] == "model-Q4_K_M.gguf"
    assert gguf_result["metrics"]["q4_k_m_kl"] == q4["kl"] and gguf_result["metrics"]["f16_kl"] == f16["kl"]
    merged_rec = read_record(merged_dir)
    assert rec["parent"] == {
        "kind": "merged",
        "path": str(merged_dir.resolve()),
        "sha256": merged_rec["sha256"],
    }
    assert rec["base_model"] == merged_rec["base_model"]
    assert rec["chat_template_sha256"] == merged_rec["chat_template_sha256"]
    assert rec["llama_cpp"]["version"] == llamacpp.runtime_version()


def test_f16_gguf_matches_hf_on_new_text(gguf_export, merged_dir):
    """Independent of the probes the stage used: a fresh text, the same ids through HF and llama.cpp."""
    from transformers import AutoTokenizer

    from tuneship.export.fidelity import compare, gguf_logprobs, hf_logprobs

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = [tok("The river flooded the old mill twice in one spring, and the miller moved away.")["input_ids"]]
    figures = compare(hf_logprobs(merged_dir, ids), gguf_logprobs(gguf_export / "model-f16.gguf", ids))
    assert figures["kl"] < F16_MAX_KL and figures["top1"] == 1.0


SAMPLES = [
    [{"role": "user", "content": "Senior Chef at Olive & Thyme, Lisbon. Full-time, on site."}],
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Extract: Remote Python dev at Acme."},
    ],
]


def test_modelfile_matches_tokenizer(gguf_export, merged_dir):
    from transformers import AutoTokenizer

    from tuneship.models import chat_template_info

    tok = AutoTokenizer.from_pretrained(merged_dir)
    mf = ollama.parse_modelfile(gguf_export / "Modelfile")
    assert mf["from"] == "./model-Q4_K_M.gguf" and (gguf_export / mf["from"]).is_file()
    assert mf["stops"] == chat_template_info(tok)["stop_tokens"]
    assert tok.eos_token in mf["stops"] and "<|im_end|>" in mf["stops"]
    system = read_record(merged_dir).get("system_prompt")
    assert mf["system"] == system
    template = mf["template"]
    for conv in SAMPLES:
        # without a system message (the template's own default system prompt applies)...
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert ollama.render_go_template(template, conv) == want
        # ...and as Ollama runs it with the Modelfile's SYSTEM prepended
        want = tok.apply_chat_template(
            [{"role": "system", "content": system}, *conv], tokenize=False, add_generation_prompt=True
        )
        assert ollama.render_go_template(template, conv, system=system) == want


def test_go_template_renderer_semantics():
    """The small Go text/template interpreter the checks rely on, on hand-computed cases."""
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    tpl = 'a  {{- range .Messages }} [{{ .Role }}:{{ .Content }}]  {{- end }}\n{{- if eq (index .Messages 0).Role "system" -}}\n yes {{ else }}no{{ end }}'
    assert ollama.render_go_template(tpl, msgs) == "a [system:S] [user:U]yes "
    assert (
        ollama.render_go_template("{{ if not .Messages }}empty{{ else }}{{ len .Messages }}{{ end }}", [])
        == "empty"
    )
    assert (
        ollama.render_go_template('{{ if ne .System "" }}{{ .System }}{{ end }}', msgs[1:], system="X") == "X"
    )


def test_unknown_template_family_is_refused(merged_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    tok.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(TuneshipError, match="llama3 chat template.*--no-modelfile"):
        ollama.go_template(tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TuneshipError, match="unknown chat template"):
        ollama.go_template(tok)


@pytest.fixture(scope="module")
def opt_dir(merged_dir, tmp_path_factory) -> Path:
    """A tiny random OPT (an architecture llama.cpp has no converter for), with a real tokenizer beside it."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=49152,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    out = tmp_path_factory.mktemp("opt") / "tiny-opt"
    OPTForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(merged_dir / name, out / name)
    return out


def test_unsupported_architecture_names_it(opt_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    rc = main(["export", "gguf", str(opt_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("error: llama.cpp cannot convert architecture OPTForCausalLM")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written export, no temp dir left


def test_existing_output_is_refused(merged_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    out.mkdir()
    rc = main(["export", "gguf", str(merged_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and "--overwrite" in err and "\n" not in err
    assert list(out.iterdir()) == []


def test_pickle_weights_are_refused(tmp_path, capsys):
    import torch

    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    rc = main(["export", "gguf", str(model), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pickle" in err and "--allow-pickle" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_quant_and_adapter_input(merged_dir, adapter_dir, tmp_path):
    from tuneship.export import export_gguf

    with pytest.raises(TuneshipError, match="unknown quant type 'Q4_K_X'.*Q4_K_M"):
        export_gguf(merged_dir, tmp_path / "a", quants=["Q4_K_X"])
    with pytest.raises(TuneshipError, match="is an adapter; merge it first"):
        export_gguf(adapter_dir, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_missing_converter_says_make_setup(merged_dir, tmp_path, monkeypatch):
    from tuneship.export import export_gguf

    monkeypatch.setenv("TUNESHIP_LLAMACPP_DIR", str(tmp_path / "nothing-here"))
    with pytest.raises(TuneshipError, match="run `make setup`"):
        export_gguf(merged_dir, tmp_path / "out")


def test_fetch_is_idempotent_and_matches_runtime():
    result = llamacpp.fetch()
    assert result["fetched"] is False  # `make setup` already did it
    assert result["version"] == llamacpp.runtime_version()
    assert llamacpp.converter_path().is_file()
    assert (llamacpp.converter_path().parent / "gguf-py" / "gguf" / "gguf_writer.py").is_file()


def test_quant_names_map_to_llama_cpp_ftypes():
    import llama_cpp

    assert llamacpp.ftype("q4_k_m") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llamacpp.ftype("Q8_0") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert "Q5_K_M" in llamacpp.ftype_names()


def test_export_help():
    assert main(["export", "gguf", "--help"]) == 0
    assert main(["export", "hub", "--help"]) == 0
