"""QLoRA training through TRL's SFTTrainer, written as one resumable run that ends in an atomic adapter artifact.

Layout for `output_dir = out/adapter`:
- `out/adapter.run/`: the working directory: checkpoints (for --resume) and the trainer's logs;
- `out/adapter/`: the finished adapter (adapter_config.json, adapter_model.safetensors, tokenizer, tuneship.json,
  loss_curve.png, log_history.json), renamed into place only when training and saving completed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuneship.artifacts import RECORD, atomic_dir, read_record, write_record
from tuneship.errors import TuneshipError
from tuneship.progress import log
from tuneship.train import distributed
from tuneship.train.config import TrainConfig


@dataclass
class Setup:
    trainer: object
    tokenizer: object
    base: object  # ModelSpec
    device: str
    notes: list[str]
    n_train: int
    system_prompt: str | None


def pick_device(cfg: TrainConfig) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise TuneshipError(
            "device: cuda was asked for but no GPU is visible; use --set device=cpu or run on a GPU host"
        )
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and has_cuda) else "cpu"


def compute_dtype(cfg: TrainConfig, device: str, notes: list[str]):
    import torch

    name = cfg.quant.compute_dtype
    if device == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        notes.append("bf16 is not supported on this GPU; computing in float16 instead")
        name = "float16"
    return getattr(torch, name)


def dataset_sha256(cfg: TrainConfig) -> str:
    """The dataset's hash: from the dataset record beside the train file (written by `data prepare` or
    `data demo`) when there is one, else the same framed hash over the train and valid files."""
    train = Path(cfg.data.train)
    rec = train.parent / RECORD
    if rec.exists():
        try:
            data = read_record(train.parent, kind="dataset")
            if data.get("sha256"):
                return data["sha256"]
        except TuneshipError:
            pass
    from tuneship.data.hashing import dataset_sha256 as files_sha256

    return files_sha256([train] + ([Path(cfg.data.valid)] if cfg.data.valid else []))


def load_rows(path: str, cfg: TrainConfig, system: str | None):
    from datasets import Dataset

    from tuneship.data.schema import read_examples

    examples = read_examples(path, fmt=cfg.data.format, system=system)
    rows = [{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]} for ex in examples]
    return Dataset.from_list(rows)


def build(cfg: TrainConfig, run_dir: Path) -> Setup:
    """Load data, tokenizer and the quantized base, attach LoRA, and build the SFTTrainer (no training yet)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from tuneship.models import load_tokenizer, resolve
    from tuneship.train import speed

    notes: list[str] = []
    device = pick_device(cfg)
    if device == "cpu":
        torch.set_num_threads(distributed.cpu_threads(cfg))
    base = resolve(cfg.base_model, allow_pickle=cfg.allow_pickle)
    if base.kind != "hf":
        raise TuneshipError(
            f"base_model {cfg.base_model!r} is a {base.kind}; training needs an HF checkpoint or bundled:NAME"
        )
    system = cfg.system_prompt()
    train_ds = load_rows(cfg.data.train, cfg, system)
    valid_ds = load_rows(cfg.data.valid, cfg, system) if cfg.data.valid else None

    tok = load_tokenizer(base.path)
    if not tok.chat_template:
        raise TuneshipError(
            f"base model {cfg.base_model} has no chat template; training uses the chat template"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    dtype = compute_dtype(cfg, device, notes)
    model_kwargs: dict = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": not cfg.allow_pickle}
    if cfg.quant.load_in_4bit:
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype
            if cfg.quant.quant_storage == "auto"
            else getattr(torch, cfg.quant.quant_storage),
        )
    model_kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}

    per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(len(train_ds) / per_step) * cfg.num_epochs
    sft_kwargs: dict = dict(
        output_dir=str(run_dir),
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        optim=cfg.optim,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        max_length=cfg.max_length,
        completion_only_loss=True,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * total)),
        weight_decay=cfg.weight_decay,
        eval_strategy="steps" if valid_ds is not None else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    notes += speed.apply_speed(cfg.speed, device, model_kwargs, sft_kwargs)
    notes += distributed.apply(cfg, device, dtype, model_kwargs, sft_kwargs)

    model = AutoModelForCausalLM.from_pretrained(base.path, **model_kwargs)
    if (
        cfg.quant.load_in_4bit and cfg.distributed.mode != "fsdp"
    ):  # FSDP: no fp32 upcast, one dtype throughout
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=sft_kwargs["gradient_checkpointing_kwargs"],
        )
    notes += speed.patch_model(cfg.speed, model, device)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.modules(),
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**sft_kwargs),
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        processing_class=tok,
        peft_config=lora,
    )
    notes += speed.patch_trainer(cfg.speed, trainer, device)
    for n in notes if distributed.is_main() else []:
        log(n)
    return Setup(trainer, tok, base, device, notes, len(train_ds), system)


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def check_inputs(
    cfg: TrainConfig, resume: bool = False, overwrite: bool = False, register: str | None = None
) -> tuple[Path, str | None]:
    """The checks that need no model, run before any process starts: returns (run dir, checkpoint to resume)."""
    out = Path(cfg.output_dir)
    if out.exists() and not overwrite:
        raise TuneshipError(f"output {out} already exists; choose another output_dir or pass --overwrite")
    if register:
        from tuneship.registry import check_name

        check_name(register)
    for split in ("train", "valid"):
        path = getattr(cfg.data, split)
        if path and not Path(path).exists():
            raise TuneshipError(
                f"data.{split} file {path} does not exist; run `make data` or point data.{split} at your file"
            )
    run_dir = out.with_name(out.name + ".run")
    ckpt = last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise TuneshipError(f"--resume: no checkpoint in {run_dir}; start without --resume")
    return run_dir, ckpt


def run_train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    register: str | None = None,
    registry_root: str | None = None,
) -> dict:
    """Train, then write the adapter atomically. Returns the run's summary (also stored in the record).

    Inside a launched worker (see `tuneship.train.distributed`) every rank trains; rank 0 alone prepares and
    removes the run dir and writes the adapter and its record; the others wait at barriers and return {"rank": N}."""
    from tuneship.models import chat_template_info

    out = Path(cfg.output_dir)
    run_dir, ckpt = check_inputs(cfg, resume, overwrite, register)
    main = distributed.is_main()
    distributed.init(cfg, pick_device(cfg))
    if main:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    distributed.barrier()

    t0 = time.time()
    try:
        setup = build(cfg, run_dir)
    except BaseException:
        if main and not resume:  # nothing trained yet: leave no working dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    trainer = setup.trainer
    if ckpt and main:
        log(f"resuming from {ckpt}")
    result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.time() - t0
    state = distributed.adapter_state(cfg, trainer)  # a collective under FSDP; None otherwise
    digest = distributed.lora_digest(trainer.model, state) if state is None or main else None
    per_rank = distributed.gather(
        {"lora_sha256": digest, "peak_mem_gib": round(peak_memory_gib(setup.device), 3)}
    )
    if not main:
        distributed.finish()
        return {"rank": distributed.rank()}
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)  # summed over the ranks by the Trainer
    train_seconds = result.metrics.get("train_runtime") or wall
    world = distributed.world_size()
    metrics = {
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": trainer.state.global_step,
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in per_rank),
        "wall_s": round(wall, 1),
        "train_s": round(train_seconds, 1),
        "device": setup.device,
        "resumed_from": Path(ckpt).name if ckpt else None,
        "world_size": world,
    }
    if distributed.in_worker():
        metrics["distributed"] = {
            "mode": cfg.distributed.mode,
            "backend": distributed.backend(cfg, setup.device),
            "tokens_per_s_per_process": round(tokens / train_seconds / world, 1) if train_seconds else None,
            "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in per_rank],
            "lora_sha256_per_rank": [r["lora_sha256"] for r in per_rank],
        }
    template = chat_template_info(setup.tokenizer)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model = trainer.accelerator.unwrap_model(trainer.model) if state is not None else trainer.model
            model.save_pretrained(
                tmp, safe_serialization=True, **({"state_dict": state} if state is not None else {})
            )
            setup.tokenizer.save_pretrained(tmp)
            (tmp / "log_history.json").write_text(json.dumps(history, indent=1))
            plot_loss(history, tmp / "loss_curve.png")
            record = write_record(
                tmp,
                "adapter",
                base_model=setup.base.identity,
                dataset_sha256=dataset_sha256(cfg),
                data_files={k: str(getattr(cfg.data, k)) for k in ("train", "valid") if getattr(cfg.data, k)},
                system_prompt=setup.system_prompt,
                **template,
                lora={
                    "r": cfg.lora.r,
                    "alpha": cfg.lora.alpha,
                    "target_modules": cfg.lora.modules(),
                    "dropout": cfg.lora.dropout,
                },
                config=cfg.model_dump(),
                metrics=metrics,
                notes=setup.notes,
            )
        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        distributed.finish()
    summary = {"adapter_dir": str(out), **metrics}
    if register:
        from tuneship.registry import add_version

        summary["registered"] = add_version(out, register, root=registry_root)
    log(
        f"adapter written to {out} (loss {metrics['final_loss']}, {metrics['tokens_per_s']} tok/s, {wall:.0f} s)"
    )
    return summary | {"record": record}


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="valid loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
