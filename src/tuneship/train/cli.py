"""`tuneship train`."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option, overwrite_option
from tuneship.config import config_help, load_config
from tuneship.errors import TuneshipError
from tuneship.train.config import TrainConfig

KEYS = "\n".join("  " + line for line in config_help(TrainConfig))


@click.command(
    epilog="\b\nConfig keys (YAML, or --set key=value) [default]:\n" + KEYS,
    context_settings={"max_content_width": 120},
)
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file (see configs/)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set lora.r=8.",
)
@click.option("--out", "output_dir", help="Shortcut for --set output_dir=DIR.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the last checkpoint of an interrupted run with the same output_dir.",
)
@click.option("--register", metavar="NAME", help="Register the adapter in the registry as NAME@vN when done.")
@click.option("--root", "registry_root", help="Registry root (default: $TUNESHIP_REGISTRY or ./registry).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit without training.")
@click.option(
    "--nproc",
    type=click.IntRange(1),
    help="Train with N processes, one per GPU (gloo on the CPU); N > 1 means DDP "
    "unless distributed.mode=fsdp. The command re-runs itself through accelerate launch (torchrun on the CPU).",
)
@overwrite_option
@json_option
def train(
    config_path,
    overrides,
    output_dir,
    resume,
    register,
    registry_root,
    print_config,
    nproc,
    overwrite,
    as_json,
) -> None:
    """QLoRA-train an adapter with TRL's SFTTrainer (NF4 + double quant, paged 8-bit AdamW, completion-only loss).

    Writes OUTPUT_DIR with the adapter, tokenizer, loss_curve.png and a tuneship.json record (config, base
    model identity, dataset sha256, chat template sha256, stop tokens, loss, tokens/s, peak memory, wall time).
    Checkpoints go to OUTPUT_DIR.run/ so an interrupted run continues with --resume.
    """
    from tuneship.train import distributed

    cfg = distributed.resolve(load_config(TrainConfig, config_path, overrides, output_dir=output_dir), nproc)
    if print_config:
        emit(cfg.model_dump(), True)
        return
    from tuneship.train.run import run_train

    if distributed.needs_launch(cfg):
        from tuneship.models import BUNDLED_PREFIX, bundled_checkpoint
        from tuneship.train.run import check_inputs, pick_device

        check_inputs(cfg, resume, overwrite, register)
        device = pick_device(cfg)
        distributed.check(cfg, device)
        if cfg.base_model.startswith(BUNDLED_PREFIX):  # convert it once here, not in every worker at once
            bundled_checkpoint(cfg.base_model.removeprefix(BUNDLED_PREFIX))
        d = cfg.distributed
        args = [*(["--config", config_path] if config_path else []), *[x for o in overrides for x in ("--set", o)],
                *(["--out", output_dir] if output_dir else []), "--set", f"distributed.mode={d.mode}",
                "--set", f"distributed.nproc={d.nproc}", *(["--resume"] if resume else []),
                *(["--register", register] if register else []), *(["--root", registry_root] if registry_root else []),
                *(["--overwrite"] if overwrite else []), *(["--json"] if as_json else [])]  # fmt: skip
        rc = distributed.launch(cfg, device, args)
        if rc:
            raise TuneshipError(
                f"{d.mode} training with {d.nproc} processes failed (exit status {rc}); see the workers' errors above"
            )
        return
    summary = run_train(
        cfg, resume=resume, overwrite=overwrite, register=register, registry_root=registry_root
    )
    if not distributed.is_main():
        return  # rank 0 reports
    summary.pop("record", None)
    emit(
        summary,
        as_json,
        f"adapter: {summary['adapter_dir']}  loss {summary['final_loss']}  {summary['tokens_per_s']} tok/s",
    )
