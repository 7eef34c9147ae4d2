"""Train: QLoRA with TRL's SFTTrainer. `run_train(cfg)` returns the adapter directory."""

from tuneship.train.config import TrainConfig

__all__ = ["TrainConfig", "run_train"]


def run_train(*args, **kwargs):
    from tuneship.train.run import run_train as _run

    return _run(*args, **kwargs)
