"""The train stage's typed config. Help text is written once, here, and rendered into `tuneship train --help`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tuneship.config import StageConfig
from tuneship.models import DEFAULT_MODEL
from tuneship.train.distributed import DistributedSection
from tuneship.train.speed import SpeedConfig

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class DataSection(StageConfig):
    train: str = Field(
        "data/demo/train.jsonl", description="Training rows (JSONL, any shape `data prepare` accepts)."
    )
    valid: str | None = Field(
        "data/demo/valid.jsonl", description="Validation rows, evaluated every eval_steps; null to skip."
    )
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "input_output"] = Field(
        "auto", description="Row shape; auto-detected per row by default."
    )
    system_prompt: str | None = Field(
        None, description="System prompt added to rows without one; recorded for eval and export."
    )
    system_prompt_file: str | None = Field(None, description="Read the system prompt from this file instead.")


class LoraSection(StageConfig):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "all-linear",
        description="Which layers get adapters: 'attention' (q,k,v,o), 'all-linear', or a list of module names.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules list is empty; use 'attention', 'all-linear' or module names")
        return v

    def modules(self) -> str | list[str]:
        return ATTENTION_MODULES if self.target_modules == "attention" else self.target_modules


class QuantSection(StageConfig):
    load_in_4bit: bool = Field(
        True, description="QLoRA: load the frozen base in 4 bits with bitsandbytes (false = plain LoRA)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Also quantize the quantization constants (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Compute dtype; bfloat16 falls back to float16 on GPUs without bf16, with a log line.",
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype the packed 4-bit weights are stored in: auto = the compute dtype; FSDP needs exactly that.",
    )


class TrainConfig(StageConfig):
    base_model: str = Field(
        DEFAULT_MODEL, description="Base model: bundled:NAME, an HF id or a local checkpoint dir."
    )
    output_dir: str = Field(
        "out/adapter", description="Where the adapter is written (refused if it exists, unless --overwrite)."
    )
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        "paged_adamw_8bit", description="Optimizer (bitsandbytes paged 8-bit AdamW by default)."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_epochs: float = Field(
        1.0, gt=0, description="Epochs over the training rows (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use num_epochs).")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per device.")
    grad_accum: int = Field(
        1,
        ge=1,
        description="Gradient accumulation steps (effective batch = batch_size * grad_accum * processes).",
    )
    max_length: int = Field(512, ge=16, description="Rows are truncated to this many tokens.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward to save memory."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of steps spent warming up the learning rate."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_steps: int = Field(50, ge=1, description="Evaluate on data.valid every this many steps.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when a GPU is present, else cpu."
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores).")
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin) base weights. Off: they can run code."
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @field_validator("distributed")
    @classmethod
    def _fsdp_storage_matches_compute(cls, d: DistributedSection, info: ValidationInfo):
        q = info.data.get("quant")
        if q and d.mode == "fsdp" and q.load_in_4bit and q.quant_storage not in ("auto", q.compute_dtype):
            raise PydanticCustomError(
                "fsdp_storage",
                "mode=fsdp with 4-bit weights needs quant.quant_storage equal to quant.compute_dtype ({c}), not {s}: "
                "FSDP shards only layers of one float dtype; set quant.quant_storage=auto",
                {"c": q.compute_dtype, "s": q.quant_storage},
            )
        return d

    def system_prompt(self) -> str | None:
        if self.data.system_prompt_file:
            from pathlib import Path

            from tuneship.errors import TuneshipError

            p = Path(self.data.system_prompt_file)
            if not p.exists():
                raise TuneshipError(f"data.system_prompt_file {p} does not exist")
            return p.read_text().strip()
        return self.data.system_prompt
