"""GPU speed levers for the train stage.

Contract with `tuneship.train.run`: `SpeedConfig` is the `speed:` section of the train config; `apply_speed` edits
the `from_pretrained` kwargs and the `SFTConfig` kwargs before the model is built; `patch_model` runs after the base
is loaded (and after peft's k-bit preparation). Both return human-readable notes. GPU-only levers switch themselves
off on the CPU, with a note saying why, so the CPU path keeps working.

The defaults are the recipe that won `bench/train_speed.py` on an H100 (see bench/results/train_speed.json). Every
lever can be switched off on its own; `speed.enabled=false` switches them all off (the stock Hugging Face recipe).
What each lever does, in short:
- keep_bf16: peft's `prepare_model_for_kbit_training` upcasts every non-quantized weight (embeddings, tied LM head,
  norms) to fp32, which turns the residual stream, attention and the LM head matmul into fp32 work. We cast them back
  to the compute dtype; LoRA weights stay trainable and inputs keep their gradients.
- liger_rms_norm / liger_swiglu / liger_rope: Liger Kernel's Triton kernels for those layers (less memory traffic,
  fewer saved activations).
- checkpointing: "off" skips the forward recompute (a third of the work) when the activations fit; "auto" asks the
  memory planner (`tuneship plan`) whether they fit on this card.
- TRL's SFTTrainer already computes the loss through its fused, chunked LM head (the full logits are never
  materialized); the benchmark measures that against the stock full-logits loss.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, PrivateAttr

from tuneship.config import StageConfig
from tuneship.errors import TuneshipError


class SpeedConfig(StageConfig):
    enabled: bool = Field(
        True,
        description="Master switch: false gives the stock Hugging Face QLoRA recipe (every lever below off).",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel: auto = flash_attention_2 when the flash_attn package is installed on a GPU, else sdpa.",
    )
    keep_bf16: bool = Field(
        True,
        description="Keep non-quantized base weights (embeddings, LM head, norms) in the compute dtype instead of peft's fp32 upcast (GPU only).",
    )
    liger_rms_norm: bool = Field(
        True, description="Liger Kernel's fused RMSNorm (GPU only; needs liger-kernel)."
    )
    liger_swiglu: bool = Field(
        True,
        description="Liger Kernel's fused SwiGLU MLP, which recomputes the activation in backward (GPU only).",
    )
    liger_rope: bool = Field(True, description="Liger Kernel's fused rotary embedding (GPU only).")
    checkpointing: Literal["auto", "full", "selective", "off"] = Field(
        "auto",
        description="Activation checkpointing: full (recompute every layer), selective (keep attention outputs), off, or auto "
        "(on a GPU: off when the memory planner says activations fit the card, else full; on the CPU: the train config's "
        "gradient_checkpointing is kept).",
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Share of the card's memory that checkpointing=auto plans to use."
    )
    padding_free: bool = Field(
        False,
        description="Pack each batch's rows into one sequence without pad tokens (GPU only; needs flash_attention_2, so it stays off with sdpa).",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the model (GPU only; off by default: see the benchmark notes)."
    )

    _resolved: dict = PrivateAttr(default_factory=dict)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_attention(cfg: SpeedConfig, device: str) -> str:
    if not cfg.enabled:
        return "sdpa"
    if cfg.attn_implementation == "auto":
        return "flash_attention_2" if device == "cuda" and _has("flash_attn") else "sdpa"
    if cfg.attn_implementation == "flash_attention_2":
        if device != "cuda":
            raise TuneshipError(
                "speed.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on the CPU"
            )
        if not _has("flash_attn"):
            raise TuneshipError(
                "speed.attn_implementation=flash_attention_2 needs the flash_attn package; install it or use sdpa"
            )
    return cfg.attn_implementation


def _planned_checkpointing(cfg: SpeedConfig, sft_kwargs: dict, model_config: Any) -> tuple[str, str]:
    """checkpointing=auto on a GPU: the cheapest policy that the planner fits into this card."""
    import torch

    from tuneship.train.plan import ModelShape, RecipeOptions, predict_peak

    total = torch.cuda.get_device_properties(0).total_memory
    budget = total * cfg.memory_fraction
    shape = ModelShape.from_config(model_config)
    batch = int(sft_kwargs.get("per_device_train_batch_size", 8))
    seq = int(sft_kwargs.get("max_length") or 1024)
    for policy in ("off", "selective", "full"):
        opts = RecipeOptions.from_speed(cfg, checkpointing=policy)
        peak = predict_peak(shape, batch, seq, opts).total
        if peak <= budget:
            return (
                policy,
                f"{peak / 2**30:.1f} GiB predicted at batch {batch} x {seq} (budget {budget / 2**30:.1f} GiB)",
            )
    return (
        "full",
        f"even full checkpointing is predicted over the {budget / 2**30:.1f} GiB budget at batch {batch} x {seq}",
    )


def apply_speed(
    cfg: SpeedConfig, device: str, model_kwargs: dict, sft_kwargs: dict, model_config: Any = None
) -> list[str]:
    """Set the chosen levers in the from_pretrained kwargs and the SFTConfig kwargs. Returns notes for the log.

    `model_config` (an HF config, a config.json path or a checkpoint dir) lets checkpointing=auto ask the planner;
    without it, auto keeps full checkpointing on a GPU.
    """
    notes: list[str] = []
    cfg._resolved = {}
    model_kwargs["attn_implementation"] = resolve_attention(cfg, device)
    if not cfg.enabled:
        notes.append("speed: all levers off (speed.enabled=false): stock recipe")
        cfg._resolved["checkpointing"] = "full" if sft_kwargs.get("gradient_checkpointing", True) else "off"
        return notes
    notes.append(f"speed: attention = {model_kwargs['attn_implementation']}")

    # Activation checkpointing.
    policy = cfg.checkpointing
    if device != "cuda":
        if policy == "auto":
            policy = "full" if sft_kwargs.get("gradient_checkpointing", True) else "off"
        elif policy == "selective":
            notes.append("speed: selective checkpointing is a GPU lever; using full checkpointing on the CPU")
            policy = "full"
    elif policy == "auto":
        if model_config is None:
            policy = "full"
            notes.append("speed: checkpointing=auto without the model's shape: keeping full checkpointing")
        else:
            policy, why = _planned_checkpointing(cfg, sft_kwargs, model_config)
            notes.append(f"speed: checkpointing=auto chose {policy}: {why}")
    cfg._resolved["checkpointing"] = policy
    if policy == "off":
        sft_kwargs["gradient_checkpointing"] = False
        sft_kwargs["gradient_checkpointing_kwargs"] = None
    else:
        sft_kwargs["gradient_checkpointing"] = True
        kw = dict(sft_kwargs.get("gradient_checkpointing_kwargs") or {})
        kw["use_reentrant"] = False
        if policy == "selective":
            kw["selective"] = True
        else:
            kw.pop("selective", None)
        sft_kwargs["gradient_checkpointing_kwargs"] = kw
    notes.append(f"speed: activation checkpointing = {policy}")

    if cfg.padding_free:
        if device != "cuda":
            notes.append("speed: padding_free is off on the CPU (it needs flash attention on a GPU)")
        elif model_kwargs["attn_implementation"] != "flash_attention_2":
            notes.append(
                "speed: padding_free is off: it needs attn_implementation=flash_attention_2 (flash_attn not installed)"
            )
        else:
            sft_kwargs["padding_free"] = True
            notes.append("speed: padding-free batches (no pad tokens)")
    if cfg.torch_compile:
        if device != "cuda":
            notes.append("speed: torch_compile is off on the CPU")
        else:
            sft_kwargs["torch_compile"] = True
            notes.append("speed: torch.compile on")
    return notes


def _liger_kwargs(cfg: SpeedConfig) -> dict:
    return {
        "rms_norm": cfg.liger_rms_norm,
        "swiglu": cfg.liger_swiglu,
        "rope": cfg.liger_rope,
        "fused_linear_cross_entropy": False,  # TRL's fused LM head computes the loss
        "cross_entropy": False,
    }


def cast_frozen_to(model, dtype) -> int:
    """Cast frozen, non-quantized floating-point weights (peft's fp32 upcast) back to `dtype`. Returns the count."""
    import torch

    n = 0
    for param in model.parameters():
        if param.requires_grad or param.dtype != torch.float32 or param.__class__.__name__ == "Params4bit":
            continue
        param.data = param.data.to(dtype)
        n += 1
    return n


def patch_model(cfg: SpeedConfig, model, device: str, compute_dtype=None) -> list[str]:
    """Levers that need the loaded model: undo peft's fp32 upcast, Liger kernels, the checkpointing decision.
    Call after `prepare_model_for_kbit_training` (if used) and before LoRA is attached."""
    import torch

    notes: list[str] = []
    if not cfg.enabled:
        return notes
    policy = cfg._resolved.get("checkpointing")
    if policy == "off" and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
        notes.append("speed: gradient checkpointing disabled on the model (checkpointing=off)")
    if policy == "selective":
        from trl.models.selective_activation_checkpointing import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model)
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device != "cuda":
        if cfg.keep_bf16 or cfg.liger_rms_norm or cfg.liger_swiglu or cfg.liger_rope:
            notes.append("speed: keep_bf16 and the Liger kernels are GPU levers; off on the CPU")
        return notes
    if cfg.keep_bf16:
        dtype = compute_dtype or getattr(getattr(model, "config", None), "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype == torch.float32:
            dtype = torch.bfloat16
        n = cast_frozen_to(model, dtype)
        if n:
            notes.append(
                f"speed: kept {n} non-quantized base weights in {str(dtype).removeprefix('torch.')} (no fp32 upcast)"
            )
    liger = _liger_kwargs(cfg)
    if any(liger.values()):
        if not _has("liger_kernel"):
            notes.append("speed: liger-kernel is not installed; Liger kernels off (pip install liger-kernel)")
        else:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model, **liger)
            on = [k for k, v in liger.items() if v]
            notes.append(f"speed: Liger kernels applied ({', '.join(on)})")
    return notes
