"""Memory planner: predict the peak GPU memory of a QLoRA step and pick settings that fit a card.

Pure arithmetic over the model's shape (no torch). The peak is the sum of:
- weights: quantized linear layers in NF4/FP4 (4 bits, plus 8-bit absmax per 64 weights and an fp32 constant per
  256 blocks with double quantization, else an fp32 absmax per 64 weights), embeddings and an untied LM head in the
  compute dtype (fp32 when peft's upcast is kept), biases and norms;
- LoRA: weights, gradients and 8-bit Adam states (2 bytes per parameter);
- activations: bytes saved per token per layer for the checkpointing policy and kernels in use, plus one layer's
  worth being recomputed under checkpointing;
- the loss: full logits over the vocabulary (several fp32 copies) without a fused LM head, else one chunk;
- allocator slack and the CUDA context, for fitting a card (not part of the `allocated` figure the benchmark
  compares with `torch.cuda.max_memory_allocated`).

The per-entry constants below were checked against measured peaks on an H100 (bench/train_speed.py; the error is
reported in bench/results/train_speed.json).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneship.errors import TuneshipError

GiB = 2**30

# Usable memory of common cards, GiB (what nvidia-smi reports, before the CUDA context).
GPUS: dict[str, float] = {
    "H100": 79.6,
    "H200": 140.4,
    "A100-80": 79.2,
    "A100-40": 39.4,
    "A10G": 22.0,
    "A10": 22.0,
    "L4": 22.0,
    "L40S": 44.4,
    "T4": 14.6,
    "V100-16": 15.8,
    "V100-32": 31.7,
    "4090": 23.6,
    "3090": 23.6,
    "4080": 15.7,
    "3060": 11.8,
}
CUDA_CONTEXT_GIB = 0.6
SLACK = 1.08  # allocator fragmentation over the peak of live tensors

# Bytes of logits-related tensors per token and vocabulary entry for the stock full-logits loss
# (logits, their fp32 copy, log-softmax, and the gradients of both), fitted on the reference measurements.
FULL_LOGITS_BYTES = {"bf16_head": 12.0, "fp32_head": 11.0}
# peft's fp32 upcast makes the residual stream, norms, attention and LoRA inputs fp32 (measured: x2.65 bytes)
UPCAST_ACTIVATIONS = 2.65
FUSED_TOKEN_TILE = 4096  # TRL's fused LM head: tokens per tile
FUSED_VOCAB_CHUNK = 32768  # ... and vocabulary entries per chunk


@dataclass
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    tied: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params() + emb + self.layers * 2 * self.hidden + self.hidden

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """From an HF config object, a dict, a config.json path or a checkpoint directory."""
        if isinstance(config, str | Path):
            p = Path(config)
            p = p / "config.json" if p.is_dir() else p
            if not p.exists():
                raise TuneshipError(
                    f"model config {p} does not exist; pass a config.json path or a checkpoint dir"
                )
            try:
                config = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise TuneshipError(f"model config {p} is not valid JSON ({e.msg})") from None
            name = name or p.parent.name
        if not isinstance(config, dict):
            config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        config = config.get("text_config", config) if "hidden_size" not in config else config
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                name=name or config.get("_name_or_path") or config.get("model_type", "model"),
                hidden=int(config["hidden_size"]),
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                vocab=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or 0),
                tied=bool(config.get("tie_word_embeddings", True)),
                qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            )
        except KeyError as e:
            raise TuneshipError(
                f"model config has no {e.args[0]!r}; is it a decoder-only causal LM config?"
            ) from None


BUILTIN: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tied=True),
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True),
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, tied=True, qkv_bias=True),
    "qwen2.5-3b": ModelShape("qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936, tied=True, qkv_bias=True),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, tied=False, qkv_bias=True),
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, tied=True),
    "llama-3.2-3b": ModelShape("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, tied=True),
    "llama-3-8b": ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, tied=False),
    "mistral-7b": ModelShape("mistral-7b", 4096, 14336, 32, 32, 8, 32768, tied=False),
}


def builtin_shape(spec: str) -> ModelShape | None:
    """A built-in shape for names like `qwen2.5-7b`, `Qwen/Qwen2.5-7B-Instruct`, `bundled:smollm2-135m-instruct`."""
    s = spec.lower().split("/")[-1].removeprefix("bundled:")
    s = s.replace("_", "-").removeprefix("meta-").replace("llama-3.1-", "llama-3-")
    for key in sorted(BUILTIN, key=len, reverse=True):
        if re.match(re.escape(key) + r"($|[-.])", s) or s.startswith(key):
            return BUILTIN[key]
    return None


@dataclass
class RecipeOptions:
    """What changes the memory of a step."""

    checkpointing: str = "full"  # full | selective | off
    fused_ce: bool = True  # TRL's fused LM head (SFTTrainer) instead of full logits
    upcast: bool = False  # peft's fp32 upcast of non-quantized weights kept
    liger_rms_norm: bool = True
    liger_swiglu: bool = True
    liger_rope: bool = True
    load_in_4bit: bool = True
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    lora_fp32: bool = False  # TRL casts QLoRA adapters to bf16; the stock recipe keeps peft's fp32
    optim_bytes: float = 8.0  # fused AdamW: two fp32 states per parameter (8-bit Adam: 2.0)
    # fused_qlora_save_weights: the dequantized base weights are kept from forward to backward
    saved_weights: bool = False
    act_bytes: int = 2  # bf16 / fp16

    @classmethod
    def from_speed(cls, speed: Any, checkpointing: str | None = None, **kw: Any) -> RecipeOptions:
        on = bool(getattr(speed, "enabled", True))
        ckpt = checkpointing or getattr(speed, "checkpointing", "full")
        if ckpt == "auto":
            ckpt = "full"
        return cls(
            checkpointing=ckpt if on else "full",
            upcast=not (on and speed.keep_bf16),
            # compile_layers: inductor fuses these itself, and saves about what the Liger kernels save (measured)
            liger_rms_norm=on and (speed.liger_rms_norm or getattr(speed, "compile_layers", False)),
            liger_swiglu=on and (speed.liger_swiglu or getattr(speed, "compile_layers", False)),
            liger_rope=on and (speed.liger_rope or getattr(speed, "compile_layers", False)),
            saved_weights=on
            and bool(getattr(speed, "fused_qlora", False))
            and bool(getattr(speed, "fused_qlora_save_weights", False)),
            **({"optim_bytes": 8.0 if on and getattr(speed, "fused_optimizer", False) else 2.0} | kw),
        )

    @classmethod
    def stock(cls, **kw: Any) -> RecipeOptions:
        """The stock HF recipe: peft upcast, full checkpointing, full logits, no Liger, fp32 LoRA."""
        base = dict(
            checkpointing="full",
            fused_ce=False,
            upcast=True,
            liger_rms_norm=False,
            liger_swiglu=False,
            liger_rope=False,
            lora_fp32=True,
            optim_bytes=2.0,
        )
        return cls(**(base | kw))


@dataclass
class Peak:
    weights: float
    lora: float
    activations: float
    loss: float
    allocated: float  # predicted torch.cuda.max_memory_allocated
    total: float  # what the card must hold: allocated with slack, plus the CUDA context
    detail: dict = field(default_factory=dict)

    def gib(self) -> dict:
        return {k: round(v / GiB, 3) for k, v in asdict(self).items() if isinstance(v, float)}


def weight_bytes(shape: ModelShape, o: RecipeOptions) -> float:
    lin = shape.linear_params()
    if o.load_in_4bit:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if o.double_quant else 4 / 64)
        lin_b = lin * per
    else:
        lin_b = lin * 2
    dense = 4 if o.upcast else 2
    emb = shape.vocab * shape.hidden * (1 if shape.tied else 2) * dense
    small = shape.layers * (2 * shape.hidden) * dense + shape.hidden * dense
    if shape.qkv_bias:
        small += shape.layers * (shape.q_dim + 2 * shape.kv_dim) * 2
    return lin_b + emb + small


def lora_params(shape: ModelShape, o: RecipeOptions) -> int:
    shapes = shape.linear_shapes()
    return shape.layers * sum(o.lora_r * (a + b) for n, (a, b) in shapes.items() if n in o.lora_targets)


def lora_bytes(shape: ModelShape, o: RecipeOptions) -> float:
    n = lora_params(shape, o)
    w = 4 if o.lora_fp32 else 2
    return n * (w + w + o.optim_bytes)


def layer_activation_elems(shape: ModelShape, o: RecipeOptions) -> float:
    """Elements (of act_bytes each) one decoder layer saves per token for backward, without checkpointing."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    # the residual stream and the norm outputs (which feed the LoRA A matmuls), q/k/v for attention, its output and
    # the o_proj input, the MLP's gate and up outputs and the down_proj input (fitted on H100 measurements).
    elems = 4 * h + 2 * q + 2 * kv + 3 * i
    if not o.liger_swiglu:
        elems += i  # silu(gate) kept besides gate and up
    if not o.liger_rms_norm:
        elems += h  # the fp32 normalized copies
    if not o.liger_rope:
        elems += q + kv  # pre-rotation q and k
    elems += sum(o.lora_r for _ in o.lora_targets)
    if o.upcast:
        elems *= UPCAST_ACTIVATIONS
    return elems


def activation_bytes(shape: ModelShape, batch: int, seq: int, o: RecipeOptions) -> float:
    tokens = batch * seq
    a = o.act_bytes
    per_layer = layer_activation_elems(shape, o) * a
    resid = shape.hidden * (4 if o.upcast else a)
    attn_scores = 0.0  # sdpa/flash never materialize them
    if o.checkpointing == "off":
        saved = shape.layers * per_layer
    elif o.checkpointing == "selective":
        saved = shape.layers * (resid + shape.q_dim * a) + per_layer
    else:
        saved = shape.layers * resid + per_layer
    # gradient of the hidden states flowing back (two live buffers) and the embedding output
    flow = 3 * shape.hidden * (4 if o.upcast else a)
    # fused_qlora_save_weights without checkpointing: every layer's dequantized weights wait for backward (with
    # checkpointing, only the recomputed layer's; the speed lever keeps them only then)
    kept = shape.linear_params() * a if o.saved_weights and o.load_in_4bit and o.checkpointing == "off" else 0
    return tokens * (saved + flow + attn_scores) + kept


def loss_bytes(shape: ModelShape, batch: int, seq: int, o: RecipeOptions) -> float:
    tokens = batch * seq
    if not o.fused_ce:
        per = FULL_LOGITS_BYTES["fp32_head" if o.upcast else "bf16_head"]
        return tokens * shape.vocab * per
    tile = min(tokens, FUSED_TOKEN_TILE) * min(shape.vocab, FUSED_VOCAB_CHUNK)
    # one bf16 logits tile (the online log-sum-exp keeps per-token statistics only), plus the hidden states' gradient
    return tile * 2 + tokens * shape.hidden * o.act_bytes


def predict_peak(shape: ModelShape, batch: int, seq: int, o: RecipeOptions) -> Peak:
    w = weight_bytes(shape, o)
    lo = lora_bytes(shape, o)
    act = activation_bytes(shape, batch, seq, o)
    loss = loss_bytes(shape, batch, seq, o)
    allocated = w + lo + act + loss
    total = allocated * SLACK + CUDA_CONTEXT_GIB * GiB
    return Peak(
        float(w),
        float(lo),
        float(act),
        float(loss),
        float(allocated),
        float(total),
        {"tokens": batch * seq, "lora_params": lora_params(shape, o)},
    )


def auto_checkpointing(
    shape: ModelShape, batch: int, seq: int, base: RecipeOptions, budget_bytes: float
) -> tuple[str, Peak]:
    """What checkpointing=auto picks: the cheapest policy whose predicted total fits `budget_bytes`, else full."""
    for policy in ("off", "selective", "full"):
        peak = predict_peak(shape, batch, seq, RecipeOptions(**(asdict(base) | {"checkpointing": policy})))
        if peak.total <= budget_bytes:
            return policy, peak
    return "full", peak


# Relative step speed of each policy (work per token: off = 4N, selective ~ 5.6N, full = 6N FLOPs-equivalent).
POLICY_SPEED = {"off": 1.0, "selective": 0.76, "full": 0.7}


def _efficiency(tokens: int) -> float:
    """Small micro-batches leave the GPU underused; saturates around 8k tokens per micro-batch."""
    return min(1.0, (tokens / 8192) ** 0.25)


@dataclass
class Choice:
    micro_batch: int
    grad_accum: int
    checkpointing: str
    peak: Peak
    fits: bool
    score: float


def choose(
    shape: ModelShape,
    seq: int,
    budget_bytes: float,
    target_batch: int,
    base: RecipeOptions,
    policies: tuple[str, ...] = ("off", "selective", "full"),
) -> tuple[Choice | None, list[Choice]]:
    """Pick micro-batch, gradient accumulation and checkpointing for an effective batch of `target_batch` rows
    that fits `budget_bytes` (the card's memory) and is predicted fastest. Returns (best or None, all candidates)."""
    if target_batch < 1:
        raise TuneshipError("--target-batch must be at least 1")
    cands: list[Choice] = []
    divisors = [d for d in range(target_batch, 0, -1) if target_batch % d == 0]
    for policy in policies:
        o = RecipeOptions(**(asdict(base) | {"checkpointing": policy}))
        for mb in divisors:
            peak = predict_peak(shape, mb, seq, o)
            fits = peak.total <= budget_bytes
            score = POLICY_SPEED[policy] * _efficiency(mb * seq) if fits else 0.0
            cands.append(Choice(mb, target_batch // mb, policy, peak, fits, score))
            if fits:
                break  # smaller micro-batches of this policy are only slower
    fitting = [c for c in cands if c.fits]
    best = max(fitting, key=lambda c: (c.score, c.micro_batch)) if fitting else None
    return best, cands


def parse_mem(text: str) -> float:
    """'16GiB', '16 GB', '80g', '24000MiB' -> bytes (GB is read as GiB, as cards are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise TuneshipError(f"--gpu-mem {text!r} is not a size; write it like 16GiB, 24GB or 80G")
    mult = {"": GiB, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}[m.group(2)]
    return float(m.group(1)) * mult


def gpu_memory(name: str) -> float:
    key = name.upper().removeprefix("NVIDIA").strip().replace(" ", "-")
    key = {"A100": "A100-80", "V100": "V100-16", "RTX-4090": "4090", "RTX-3090": "3090"}.get(key, key)
    if key not in GPUS:
        raise TuneshipError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or pass --gpu-mem 16GiB)")
    return GPUS[key] * GiB
