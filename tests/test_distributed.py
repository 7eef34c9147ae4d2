"""Multi-process training: `tuneship train --nproc 2` on the CPU (torchrun, gloo DDP), and the config checks.

The slow test is one real 2-process QLoRA run of the bundled model, through the real CLI in a subprocess:
QLoRA rather than plain LoRA because the CPU runs bitsandbytes' 4-bit layers (see ENVIRONMENT.md), so the test
takes the product's default path. The run is interrupted (SIGTERM to the launcher) right after its step-2
checkpoint and finished with --resume; the finished record must show both ranks' LoRA weights identical
(gradients were synchronized), and only rank 0 may have written anything outside the run dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_core import bundled_dir, demo_data  # noqa: F401  (session fixtures)
from tuneship.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"


def data_sets(data: Path) -> list[str]:
    return [
        f"data.train={data / 'train.jsonl'}",
        "data.valid=null",
        f"data.system_prompt_file={data / 'system_prompt.txt'}",
    ]


def cli_args(*sets: str) -> list[str]:
    return ["train", "--config", str(CONFIG), *[x for s in sets for x in ("--set", s)]]


# ---- fast: config and launch plumbing ----


def test_nproc_turns_on_ddp(capsys):
    assert main([*cli_args(), "--nproc", "2", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)["distributed"]
    assert d["mode"] == "ddp" and d["nproc"] == 2
    assert main([*cli_args(), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["distributed"]["mode"] == "none", "one process stays as it was"


def test_fsdp_needs_storage_dtype_equal_to_compute(capsys):
    rc = main([*cli_args("distributed.mode=fsdp", "quant.quant_storage=uint8"), "--print-config"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "quant.quant_storage" in err and "bfloat16" in err
    # Matching dtypes (or auto) pass; outside FSDP any storage dtype is allowed.
    assert main([*cli_args("distributed.mode=fsdp", "quant.quant_storage=bfloat16"), "--print-config"]) == 0
    assert main([*cli_args("quant.quant_storage=uint8"), "--print-config"]) == 0


def test_fsdp_on_cpu_refused_before_launch(demo_data, tmp_path, capsys):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o" / "adapter"
    rc = main([*cli_args(*data_sets(demo_data), "distributed.mode=fsdp"), "--nproc", "2", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fsdp" in err and "CUDA" in err and "launching" not in err
    assert not (tmp_path / "o").exists()


def test_launch_commands():
    from tuneship.train import distributed
    from tuneship.train.config import TrainConfig

    cfg = TrainConfig.model_validate({"distributed": {"mode": "ddp", "nproc": 2}})
    cpu = distributed.launch_command(cfg, "cpu", ["--json"])
    assert cpu[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "tuneship.cli", "train", "--json"]  # fmt: skip
    gpu = distributed.launch_command(cfg, "cuda", ["--json"])
    assert gpu[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert gpu[gpu.index("--num_processes") + 1] == "2" and gpu[-4:] == [
        "-m",
        "tuneship.cli",
        "train",
        "--json",
    ]
    assert distributed.backend(cfg, "cpu") == "gloo" and distributed.backend(cfg, "cuda") == "nccl"


def test_fsdp_qlora_settings(monkeypatch):
    """The FSDP-QLoRA kwargs follow the bitsandbytes/PEFT recipe: storage dtype = compute dtype, no device_map,
    FSDP1 flat parameters, module states synced from rank 0."""
    import torch
    from transformers import BitsAndBytesConfig

    from tuneship.train import distributed
    from tuneship.train.config import TrainConfig

    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "false",
                 "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    cfg = TrainConfig.model_validate({"distributed": {"mode": "fsdp", "nproc": 2}})
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16
    )
    model_kwargs, sft_kwargs = {"quantization_config": q, "device_map": {"": 0}}, {}
    distributed.apply(cfg, "cuda", torch.bfloat16, model_kwargs, sft_kwargs)
    assert "device_map" not in model_kwargs
    assert sft_kwargs["fsdp"] == "full_shard auto_wrap" and sft_kwargs["ddp_backend"] == "nccl"
    fc = sft_kwargs["fsdp_config"]
    assert fc["version"] == 1 and fc["use_orig_params"] is False and fc["sync_module_states"] is True
    assert (
        os.environ["ACCELERATE_USE_FSDP"] == "true" and os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    )
    q16 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_quant_storage=torch.uint8
    )
    with pytest.raises(Exception, match="storage dtype"):
        distributed.apply(cfg, "cuda", torch.float16, {"quantization_config": q16}, {})


def test_lora_digest_sees_one_bit():
    import torch

    from tuneship.train.distributed import lora_digest

    m = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2, bias=False), "base": torch.nn.Linear(4, 4)})
    d0 = lora_digest(m)
    with torch.no_grad():
        m["base"].weight.add_(1)
    assert lora_digest(m) == d0, "frozen weights are not part of the digest"
    with torch.no_grad():
        m["lora_A"].weight.view(-1)[0] = torch.nextafter(m["lora_A"].weight.view(-1)[0], torch.tensor(2.0))
    assert lora_digest(m) != d0


# ---- slow: a real 2-process run through the CLI ----


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, timeout: float) -> None:
    """Until the checkpoint is complete: trainer state from rank 0, RNG state from both ranks."""
    needed = ["trainer_state.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"]
    end = time.time() + timeout
    while time.time() < end:
        if all((ckpt / n).exists() for n in needed):
            time.sleep(1.0)  # let the last file finish
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {ckpt.name} was complete")
        time.sleep(0.2)
    pytest.fail(f"{ckpt} not complete after {timeout} s")


def summary_json(stdout: str) -> dict:
    """The --json summary: the trainer's own progress lines may precede it on stdout."""
    start = stdout.index("\n{\n") + 1 if not stdout.startswith("{\n") else 0
    return json.loads(stdout[start:])


@pytest.mark.slow
def test_two_process_ddp_interrupt_resume(bundled_dir, demo_data, tmp_path):  # noqa: F811
    out_parent = tmp_path / "o"
    out = out_parent / "adapter"
    run_dir = out_parent / "adapter.run"
    cwd = tmp_path / "cwd"  # the workers' working dir: nothing may appear here
    cwd.mkdir()
    sets = [
        *data_sets(demo_data),
        "max_steps=4",
        "save_steps=2",
        "batch_size=2",
        "logging_steps=1",
        "max_length=192",
    ]
    cmd = [
        sys.executable,
        "-m",
        "tuneship.cli",
        *cli_args(*sets),
        "--out",
        str(out),
        "--nproc",
        "2",
        "--json",
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")

    # 1. Start, and interrupt the launcher once the step-2 checkpoint is on disk (it stops its workers).
    log1 = tmp_path / "run1.err"
    with open(log1, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for_checkpoint(proc, run_dir / "checkpoint-2", timeout=400)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = log1.read_text()
    assert "launching 2 ddp worker(s)" in first and "torch.distributed.run" in first
    assert proc.returncode != 0, "the first run was interrupted, not finished"
    assert not out.exists() and {p.name for p in out_parent.iterdir()} == {"adapter.run"}
    assert (run_dir / "checkpoint-2" / "rng_state_1.pth").exists(), (
        "rank 1 keeps its RNG state in the checkpoint"
    )

    # 2. Resume across both ranks.
    done = subprocess.run([*cmd, "--resume"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_json(done.stdout)
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 4
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    dist = summary["distributed"]
    assert dist["mode"] == "ddp" and dist["backend"] == "gloo"

    # Gradient sync: both ranks end with bit-identical LoRA weights (they trained on different rows).
    digests = dist["lora_sha256_per_rank"]
    assert len(digests) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    assert digests[0] == digests[1]
    rec = json.loads((out / "tuneship.json").read_text())
    assert rec["metrics"]["distributed"]["lora_sha256_per_rank"] == digests
    assert rec["config"]["distributed"] == {**rec["config"]["distributed"], "mode": "ddp", "nproc": 2}

    # Only rank 0 wrote: the artifact alone is left, the run dir is gone, nothing landed in the working dir.
    assert {p.name for p in out_parent.iterdir()} == {"adapter"}
    assert {"adapter_model.safetensors", "tuneship.json", "loss_curve.png", "log_history.json"} <= {
        p.name for p in out.iterdir()
    }
    assert list(cwd.iterdir()) == []
    # Logs come from rank 0 only.
    err = done.stderr
    assert err.count("adapter written to") == 1 and err.count("resuming from") == 1
    assert "rank 0 of 2" in err and "rank 1 of 2" not in err
    assert done.stdout.count('"adapter_dir"') == 1, "one summary, from rank 0"
