"""QLoRA training speed and memory: the stock Hugging Face recipe against tuneship's GPU levers, in one run.

    python bench/train_speed.py --profile --curve-spread   # on a GPU, one device call of at most ~9.5 minutes
    python bench/train_speed.py --only stock,tuneship,no_liger --no-curve   # a subset
    python bench/train_speed.py --tiny          # a tiny model on the CPU: checks that the script runs

Order: the lever ladder (CORE), then the loss curve, the largest batch, then the other variants while the
--budget (540 s) lasts; what did not fit is recorded as skipped. On the H100 every variant costs ~25-35 s
(mostly loading), the curve ~75 s per recipe; bench/results/README.md says what was measured.

The model has Qwen2.5-1.5B's shape with random weights (speed and memory do not depend on the values). Each
variant runs in its own process (clean memory peak, no monkey-patches leaking between variants):
- `stock` is exactly the reference recipe (shared/reference/stock_qlora_speed.py): NF4 + double quant,
  peft's prepare_model_for_kbit_training, gradient checkpointing, sdpa, LoRA r=16 on all linear layers,
  PagedAdamW8bit, loss from the full logits;
- the tuneship variants add one lever at a time, through the train stage's own code (`apply_speed`,
  `patch_model`, `patch_trainer` (compile_layers), TRL's fused LM head as SFTTrainer installs it, LoRA weights in
  bf16 as SFTTrainer casts them, bf16 autocast as the Trainer runs with bf16=True).
Compiled variants get 3 more warm-up steps; `warmup_extra_s` (warm-up time beyond steady steps) is their compile time.
Timing: forward + backward + optimizer step, synchronized, median over the steps after the warm-up steps.
MFU counts 4N FLOPs per token (frozen base: forward + input gradients) against 989 TFLOP/s (H100 dense bf16).
A real-text run (token ids of local English text, SmolLM2 tokenizer) compares the per-step loss of the stock
recipe and tuneship's default over 200 steps at the same seed and data order.
Writes bench/results/train_speed.json (and a copy under $OUT when that is set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PEAK_TFLOPS = 989e12
N_PARAMS = 1.54e9  # Qwen2.5-1.5B, as in the reference
QWEN15 = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=2048,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
ALL_OFF = dict(
    keep_bf16=False,
    liger_rms_norm=False,
    liger_swiglu=False,
    liger_rope=False,
    checkpointing="full",
    fused_lora=False,
    fused_optimizer=False,
    fused_qlora=False,
    compile_layers=False,
)
LIGER = dict(liger_rms_norm=True, liger_swiglu=True, liger_rope=True)

# name -> (what it changes, SpeedConfig overrides or None for the stock recipe, loss path).
# Cumulative: each row adds one lever to the row above it; the rows after `tuneship` vary it.
VARIANTS: dict[str, tuple[str, dict | None, str]] = {
    "stock": (
        "reference script as measured for ENVIRONMENT.md (model left in eval mode, so checkpointing is inactive)",
        None,
        "full",
    ),
    "stock_train": (
        "stock recipe in train mode, as the Trainer runs it (checkpointing active)",
        None,
        "full",
    ),
    "bf16": (
        "+ no fp32 upcast (keep_bf16), bf16 LoRA, bf16 autocast; full checkpointing",
        dict(ALL_OFF, keep_bf16=True),
        "full",
    ),
    "fused_ce": (
        "+ TRL's fused LM head (chunked log-probs, no full logits)",
        dict(ALL_OFF, keep_bf16=True),
        "trl",
    ),
    "liger": ("+ Liger RMSNorm, SwiGLU, RoPE kernels", dict(ALL_OFF, keep_bf16=True, **LIGER), "trl"),
    "fused_lora": (
        "+ fused LoRA add (one addmm per layer)",
        dict(ALL_OFF, keep_bf16=True, fused_lora=True, **LIGER),
        "trl",
    ),
    "fused_optim": (
        "+ fused AdamW instead of paged 8-bit AdamW",
        dict(checkpointing="full", fused_qlora=False, compile_layers=False),
        "trl",
    ),
    "fused_qlora": (
        "+ fused 4-bit + LoRA autograd function (one node per layer, dequantized weights kept for backward)",
        dict(checkpointing="full", compile_layers=False),
        "trl",
    ),
    "no_compile": (
        "+ checkpointing=auto (the planner turns checkpointing off when it fits); Liger kernels, no compile",
        dict(compile_layers=False),
        "trl",
    ),
    "tuneship": (
        "+ compile_layers, Liger not applied (SpeedConfig defaults: inductor fuses norm/SwiGLU/RoPE per layer)",
        {},
        "trl",
    ),
    "selective": (
        "tuneship with selective checkpointing (keep attention outputs)",
        dict(checkpointing="selective"),
        "trl",
    ),
    "no_liger": (
        "no_compile without the Liger kernels",
        dict(liger_rms_norm=False, liger_swiglu=False, liger_rope=False, compile_layers=False),
        "trl",
    ),
    "lora_fp32": ("tuneship with fp32 LoRA weights (bf16 compute)", dict(lora_fp32=True), "trl"),
    "tuneship_repeat": ("tuneship again (run-to-run spread)", {}, "trl"),
    "liger_flce": ("tuneship with Liger's fused linear cross-entropy instead of TRL's", {}, "liger"),
    "compile": (
        "tuneship with a whole-model torch.compile instead of per layer",
        dict(torch_compile=True, compile_layers=False),
        "trl",
    ),
    "no_fused_qlora": (
        "tuneship without the fused 4-bit + LoRA function or compile (the 2026-11-25 default)",
        dict(fused_qlora=False, compile_layers=False),
        "trl",
    ),
    "qlora_no_save": (
        "tuneship, the fused 4-bit + LoRA function dequantizing the weights again in backward",
        dict(fused_qlora_save_weights=False),
        "trl",
    ),
    "compile_peft": (
        "tuneship without the fused 4-bit + LoRA function (compile traces peft's layers)",
        dict(fused_qlora=False),
        "trl",
    ),
}


def compiled(name: str) -> bool:
    """Variants that compile (more warm-up steps, a longer slot)."""
    o = VARIANTS[name][1]
    return o is not None and bool(o.get("torch_compile") or o.get("compile_layers", True))


DEFAULT_VARIANT = "tuneship"  # the tuneship default recipe at 8 x 1024 on an 80 GB card


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# One variant, in its own process.


def build_model(path: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(Qwen2Config(**(TINY if tiny else QWEN15)), dtype=torch.bfloat16)
    m.save_pretrained(path)


def load(variant: str, path: Path, device: str, bs: int, seq: int):
    """Build the model the way the recipe does. Returns (model, loss_fn, notes, autocast, optimizer name)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneship.train.speed import SpeedConfig, apply_speed, patch_model, patch_trainer

    desc, overrides, loss_path = VARIANTS[variant]
    dmap = {"": 0} if device == "cuda" else {"": "cpu"}
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    if overrides is None:  # exactly the reference
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=dmap, attn_implementation="sdpa", quantization_config=q
        )
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
        m = get_peft_model(m, lora)
        if variant == "stock_train":
            m.train()  # the Trainer trains in train mode, where checkpointing is active
        layer_mode = "train" if m.get_base_model().model.layers[0].training else "eval"
        notes = [f"stock recipe, layers in {layer_mode} mode"]
        return m, lambda x: m(input_ids=x, labels=x).loss, notes, False, "paged_adamw_8bit"

    # The train stage's path (tuneship/train/run.py build()), step for step.
    cfg = SpeedConfig(**overrides)
    model_kwargs: dict = {"dtype": torch.bfloat16, "device_map": dmap}
    model_kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    sft_kwargs = {
        "per_device_train_batch_size": bs,
        "max_length": seq,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "optim": "paged_adamw_8bit",
    }
    notes = apply_speed(cfg, device, model_kwargs, sft_kwargs, model_config=path)
    m = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    m = prepare_model_for_kbit_training(
        m,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs=sft_kwargs["gradient_checkpointing_kwargs"],
    )
    notes += patch_model(cfg, m, device)
    m = get_peft_model(m, lora)
    for p in m.parameters():  # SFTTrainer: QLoRA adapters in bf16
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    notes += patch_trainer(cfg, SimpleNamespace(model=m), device)
    if sft_kwargs["gradient_checkpointing"]:  # what SFTTrainer + Trainer do
        m.enable_input_require_grads()
        kw = dict(sft_kwargs["gradient_checkpointing_kwargs"] or {})
        if kw.pop("selective", False):
            from trl.models.selective_activation_checkpointing import (
                enable_selective_activation_checkpointing,
            )

            enable_selective_activation_checkpointing(m)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    call = [m]  # the module the step calls: the PeftModel, or its torch.compile wrapper
    if loss_path == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(m.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))

        def loss_fn(x):
            return call[0](input_ids=x, labels=x, fused_lm_head=True).loss
    elif loss_path == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()
        base = m.get_base_model()

        def loss_fn(x):
            hidden = base.model(input_ids=x).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.size(-1))
            return flce(base.lm_head.weight, h, x[:, 1:].reshape(-1))
    else:

        def loss_fn(x):
            return call[0](input_ids=x, labels=x).loss

    if sft_kwargs.get("torch_compile"):
        call[0] = torch.compile(m)
    m.train()  # as the Trainer does
    notes.append(
        f"checkpointing={cfg._resolved.get('checkpointing')} active={bool(m.is_gradient_checkpointing)}"
    )
    return m, loss_fn, notes, device == "cuda", sft_kwargs["optim"]


def run_variant(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    m, loss_fn, notes, autocast, optim = load(args.variant, Path(args.model), device, args.bs, args.seq)
    load_s = time.perf_counter() - t_load
    params = [p for p in m.parameters() if p.requires_grad]
    if optim == "adamw_torch_fused":
        opt = torch.optim.AdamW(params, lr=args.lr, fused=True)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=args.lr)
    notes.append(f"optimizer={optim}")
    vocab = m.config.vocab_size if hasattr(m, "config") else 151936
    g = torch.Generator().manual_seed(args.seed)
    if args.tokens:
        import numpy as np

        stream = torch.from_numpy(np.load(args.tokens).astype("int64"))
    times, losses = [], []
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else None
    for i in range(args.steps):
        if args.tokens:
            n = args.bs * args.seq
            start = (i * n) % (stream.numel() - n)
            x = stream[start : start + n].view(args.bs, args.seq).to(device)
        else:
            x = torch.randint(0, vocab, (args.bs, args.seq), generator=g).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if ctx:
            with ctx():
                loss = loss_fn(x)
        else:
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    timed = times[args.warmup :] or times
    med = sorted(timed)[len(timed) // 2]
    tps = args.bs * args.seq / med
    out = {
        "variant": args.variant,
        "what": VARIANTS[args.variant][0],
        "bs": args.bs,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s": round(med, 4),
        "tok_s": round(tps, 1),
        "mfu_pct": round(100 * tps * 4 * N_PARAMS / PEAK_TFLOPS, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
        "load_s": round(load_s, 1),
        "step_times": [round(t, 4) for t in times],
        "first_step_s": round(times[0], 3),
        # time the warm-up steps took beyond steady-state steps: compile time for the compiled variants
        "warmup_extra_s": round(sum(times[: args.warmup]) - args.warmup * med, 1),
        "loss_last": round(losses[-1], 4),
        "notes": notes,
        "device": device,
    }
    if args.tokens:
        out["losses"] = [round(v, 5) for v in losses]
    if args.profile and device == "cuda":
        out["profile"] = profile_step(loss_fn, opt, x, ctx)
    return out


def profile_step(loss_fn, opt, x, ctx) -> list[dict]:
    """Where a step's GPU time goes: the top kernels by CUDA time over two steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            if ctx:
                with ctx():
                    loss = loss_fn(x)
            else:
                loss = loss_fn(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.device_type.name == "CUDA":
            rows.append({"kernel": e.key[:90], "ms_per_step": round(t / 2e3, 2), "calls": e.count // 2})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    cpu = [
        {
            "cpu_op": e.key[:90],
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 2e3, 2),
            "calls": e.count // 2,
        }
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    cpu.sort(key=lambda r: -r["self_cpu_ms_per_step"])
    cpu_total = sum(r["self_cpu_ms_per_step"] for r in cpu)
    return (
        [{"total_gpu_ms_per_step": round(total, 1), "total_self_cpu_ms_per_step": round(cpu_total, 1)}]
        + rows[:25]
        + cpu[:12]
    )


# ---------------------------------------------------------------------------------------------------------------
# The driver.


def planner_prediction(variant: str, bs: int, seq: int, tiny: bool, mem_gib: float = 79.2) -> dict:
    from tuneship.train.plan import ModelShape, RecipeOptions, auto_checkpointing, predict_peak
    from tuneship.train.speed import SpeedConfig

    shape = ModelShape.from_config(dict(TINY if tiny else QWEN15, model_type="qwen2"), name="qwen2.5-1.5b")
    desc, overrides, loss_path = VARIANTS[variant]
    if overrides is None:  # the reference leaves the model in eval mode: no checkpointing happens
        o = RecipeOptions.stock(checkpointing="full" if variant == "stock_train" else "off")
    else:
        cfg = SpeedConfig(**{k: v for k, v in overrides.items() if k != "torch_compile"})
        o = RecipeOptions.from_speed(cfg, fused_ce=loss_path != "full")
        if cfg.checkpointing == "auto":
            o.checkpointing = auto_checkpointing(shape, bs, seq, o, cfg.memory_fraction * mem_gib * 2**30)[0]
    p = predict_peak(shape, bs, seq, o)
    return {
        "allocated_gib": round(p.allocated / 2**30, 2),
        "total_gib": round(p.total / 2**30, 2),
        **{f"{k}_gib": v for k, v in p.gib().items() if k in ("weights", "lora", "activations", "loss")},
    }


def largest_batch(seq: int, budget_gib: float, tiny: bool) -> int:
    from tuneship.train.plan import ModelShape, RecipeOptions, predict_peak
    from tuneship.train.speed import SpeedConfig

    shape = ModelShape.from_config(dict(TINY if tiny else QWEN15, model_type="qwen2"))
    o = RecipeOptions.from_speed(SpeedConfig(checkpointing="off"), fused_ce=True)
    bs = 1
    # the same test as checkpointing=auto in apply_speed: the predicted total (with slack and context) fits
    while predict_peak(shape, bs + 1, seq, o).total <= budget_gib * 2**30 and bs < 512:
        bs += 1
    return bs


def sub(
    variant: str,
    a,
    bs: int,
    seq: int,
    steps: int,
    warmup: int,
    timeout: float,
    tokens: str | None = None,
    profile: bool = False,
    lr: float = 2e-4,
    seed: int | None = None,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--model",
        a.model,
        "--bs",
        str(bs),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--seed",
        str(a.seed if seed is None else seed),
        "--lr",
        str(lr),
    ]
    cmd += ["--tokens", tokens or ""]
    if profile:
        cmd += ["--profile"]
    log(f"{variant}: bs={bs} seq={seq} steps={steps}" + (" (real text)" if tokens else ""))
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "bs": bs, "seq": seq, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            r = json.loads(line)
            r["wall_s"] = round(time.time() - t, 1)
            return r
    err = p.stderr.strip().splitlines()
    oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
    tail = [ln for ln in err if ln.strip()][-3:]
    return {
        "variant": variant,
        "bs": bs,
        "seq": seq,
        "error": "out of memory" if oom else " | ".join(tail)[-600:],
    }


def smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def compare(s: dict, t: dict) -> dict:
    d = [abs(x - y) for x, y in zip(s["losses"], t["losses"], strict=True)]
    ds = [abs(x - y) for x, y in zip(smooth(s["losses"]), smooth(t["losses"]), strict=True)]
    return {
        "max_abs_diff_smoothed10": round(max(ds), 5),
        "max_abs_diff": round(max(d), 5),
        "mean_abs_diff": round(sum(d) / len(d), 5),
        "max_rel_diff": round(max(di / abs(x) for di, x in zip(d, s["losses"], strict=True)), 5),
        "first_last": [t["losses"][0], t["losses"][-1]],
        "stock_first_last": [s["losses"][0], s["losses"][-1]],
    }


def make_tokens(out: Path) -> None:
    """Token ids of real English text found on this machine (license texts, Python's license, package READMEs),
    tokenized with the bundled SmolLM2 tokenizer (its ids fit Qwen's vocabulary). Run on the CPU machine; the
    file travels to the GPU machine in a carried, git-ignored folder (.benchdata/)."""
    import glob
    import sysconfig

    import numpy as np
    from tokenizers import Tokenizer

    from tuneship.models import bundled_checkpoint

    tok = Tokenizer.from_file(str(bundled_checkpoint("smollm2-135m-instruct") / "tokenizer.json"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + [str(stdlib / "LICENSE.txt")]
    files += sorted(glob.glob(str(Path(sysconfig.get_paths()["purelib"]) / "*.dist-info" / "METADATA")))
    ids: list[int] = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        if f.endswith("METADATA"):
            text = text.split("\n\n", 1)[-1]  # the long description, not the headers
        ids += tok.encode(text).ids + [0]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.array(ids, dtype=np.int32))
    log(f"{len(ids)} token ids from {len(files)} files -> {out}")


def versions() -> dict:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in (
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "liger-kernel",
        "triton",
        "flash-attn",
    ):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    return v


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["gpu"] = None
    return info


def table(rows: list[dict], stock: dict) -> str:
    head = f"{'variant':<17}{'bs':>4}{'seq':>6}{'tok/s':>10}{'x stock':>8}{'MFU%':>6}{'peak GiB':>9}{'x mem':>7}{'step s':>8}{'plan GiB':>9}  what"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['variant']:<17}{r.get('bs', ''):>4}{r.get('seq', ''):>6}  ERROR {r['error'][:120]}"
            )
            continue
        sp = r["tok_s"] / stock["tok_s"] if stock.get("tok_s") else float("nan")
        mem = (
            (r["peak_gib"] / stock["peak_gib"])
            if stock.get("peak_gib") and r.get("peak_gib")
            else float("nan")
        )
        plan = r.get("plan", {}).get("allocated_gib", "")
        pk = r["peak_gib"] if r["peak_gib"] is not None else float("nan")
        lines.append(
            f"{r['variant']:<17}{r['bs']:>4}{r['seq']:>6}{r['tok_s']:>10.0f}{sp:>8.2f}{r['mfu_pct']:>6.1f}"
            f"{pk:>9.2f}{mem:>7.2f}{r['step_s']:>8.3f}{plan:>9}  {r['what']}"
        )
    return "\n".join(lines)


CORE = [
    "stock",
    "stock_train",
    "bf16",
    "fused_ce",
    "liger",
    "fused_lora",
    "fused_optim",
    "fused_qlora",
    "no_compile",
    "tuneship",
]  # run first; the rest after the curve and largest batch


def main_driver(a) -> None:
    import torch

    t0 = time.time()
    gpu = torch.cuda.is_available()
    tiny = a.tiny or not gpu
    a.model = a.model or ("/tmp/tuneship-bench-tiny" if tiny else "/tmp/qwen15b-rand")
    build_model(Path(a.model), tiny)
    bs, seq = (2, 64) if tiny else (8, 1024)
    steps, warmup = (4, 1) if tiny else (a.steps, a.warmup)
    deadline = t0 + a.budget
    names = a.only.split(",") if a.only else list(VARIANTS)
    core = [n for n in CORE if n in names]
    extra = [n for n in names if n not in CORE]
    rows: list[dict] = []
    state: dict = {"rows": rows, "curve": {}, "big": None}

    def left() -> float:
        return deadline - time.time()

    def variant(name: str) -> None:
        if left() < 45:
            rows.append({"variant": name, "bs": bs, "seq": seq, "error": "skipped: out of time budget"})
            return
        st, wu = (steps + 4, warmup + 3) if compiled(name) else (steps, warmup)
        r = sub(
            name,
            a,
            bs,
            seq,
            st,
            wu,
            timeout=max(30, min(left() - 10, 360 if compiled(name) else 180)),
            profile=(name in ("stock", DEFAULT_VARIANT) and a.profile and gpu),
        )
        r["plan"] = planner_prediction(name, bs, seq, tiny)
        rows.append(r)
        log(json.dumps({k: v for k, v in r.items() if k not in ("profile", "losses")}))

    def largest() -> None:
        # The largest micro-batch of the default recipe that fits the card, by the planner, checked by running it.
        if not gpu or left() < 70 or a.no_largest:
            return
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        bbs = a.largest_bs or largest_batch(seq, 0.9 * mem, tiny)
        for _ in range(3):
            r = sub(DEFAULT_VARIANT, a, bbs, seq, 8, 3, timeout=max(30, min(left() - 10, 180)))
            r["plan"] = planner_prediction(DEFAULT_VARIANT, bbs, seq, tiny)
            r["variant"] = "largest_batch"
            r["what"] = (
                f"{DEFAULT_VARIANT} at the largest micro-batch whose predicted peak fits 90% of {mem:.0f} GiB without checkpointing"
            )
            if r.get("error") != "out of memory" or left() < 70:
                break
            bbs = max(1, int(bbs * 0.8))
        rows.append(r)
        state["big"] = r
        log(json.dumps({k: v for k, v in r.items() if k not in ("profile", "losses")}))

    def curve() -> None:
        # Same loss curve: real text, same seed and data order, stock vs tuneship's default.
        tokens = a.tokens if a.tokens and Path(a.tokens).exists() else None
        if not tokens or left() < 100 or a.no_curve:
            return
        cbs, cseq, csteps = (2, 64, 6) if tiny else (a.curve_bs, a.curve_seq, a.curve_steps)
        s = sub(
            "stock",
            a,
            cbs,
            cseq,
            csteps,
            0,
            timeout=max(30, min(left() - 50, 240)),
            tokens=tokens,
            lr=a.curve_lr,
        )
        t = sub(
            DEFAULT_VARIANT,
            a,
            cbs,
            cseq,
            csteps,
            0,
            timeout=max(30, min(left() - 10, 180)),
            tokens=tokens,
            lr=a.curve_lr,
        )
        if "losses" in s and "losses" in t:
            state["curve"] = {
                "bs": cbs,
                "seq": cseq,
                "steps": csteps,
                "lr": a.curve_lr,
                "tokens_file": Path(tokens).name,
                **compare(s, t),
                "stock_losses": s["losses"],
                "tuneship_losses": t["losses"],
                "stock_tok_s": s["tok_s"],
                "tuneship_tok_s": t["tok_s"],
            }
            if a.curve_spread and left() > 100:
                # the natural spread: the stock recipe again, with another LoRA init seed (same data order)
                e = sub(
                    "stock",
                    a,
                    cbs,
                    cseq,
                    csteps,
                    0,
                    timeout=max(30, min(left() - 10, 180)),
                    tokens=tokens,
                    lr=a.curve_lr,
                    seed=a.seed + 1,
                )
                if "losses" in e:
                    state["curve"]["stock_other_seed"] = {**compare(s, e), "losses": e["losses"]}
            if a.curve_extra and left() > 60:
                e = sub(
                    a.curve_extra,
                    a,
                    cbs,
                    cseq,
                    csteps,
                    0,
                    timeout=max(30, min(left() - 10, 180)),
                    tokens=tokens,
                    lr=a.curve_lr,
                )
                if "losses" in e:
                    state["curve"][a.curve_extra] = {**compare(s, e), "losses": e["losses"]}
        else:
            state["curve"] = {"error": s.get("error") or t.get("error")}
        log(f"curve: { {k: v for k, v in state['curve'].items() if not k.endswith('losses')} }")

    phases = (
        [lambda n=n: variant(n) for n in core] + [curve, largest] + [lambda n=n: variant(n) for n in extra]
    )
    for phase in phases:
        phase()
        write_result(a, state, t0, tiny, bs, seq, final=False)
    write_result(a, state, t0, tiny, bs, seq, final=True)


def write_result(a, state: dict, t0: float, tiny: bool, bs: int, seq: int, final: bool) -> None:
    rows, curve, big = state["rows"], state["curve"], state["big"]
    by = {r["variant"]: r for r in rows}
    stock = by.get("stock", {})
    best = by.get(DEFAULT_VARIANT, {})
    ok = bool(stock and best and "error" not in stock and "error" not in best)
    plan_err = []
    for r in rows:
        if "error" not in r and r.get("peak_gib") and r.get("plan"):
            plan_err.append(
                {
                    "variant": r["variant"],
                    "bs": r["bs"],
                    "measured_gib": r["peak_gib"],
                    "predicted_gib": r["plan"]["allocated_gib"],
                    "error_pct": round(100 * (r["plan"]["allocated_gib"] - r["peak_gib"]) / r["peak_gib"], 1),
                }
            )
    mach = machine()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": mach.get("gpu") or "cpu",
        "machine": mach,
        "versions": versions(),
        "model": "Qwen2.5-1.5B shape, random weights" if not tiny else "tiny Qwen2 shape (CPU check)",
        "batch": f"{bs} x {seq}",
        "default_variant": DEFAULT_VARIANT,
        "stock_tok_s": stock.get("tok_s"),
        "stock_peak_gib": stock.get("peak_gib"),
        "tuneship_tok_s": best.get("tok_s"),
        "tuneship_peak_gib": best.get("peak_gib"),
        "speedup": round(best["tok_s"] / stock["tok_s"], 3) if ok else None,
        "memory_ratio": round(best["peak_gib"] / stock["peak_gib"], 3)
        if ok and stock.get("peak_gib")
        else None,
        "loss_max_abs_diff": curve.get("max_abs_diff"),
        "largest_batch": {k: big.get(k) for k in ("bs", "tok_s", "peak_gib", "error")} if big else None,
        "planner_error": plan_err,
        "planner_max_abs_error_pct": max((abs(e["error_pct"]) for e in plan_err), default=None),
        "variants": rows,
        "loss_curve": curve,
        "complete": final,
        "wall_s": round(time.time() - t0, 1),
    }
    text = json.dumps(result, indent=1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(text)
    if not final:
        return
    print(table(rows, stock))
    if curve and "max_abs_diff" in curve:
        print(
            f"loss curve ({curve['steps']} steps, real text, {curve['bs']}x{curve['seq']}, lr {curve['lr']}): "
            f"max |stock - tuneship| = {curve['max_abs_diff']}, mean {curve['mean_abs_diff']}; "
            f"stock {curve['stock_first_last']}, tuneship {curve['first_last']}"
        )
    spread = curve.get("stock_other_seed") if curve else None
    if spread:
        print(
            f"loss curve stock vs stock at seed+1: max {spread['max_abs_diff']}, mean {spread['mean_abs_diff']}"
        )
    extra = curve.get(a.curve_extra) if curve and a.curve_extra else None
    if extra:
        print(
            f"loss curve {a.curve_extra}: max |stock - it| = {extra['max_abs_diff']}, mean {extra['mean_abs_diff']}, "
            f"last {extra['first_last'][-1]}"
        )
    for e in plan_err:
        print(
            f"planner {e['variant']:<17} bs {e['bs']:>3}: predicted {e['predicted_gib']:.2f} GiB, measured "
            f"{e['measured_gib']:.2f} GiB ({e['error_pct']:+.1f}%)"
        )
    for r in rows:
        for p in r.get("profile") or []:
            if "total_gpu_ms_per_step" in p:
                print(
                    f"profile {r['variant']}: {p['total_gpu_ms_per_step']} GPU ms per step (kernel time), "
                    f"{p.get('total_self_cpu_ms_per_step')} CPU ms per step (profiled)"
                )
            elif "cpu_op" in p:
                print(f"  cpu {p['self_cpu_ms_per_step']:>8.2f} ms x{p['calls']:<5} {p['cpu_op']}")
            else:
                print(f"  {p['ms_per_step']:>8.2f} ms x{p['calls']:<5} {p['kernel']}")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "device",
                    "stock_tok_s",
                    "stock_peak_gib",
                    "tuneship_tok_s",
                    "tuneship_peak_gib",
                    "speedup",
                    "memory_ratio",
                    "loss_max_abs_diff",
                )
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU check)")
    ap.add_argument("--model", default=None, help="checkpoint dir (built with random weights if missing)")
    ap.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--profile", action="store_true", help="profile a step of stock and the default")
    ap.add_argument(
        "--tokens", default=str(ROOT / ".benchdata" / "real_tokens.npy"), help="real-text token ids (.npy)"
    )
    ap.add_argument(
        "--make-tokens", action="store_true", help="write the real-text token ids (--tokens) and exit"
    )
    ap.add_argument("--no-curve", action="store_true", help="skip the real-text loss curve")
    ap.add_argument("--no-largest", action="store_true", help="skip the largest-batch run")
    ap.add_argument(
        "--largest-bs", type=int, default=0, help="micro-batch for the largest-batch run (0: planner)"
    )
    ap.add_argument(
        "--curve-extra", default="lora_fp32", help="a third variant on the loss curve ('' for none)"
    )
    ap.add_argument("--curve-spread", action="store_true", help="also run the stock curve at another seed")
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--curve-bs", type=int, default=4)
    ap.add_argument("--curve-seq", type=int, default=512)
    ap.add_argument("--curve-lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    # one variant (internal)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    if a.make_tokens:
        make_tokens(Path(a.tokens))
    elif a.variant:
        if not a.tokens or not Path(a.tokens).exists():
            a.tokens = None
        print(json.dumps(run_variant(a)), flush=True)
    else:
        main_driver(a)


if __name__ == "__main__":
    main()
