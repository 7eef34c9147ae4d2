"""Core session fixtures: the bundled model, the demo data, and one real QLoRA adapter shared by every test.

The adapter is trained once per session (a few CPU steps) and reused: merge, export, eval and serve tests all
build on it, so the heavy path runs once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE_STEPS = 6


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from tuneship.models import bundled_checkpoint

    return bundled_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from tuneship.data.demo import write_demo_data

    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(out)
    return out


def fixture_train_config(data: Path, out: Path, **overrides):
    from tuneship.config import load_config
    from tuneship.train.config import TrainConfig

    sets = [
        f"data.train={data / 'train.jsonl'}",
        "data.valid=null",
        f"data.system_prompt_file={data / 'system_prompt.txt'}",
        f"output_dir={out}",
        f"max_steps={FIXTURE_STEPS}",
        "batch_size=4",
        "save_steps=1000",
        "logging_steps=1",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(TrainConfig, "configs/demo.yaml", sets)


@pytest.fixture(scope="session")
def trained(bundled_dir, demo_data, tmp_path_factory) -> dict:
    """The summary of one real QLoRA run of the bundled model on the demo data (FIXTURE_STEPS steps)."""
    from tuneship.train.run import run_train

    out = tmp_path_factory.mktemp("train") / "adapter"
    return run_train(fixture_train_config(demo_data, out))


@pytest.fixture(scope="session")
def adapter_dir(trained) -> Path:
    return Path(trained["adapter_dir"])
