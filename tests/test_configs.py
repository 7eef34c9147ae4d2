"""Every shipped YAML config loads and validates, found recursively, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneship.config import load_config, read_yaml

CONFIGS = sorted(Path("configs").rglob("*.y*ml"))


def config_class(data: dict):
    from tuneship.train.config import TrainConfig

    return TrainConfig


def test_configs_exist():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_validates(path: Path):
    cfg = load_config(config_class(read_yaml(path)), path)
    assert cfg.model_dump()


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_is_headed_by_its_command(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# tuneship "), f"{path} should start with the command that runs it"
