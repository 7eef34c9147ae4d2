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
    fused_optimizer: bool = Field(
        True,
        description="On a GPU, replace the (paged) 8-bit AdamW, which makes one Python call per LoRA tensor, with torch's "
        "fused AdamW (one kernel; fp32 states cost 8 bytes per LoRA parameter, ~150 MB at r=16 on a 1.5B model).",
    )
    fused_lora: bool = Field(
        True,
        description="On a GPU, add each 4-bit layer's LoRA branch with one addmm (scale and add fused into the matmul) "
        "instead of peft's clone + multiply + add over the layer's whole output.",
    )
    lora_fp32: bool = Field(
        False,
        description="Keep the LoRA weights in fp32 (computed in bf16 under autocast) instead of TRL's bf16 cast; "
        "needs patch_trainer after the SFTTrainer is built.",
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

    from tuneship.train.plan import ModelShape, RecipeOptions, auto_checkpointing

    budget = torch.cuda.get_device_properties(0).total_memory * cfg.memory_fraction
    shape = ModelShape.from_config(model_config)
    batch = int(sft_kwargs.get("per_device_train_batch_size", 8))
    seq = int(sft_kwargs.get("max_length") or 1024)
    policy, peak = auto_checkpointing(shape, batch, seq, RecipeOptions.from_speed(cfg), budget)
    fits = "" if peak.total <= budget else " (over budget even so)"
    return (
        policy,
        f"{peak.total / 2**30:.1f} GiB predicted at batch {batch} x {seq}{fits} (budget {budget / 2**30:.1f} GiB)",
    )


def _set_checkpointing(sft_kwargs: dict, policy: str) -> None:
    if policy == "off":
        sft_kwargs["gradient_checkpointing"] = False
        sft_kwargs["gradient_checkpointing_kwargs"] = None
        return
    sft_kwargs["gradient_checkpointing"] = True
    kw = dict(sft_kwargs.get("gradient_checkpointing_kwargs") or {})
    kw["use_reentrant"] = False
    if policy == "selective":
        kw["selective"] = True
    else:
        kw.pop("selective", None)
    sft_kwargs["gradient_checkpointing_kwargs"] = kw


def apply_speed(
    cfg: SpeedConfig, device: str, model_kwargs: dict, sft_kwargs: dict, model_config: Any = None
) -> list[str]:
    """Set the chosen levers in the from_pretrained kwargs and the SFTConfig kwargs. Returns notes for the log.

    `model_config` (an HF config, a config.json path or a checkpoint dir) lets checkpointing=auto ask the planner;
    without it, patch_model decides from the loaded model's config and edits these same `sft_kwargs` (so build the
    SFTConfig from them after patch_model).
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
            # decided in patch_model from the loaded model's config; full checkpointing until then
            policy = "deferred"
            cfg._resolved["sft_kwargs"] = sft_kwargs
        else:
            policy, why = _planned_checkpointing(cfg, sft_kwargs, model_config)
            notes.append(f"speed: checkpointing=auto chose {policy}: {why}")
    cfg._resolved["checkpointing"] = policy
    _set_checkpointing(sft_kwargs, policy)
    if policy != "deferred":
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
    if cfg.fused_optimizer and device == "cuda":
        optim = sft_kwargs.get("optim", "paged_adamw_8bit")
        if optim in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"):
            sft_kwargs["optim"] = "adamw_torch_fused"
            notes.append(
                f"speed: optimizer {optim} -> adamw_torch_fused (one fused kernel for all LoRA tensors)"
            )
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


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's 4-bit LoRA forward with the LoRA branch fused into one addmm: result + scaling * (A x) B^T.

    Same math as peft's `result.clone() + lora_B(lora_A(dropout(x))) * scaling`, with one rounding instead of
    three and without three passes over the layer's output. Anything unusual goes to peft's own forward."""
    import torch

    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or len(self.active_adapters) != 1
        or self.active_adapters[0] in getattr(self, "lora_variant", {})
        or self.active_adapters[0] not in self.lora_A
    ):
        return _PEFT_FORWARD[0](self, x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if not torch.is_autocast_enabled() and not (x.dtype == lora_A.weight.dtype == lora_B.weight.dtype):
        return _PEFT_FORWARD[0](self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    for key in _VARIANT_KEYS:
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    a = lora_A(self.lora_dropout[name](x))
    n = result.shape[-1]
    out = torch.addmm(
        result.reshape(-1, n), a.reshape(-1, a.shape[-1]), lora_B.weight.t(), alpha=self.scaling[name]
    )
    return out.view(result.shape)


_PEFT_FORWARD: list = []
_VARIANT_KEYS: list[str] = []


def enable_fused_lora() -> bool:
    """Route peft's 4-bit LoRA layers through `_fused_lora_forward` (class-level, idempotent). False if unavailable."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return False
    cls = getattr(peft_bnb, "Linear4bit", None)
    if cls is None:
        return False
    if not _PEFT_FORWARD:
        _PEFT_FORWARD.append(cls.forward)
        _VARIANT_KEYS.extend(getattr(peft_bnb, "VARIANT_KWARG_KEYS", ()))
    cls.forward = _fused_lora_forward
    return True


def disable_fused_lora() -> None:
    if _PEFT_FORWARD:
        from peft.tuners.lora import bnb as peft_bnb

        peft_bnb.Linear4bit.forward = _PEFT_FORWARD[0]


def patch_trainer(cfg: SpeedConfig, trainer, device: str) -> list[str]:
    """Levers that need the built SFTTrainer (call before `trainer.train()`): fp32 LoRA weights."""
    import torch

    if not (cfg.enabled and cfg.lora_fp32 and device == "cuda"):
        return []
    n = 0
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return [f"speed: {n} LoRA tensors kept in fp32 (computed in bf16 under autocast)"] if n else []


def patch_model(cfg: SpeedConfig, model, device: str, compute_dtype=None) -> list[str]:
    """Levers that need the loaded model: undo peft's fp32 upcast, Liger kernels, the checkpointing decision.
    Call after `prepare_model_for_kbit_training` (if used) and before LoRA is attached."""
    import torch

    notes: list[str] = []
    if not cfg.enabled:
        return notes
    policy = cfg._resolved.get("checkpointing")
    if policy == "deferred":
        # checkpointing=auto when apply_speed had no model shape: plan from the loaded model's config, and edit the
        # SFTConfig kwargs that apply_speed was given (the trainer is built from them after this call)
        sft_kwargs = cfg._resolved.pop("sft_kwargs")
        if device == "cuda":
            policy, why = _planned_checkpointing(cfg, sft_kwargs, model.config)
            notes.append(f"speed: checkpointing=auto chose {policy}: {why}")
        else:
            policy = "full" if sft_kwargs.get("gradient_checkpointing", True) else "off"
        cfg._resolved["checkpointing"] = policy
        _set_checkpointing(sft_kwargs, policy)
        notes.append(f"speed: activation checkpointing = {policy}")
    if policy == "off" and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
        notes.append("speed: gradient checkpointing disabled on the model (checkpointing=off)")
    if policy == "selective":
        from trl.models.selective_activation_checkpointing import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model)
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device != "cuda":
        if cfg.fused_lora:
            disable_fused_lora()
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
    if cfg.fused_lora:
        if enable_fused_lora():
            notes.append("speed: fused LoRA add (one addmm per 4-bit layer)")
    else:
        disable_fused_lora()
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
