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
- fused_qlora: at batch 8 x 1024 the step was bound by the host CPU (Python and autograd over 196 LoRA-wrapped
  4-bit layers). `QLoRALinearFn` makes each such layer one autograd node (dequantize, x W^T, the LoRA branch by
  addmm; backward in a few matmuls), and fused_qlora_save_weights keeps the dequantized weight for backward.
- compile_layers: torch.compile per decoder layer (patch_trainer, once LoRA is attached); the fused layer traces
  into the graph. Liger's kernels are left out then: inductor fuses those ops itself, and faster.
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
    fused_qlora: bool = Field(
        True,
        description="On a GPU, run each 4-bit LoRA layer in training as one autograd function (dequantize the NF4 weight, "
        "x W^T, the LoRA branch fused by addmm; backward in a few matmuls) instead of ~6 autograd nodes: less Python per "
        "step. The LoRA weights stay peft's parameters; generation and eval keep bitsandbytes' own path.",
    )
    fused_qlora_save_weights: bool = Field(
        True,
        description="With fused_qlora: keep each layer's dequantized weight from forward for backward instead of "
        "dequantizing it again (one kernel and its Python call less per layer; without checkpointing it costs 2 bytes "
        "per base weight, ~2.5 GiB on a 1.5B model, which checkpointing=auto plans for; off with selective checkpointing).",
    )
    compile_layers: bool = Field(
        True,
        description="torch.compile each decoder layer (regional compile: the identical layers share one graph, "
        "~15 s at the first step), after LoRA is attached. Inductor then fuses RMSNorm, SwiGLU and RoPE itself, so "
        "the Liger kernels are not applied (measured slower inside compiled layers). GPU only; off under FSDP.",
    )
    lora_fp32: bool = Field(
        False,
        description="Keep the LoRA weights in fp32 (computed in bf16 under autocast) instead of TRL's bf16 cast; "
        "needs patch_trainer after the SFTTrainer is built.",
    )

    _resolved: dict = PrivateAttr(default_factory=dict)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _fsdp() -> bool:
    """FSDP-QLoRA in this process (tuneship.train.distributed.apply sets this before the model is loaded)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


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
    if cfg.compile_layers and device != "cuda":
        notes.append("speed: compile_layers is off on the CPU")
    elif compiling_layers(cfg, device) and not sft_kwargs.get("pad_to_multiple_of"):
        # variable-length batches: lengths that are multiples of 8 keep inductor's alignment guard true, so
        # a new length does not recompile the layers (seen on an H100: lengths 114 then 116 recompiled twice)
        sft_kwargs["pad_to_multiple_of"] = 8
        notes.append(
            "speed: batches padded to a multiple of 8 tokens (fewer recompiles of the compiled layers)"
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
# which of our forwards peft's Linear4bit runs: the fused LoRA add, the fused 4-bit + LoRA function, both or none
_FUSED: dict = {"lora": False, "qlora": False, "save_weights": False}


def _peft_bnb_class():
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    cls = getattr(peft_bnb, "Linear4bit", None)
    if cls is not None and not _PEFT_FORWARD:
        _PEFT_FORWARD.append(cls.forward)
        _VARIANT_KEYS.extend(getattr(peft_bnb, "VARIANT_KWARG_KEYS", ()))
    return cls


def _install_forward() -> None:
    cls = _peft_bnb_class()
    if cls is None:
        return
    if _FUSED["qlora"]:
        cls.forward = _fused_qlora_forward
    elif _FUSED["lora"]:
        cls.forward = _fused_lora_forward
    elif _PEFT_FORWARD:
        cls.forward = _PEFT_FORWARD[0]


def enable_fused_lora() -> bool:
    """Route peft's 4-bit LoRA layers through `_fused_lora_forward` (class-level, idempotent). False if unavailable."""
    if _peft_bnb_class() is None:
        return False
    _FUSED["lora"] = True
    _install_forward()
    return True


def disable_fused_lora() -> None:
    _FUSED["lora"] = False
    _install_forward()


def enable_fused_qlora(save_weights: bool = False) -> bool:
    """Route peft's 4-bit LoRA layers, in training, through `QLoRALinearFn` (class-level, idempotent).
    False if peft's bitsandbytes layer is unavailable."""
    if _peft_bnb_class() is None:
        return False
    _FUSED["qlora"] = True
    _FUSED["save_weights"] = bool(save_weights)
    _install_forward()
    return True


def disable_fused_qlora() -> None:
    _FUSED["qlora"] = False
    _install_forward()


def _packed_and_absmax(weight, qs):
    """The packed 4-bit weight as a plain tensor and its block scales in fp32, with the double quantization undone
    once. Cached on the quant state (a few MB a layer instead of two kernels per dequantization); the plain tensor
    also keeps bitsandbytes' Params4bit subclass out of compiled graphs."""
    import torch

    cached = getattr(qs, "_tuneship_cache", None)
    if torch.compiler.is_compiling():  # compile_layers primed the cache eagerly; without it, peft's own path
        return (cached[1], cached[2]) if cached is not None else None
    if cached is not None and cached[0] is weight and cached[1].data_ptr() == weight.data_ptr():
        return cached[1], cached[2]
    if qs.nested:
        from bitsandbytes import functional as bnb_f

        absmax = (bnb_f.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    else:
        absmax = qs.absmax.float()
    packed = weight.data
    qs._tuneship_cache = (weight, packed, absmax)
    return packed, absmax


def prime_fused_qlora(model) -> int:
    """Fill the per-layer caches of `_packed_and_absmax` eagerly (before torch.compile traces the layers)."""
    n = 0
    for mod in model.modules():
        weight = getattr(getattr(mod, "base_layer", None), "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None and hasattr(mod, "lora_A"):
            _packed_and_absmax(weight, qs)
            n += 1
    return n


def _qlora_fn():
    """`QLoRALinearFn`, built on first use (torch is imported lazily in this module)."""
    if _QLORA_FN:
        return _QLORA_FN[0]
    import torch

    class QLoRALinearFn(torch.autograd.Function):
        """y = x W^T (+ bias) + scaling * (dropout(x) A^T) B^T for a frozen NF4 weight W, as one autograd node.

        Inputs: x [..., in] in the compute dtype; xd = dropout(x), or None when there is no dropout; the LoRA
        weights A [r, in] and B [out, r] in the compute dtype; the packed 4-bit weight with its fp32 block scales.
        Backward: dB = s g^T a, dA = s (g B)^T xd, dx = g W (+ s (g B) A), with W dequantized again (or saved)."""

        @staticmethod
        def forward(ctx, x, xd, lora_a, lora_b, packed, absmax, bias, meta, scaling, save_weights):
            blocksize, quant_type, shape = meta
            w = torch.ops.bitsandbytes.dequantize_4bit.default(
                packed, absmax, blocksize, quant_type, shape, x.dtype
            )
            x2 = x.reshape(-1, x.shape[-1])
            xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
            y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
            a = torch.mm(xd2, lora_a.t())
            y.addmm_(a, lora_b.t(), alpha=scaling)
            ctx.meta, ctx.scaling, ctx.save_weights = meta, scaling, save_weights
            ctx.has_xd = xd is not None
            ctx.x_shape = x.shape
            if save_weights:
                ctx.save_for_backward(xd2, a, lora_a, lora_b, w, None)
            else:
                ctx.save_for_backward(xd2, a, lora_a, lora_b, packed, absmax)
            return y.view(*x.shape[:-1], shape[0])

        @staticmethod
        def backward(ctx, g):
            xd2, a, lora_a, lora_b, w_or_packed, absmax = ctx.saved_tensors
            need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
            s = ctx.scaling
            g2 = g.reshape(-1, g.shape[-1])
            if g2.dtype != a.dtype:
                g2 = g2.to(a.dtype)
            ga = torch.mm(g2, lora_b).mul_(s)  # [N, r]: the gradient at the LoRA bottleneck
            grad_a = torch.mm(ga.t(), xd2) if need_a else None
            grad_b = torch.mm(g2.t(), a).mul_(s) if need_b else None
            grad_x = grad_xd = None
            if need_x:
                if ctx.save_weights:
                    w = w_or_packed
                else:
                    blocksize, quant_type, shape = ctx.meta
                    w = torch.ops.bitsandbytes.dequantize_4bit.default(
                        w_or_packed, absmax, blocksize, quant_type, shape, g2.dtype
                    )
                grad_x = torch.mm(g2, w)
                if not ctx.has_xd:
                    grad_x.addmm_(ga, lora_a)
                grad_x = grad_x.view(ctx.x_shape)
            if ctx.has_xd and need_xd:
                grad_xd = torch.mm(ga, lora_a).view(ctx.x_shape)
            return grad_x, grad_xd, grad_a, grad_b, None, None, None, None, None, None

    _QLORA_FN.append(QLoRALinearFn)
    return QLoRALinearFn


_QLORA_FN: list = []


def _fused_qlora_forward(self, x, *args, **kwargs):
    """peft's 4-bit LoRA forward as one `QLoRALinearFn` node, in training (grad enabled) for plain LoRA.
    Anything else (no grad, several or disabled adapters, DoRA and other variants, trainable biases, a weight
    without its quant state) takes the fused LoRA add or peft's own forward."""
    import torch

    out = None
    if not (args or kwargs or self.disable_adapters or self.merged) and torch.is_grad_enabled():
        out = _qlora_fast(self, x)
    if out is not None:
        return out
    if _FUSED["lora"]:
        return _fused_lora_forward(self, x, *args, **kwargs)
    return _PEFT_FORWARD[0](self, x, *args, **kwargs)


def _qlora_fast(self, x):
    import torch

    active = self.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return None
    base = self.base_layer
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or len(qs.shape) != 2:  # only bitsandbytes' Params4bit carries a quant_state
        return None
    bias = base.bias
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if (bias is not None and bias.requires_grad) or getattr(self.lora_B[name], "bias", None) is not None:
        return None
    dtype = base.compute_dtype or x.dtype
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        if torch.get_autocast_dtype(dev) != dtype:
            return None
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)  # what autocast does for the LoRA linears
    elif not (lora_a.dtype == lora_b.dtype == dtype):
        return None
    inp_dtype = x.dtype
    xc = x.to(dtype)
    dropout = self.lora_dropout[name]
    cache = _packed_and_absmax(weight, qs)
    if cache is None:
        return None
    packed, absmax = cache
    xd = dropout(xc)
    y = _qlora_fn().apply(
        xc,
        None if xd is xc else xd,
        lora_a,
        lora_b,
        packed,
        absmax,
        bias,
        (qs.blocksize, qs.quant_type, tuple(qs.shape)),
        float(self.scaling[name]),
        _FUSED["save_weights"],
    )
    return y if y.dtype == inp_dtype else y.to(inp_dtype)


def compiling_layers(cfg: SpeedConfig, device: str) -> bool:
    """Whether patch_trainer will compile the decoder layers (so patch_model leaves Liger out)."""
    return cfg.enabled and cfg.compile_layers and device == "cuda" and not _fsdp()


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (`Module.compile`: parameter names and state dicts unchanged).
    Returns how many were compiled."""
    if _FUSED["qlora"]:
        prime_fused_qlora(model)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def patch_trainer(cfg: SpeedConfig, trainer, device: str) -> list[str]:
    """Levers that need the built SFTTrainer, with LoRA attached (call before `trainer.train()`): fp32 LoRA weights,
    the regional compile of the decoder layers."""
    import torch

    notes: list[str] = []
    if device != "cuda":  # apply_speed noted compile_layers being off on the CPU
        return notes
    if not cfg.enabled and not _fsdp():
        return notes
    if cfg.lora_fp32 or _fsdp():
        # Under FSDP this is required: accelerate upcasts the flat LoRA parameters to fp32 after wrapping, while
        # FSDP still casts their gradients to the dtype it wrapped (bf16), and AdamW refuses the mix (seen on an
        # H100). fp32 before wrapping keeps parameters and gradients in one dtype; compute stays bf16.
        n = 0
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
                n += 1
        if n:
            why = " (FSDP: one dtype for parameters and gradients)" if _fsdp() else ""
            notes.append(f"speed: {n} LoRA tensors kept in fp32{why}, computed in bf16")
    if not cfg.enabled:
        return notes
    if cfg.compile_layers and _fsdp():
        notes.append("speed: compile_layers is off under FSDP (not measured there)")
    elif cfg.compile_layers:
        # the first layer's input (the frozen embedding's output) would otherwise not require grad while every
        # other layer's does: two graphs per shape instead of one (seen on an H100)
        trainer.model.enable_input_require_grads()
        n = compile_layers(trainer.model)
        notes.append(f"speed: torch.compile on each of {n} decoder layers (compiled at the first steps)")
    return notes


def patch_model(cfg: SpeedConfig, model, device: str, compute_dtype=None) -> list[str]:
    """Levers that need the loaded model: undo peft's fp32 upcast, Liger kernels, the checkpointing decision.
    Call after `prepare_model_for_kbit_training` (if used) and before LoRA is attached."""
    import torch

    notes: list[str] = []
    if not cfg.enabled:
        disable_fused_lora()
        disable_fused_qlora()
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
        disable_fused_lora()
        disable_fused_qlora()
        if cfg.keep_bf16 or cfg.liger_rms_norm or cfg.liger_swiglu or cfg.liger_rope:
            notes.append("speed: keep_bf16 and the Liger kernels are GPU levers; off on the CPU")
        if cfg.fused_lora or cfg.fused_qlora:
            notes.append("speed: fused_lora and fused_qlora are GPU levers; off on the CPU")
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
    if cfg.fused_lora and _fsdp():
        # seen on an H100: FSDP1's flat parameters make lora_B.weight a view that the in-place addmm may not touch
        disable_fused_lora()
        notes.append(
            "speed: fused_lora is off under FSDP (its in-place add conflicts with FSDP's parameter views)"
        )
    elif cfg.fused_lora:
        if enable_fused_lora():
            notes.append("speed: fused LoRA add (one addmm per 4-bit layer)")
    else:
        disable_fused_lora()
    if cfg.fused_qlora:
        if not _has("bitsandbytes"):
            notes.append("speed: fused_qlora is off: bitsandbytes is not installed")
        elif _fsdp():
            disable_fused_qlora()
            notes.append("speed: fused_qlora is off under FSDP (its flat parameters drop the 4-bit metadata)")
        else:
            save = cfg.fused_qlora_save_weights and policy != "selective"
            if cfg.fused_qlora_save_weights and not save:
                notes.append("speed: fused_qlora_save_weights is off with selective checkpointing")
            enable_fused_qlora(save)
            keep = ", dequantized weights kept for backward" if save else ""
            notes.append(f"speed: fused 4-bit + LoRA layers (one autograd node per layer in training{keep})")
    else:
        disable_fused_qlora()
    liger = _liger_kwargs(cfg)
    if any(liger.values()) and compiling_layers(cfg, device):
        notes.append(
            "speed: Liger kernels not applied: compile_layers fuses RMSNorm, SwiGLU and RoPE inside the compiled layers"
        )
    elif any(liger.values()):
        if not _has("liger_kernel"):
            notes.append("speed: liger-kernel is not installed; Liger kernels off (pip install liger-kernel)")
        else:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model, **liger)
            on = [k for k, v in liger.items() if v]
            notes.append(f"speed: Liger kernels applied ({', '.join(on)})")
    return notes
