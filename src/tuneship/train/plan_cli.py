"""`tuneship plan`: predict a QLoRA step's peak GPU memory and pick batch settings that fit a card."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option
from tuneship.errors import TuneshipError


def model_shape(base_model: str, model_config: str | None):
    """The model's shape: --model-config, a local checkpoint dir, a built-in shape, or the local HF cache."""
    from pathlib import Path

    from tuneship.train.plan import BUILTIN, ModelShape, builtin_shape

    if model_config:
        return ModelShape.from_config(model_config)
    if Path(base_model).is_dir():
        return ModelShape.from_config(base_model)
    shape = builtin_shape(base_model)
    if shape:
        return shape
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # an id that is not a valid repo name, or no cache at all
        cached = None
    if isinstance(cached, str):
        return ModelShape.from_config(cached, name=base_model)
    raise TuneshipError(
        f"no local config for base_model {base_model!r}; pass --model-config path/to/config.json "
        f"or --model with a built-in shape ({', '.join(BUILTIN)})"
    )


def plan_summary(
    cfg,
    budget_bytes: float,
    target_batch: int | None,
    seq: int | None,
    model: str | None,
    model_config: str | None,
    gpu_label: str,
) -> dict:
    from tuneship.train.plan import GiB, RecipeOptions, choose, predict_peak

    shape = model_shape(model or cfg.base_model, model_config)
    seq = seq or cfg.max_length
    target = target_batch if target_batch is not None else cfg.batch_size * cfg.grad_accum
    modules = cfg.lora.modules()
    targets = tuple(m for m in shape.linear_shapes() if modules == "all-linear" or m in modules)
    base = RecipeOptions.from_speed(
        cfg.speed,
        load_in_4bit=cfg.quant.load_in_4bit,
        double_quant=cfg.quant.double_quant,
        lora_r=cfg.lora.r,
        lora_targets=targets,
        optim_bytes=8.0
        if (cfg.speed.enabled and cfg.speed.fused_optimizer) or "8bit" not in cfg.optim
        else 2.0,
    )
    if cfg.speed.enabled and cfg.speed.checkpointing not in ("auto",):
        policies: tuple[str, ...] = (cfg.speed.checkpointing,)
    elif not cfg.speed.enabled:
        policies = ("full",)
        base = RecipeOptions.stock(
            load_in_4bit=cfg.quant.load_in_4bit,
            double_quant=cfg.quant.double_quant,
            lora_r=cfg.lora.r,
            lora_targets=targets,
        )
    else:
        policies = ("off", "selective", "full")
    best, cands = choose(shape, seq, budget_bytes, target, base, policies)
    # The config's own micro-batch, with the policy checkpointing=auto would pick for it (as apply_speed does).
    for policy in policies:
        as_configured = predict_peak(
            shape, cfg.batch_size, seq, RecipeOptions(**(vars(base) | {"checkpointing": policy}))
        )
        if as_configured.total <= budget_bytes:
            break

    def row(c):
        return {
            "micro_batch": c.micro_batch,
            "grad_accum": c.grad_accum,
            "checkpointing": c.checkpointing,
            "fits": c.fits,
            "predicted_peak_gib": round(c.peak.total / GiB, 2),
            "breakdown_gib": c.peak.gib(),
        }

    return {
        "model": shape.name,
        "params": shape.params(),
        "gpu": gpu_label,
        "gpu_mem_gib": round(budget_bytes / GiB, 2),
        "seq_len": seq,
        "target_batch": target,
        "fits": best is not None,
        "choice": row(best) if best else None,
        "as_configured": {
            "micro_batch": cfg.batch_size,
            "checkpointing": policy,
            "predicted_peak_gib": round(as_configured.total / GiB, 2),
            "fits": as_configured.total <= budget_bytes,
        },
        "candidates": [row(c) for c in cands],
        "set": (
            [
                f"batch_size={best.micro_batch}",
                f"grad_accum={best.grad_accum}",
                f"speed.checkpointing={best.checkpointing}",
            ]
            if best
            else []
        ),
    }


def human(s: dict) -> str:
    lines = [
        f"{s['model']} ({s['params'] / 1e9:.2f}B params) on {s['gpu']} ({s['gpu_mem_gib']} GiB), "
        f"sequences of {s['seq_len']} tokens, effective batch {s['target_batch']}"
    ]
    for c in s["candidates"]:
        mark = "fits" if c["fits"] else "too big"
        lines.append(
            f"  micro-batch {c['micro_batch']:>3} x accum {c['grad_accum']:>3}, checkpointing "
            f"{c['checkpointing']:<9}: {c['predicted_peak_gib']:>7.2f} GiB  {mark}"
        )
    if s["choice"]:
        c = s["choice"]
        b = c["breakdown_gib"]
        lines.append(
            f"choice: micro-batch {c['micro_batch']}, gradient accumulation {c['grad_accum']}, checkpointing "
            f"{c['checkpointing']}: {c['predicted_peak_gib']} GiB (weights {b['weights']}, LoRA+optimizer "
            f"{b['lora']}, activations {b['activations']}, loss {b['loss']})"
        )
        lines.append("set: " + " ".join(f"--set {x}" for x in s["set"]))
    else:
        lines.append("nothing fits: shorten max_length, lower lora.r, or use a larger card")
    return "\n".join(lines)


@click.command(name="plan")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Train config YAML."
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable)."
)
@click.option("--gpu-mem", default=None, help="The card's memory, like 16GiB or 24GB.")
@click.option(
    "--gpu",
    "gpu_name",
    default=None,
    help="A known card: H100, H200, A100-80, A100-40, L4, A10G, T4, 4090, ...",
)
@click.option(
    "--target-batch",
    type=int,
    default=None,
    help="Effective batch in rows (default: batch_size x grad_accum).",
)
@click.option("--seq", type=int, default=None, help="Tokens per row (default: the config's max_length).")
@click.option(
    "--model",
    default=None,
    help="Model to plan for instead of base_model: a dir, an HF id, or a built-in shape.",
)
@click.option(
    "--model-config",
    type=click.Path(),
    default=None,
    help="The model's config.json (for a Hub id not cached here).",
)
@json_option
def plan(config_path, overrides, gpu_mem, gpu_name, target_batch, seq, model, model_config, as_json) -> None:
    """Predict the peak GPU memory of QLoRA training and pick micro-batch, accumulation and checkpointing that fit.

    \b
    Example: tuneship plan --config configs/train.yaml --gpu T4 --target-batch 16
    """
    from tuneship.config import load_config
    from tuneship.train.config import TrainConfig
    from tuneship.train.plan import gpu_memory, parse_mem

    if bool(gpu_mem) == bool(gpu_name):
        raise TuneshipError("give exactly one of --gpu-mem (like 16GiB) or --gpu (like T4)")
    budget = parse_mem(gpu_mem) if gpu_mem else gpu_memory(gpu_name)
    label = gpu_name or gpu_mem
    cfg = load_config(TrainConfig, config_path, overrides)
    summary = plan_summary(cfg, budget, target_batch, seq, model, model_config, label)
    emit(summary, as_json, human(summary))
