"""The train stage's GPU levers: on the CPU they switch themselves off with a reason; the fused LoRA add is exact."""

from __future__ import annotations

import json

import pytest

from tuneship.config import load_config
from tuneship.errors import TuneshipError
from tuneship.train.speed import SpeedConfig, apply_speed, patch_model

TINY_QWEN = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}


def sft_defaults() -> dict:
    return {
        "per_device_train_batch_size": 8,
        "max_length": 512,
        "optim": "paged_adamw_8bit",
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }


def test_every_field_has_a_description():
    for name, field in SpeedConfig.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_on_the_cpu_gpu_levers_switch_off_with_a_reason():
    cfg = SpeedConfig(padding_free=True, torch_compile=True)
    model_kwargs: dict = {}
    sft = sft_defaults()
    notes = apply_speed(cfg, "cpu", model_kwargs, sft)
    assert model_kwargs["attn_implementation"] == "sdpa"
    assert sft["optim"] == "paged_adamw_8bit"  # fused AdamW is a GPU lever
    assert "padding_free" not in sft and "torch_compile" not in sft
    assert (
        sft["gradient_checkpointing"] is True
    )  # checkpointing=auto keeps the train config's choice on the CPU
    text = "\n".join(notes)
    assert "padding_free is off on the CPU" in text and "torch_compile is off on the CPU" in text


def test_checkpointing_off_and_selective_edit_the_sft_kwargs():
    sft = sft_defaults()
    apply_speed(SpeedConfig(checkpointing="off"), "cpu", {}, sft)
    assert sft["gradient_checkpointing"] is False and sft["gradient_checkpointing_kwargs"] is None
    sft = sft_defaults()
    notes = apply_speed(SpeedConfig(checkpointing="selective"), "cpu", {}, sft)
    assert sft["gradient_checkpointing"] is True and "selective" not in sft["gradient_checkpointing_kwargs"]
    assert any("selective checkpointing is a GPU lever" in n for n in notes)


def test_disabled_gives_the_stock_recipe():
    sft = sft_defaults()
    mk: dict = {}
    notes = apply_speed(SpeedConfig(enabled=False), "cuda", mk, sft)
    assert mk["attn_implementation"] == "sdpa" and sft == sft_defaults()
    assert "stock recipe" in notes[0]


def test_flash_attention_on_the_cpu_is_a_user_error():
    with pytest.raises(TuneshipError, match="needs a CUDA GPU"):
        apply_speed(SpeedConfig(attn_implementation="flash_attention_2"), "cpu", {}, sft_defaults())


def test_bad_values_name_the_key_and_the_allowed_values():
    from tuneship.train.config import TrainConfig

    with pytest.raises(TuneshipError) as e:
        load_config(TrainConfig, overrides=["speed.checkpointing=sometimes"])
    assert "speed.checkpointing" in str(e.value) and "selective" in str(e.value)
    cfg = load_config(TrainConfig, overrides=["speed.liger_swiglu=false"])
    assert cfg.speed.liger_swiglu is False and cfg.speed.liger_rms_norm is True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tiny-qwen")
    (d / "config.json").write_text(json.dumps(TINY_QWEN))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32).save_pretrained(d)
    return d


def load_4bit(path, dtype):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=q, device_map={"": "cpu"}
    )


def test_patch_model_on_the_cpu_leaves_the_model_alone(tiny_dir):
    import torch
    from peft import prepare_model_for_kbit_training

    m = prepare_model_for_kbit_training(load_4bit(tiny_dir, torch.bfloat16), use_gradient_checkpointing=True)
    before = {n: p.dtype for n, p in m.named_parameters()}
    cfg = SpeedConfig()
    apply_speed(cfg, "cpu", {}, sft_defaults())
    notes = patch_model(cfg, m, "cpu")
    assert {n: p.dtype for n, p in m.named_parameters()} == before
    assert any("GPU levers; off on the CPU" in n for n in notes)


def test_cast_frozen_to_undoes_peft_upcast_but_keeps_4bit_weights(tiny_dir):
    import torch
    from peft import prepare_model_for_kbit_training

    from tuneship.train.speed import cast_frozen_to

    m = prepare_model_for_kbit_training(load_4bit(tiny_dir, torch.bfloat16), use_gradient_checkpointing=False)
    fp32 = [n for n, p in m.named_parameters() if p.dtype == torch.float32]
    assert fp32  # peft upcast the norms and the embeddings
    assert cast_frozen_to(m, torch.bfloat16) == len(fp32)
    assert not [n for n, p in m.named_parameters() if p.dtype == torch.float32]
    assert any(p.__class__.__name__ == "Params4bit" for p in m.parameters())


def test_fused_lora_add_matches_peft_forward_and_gradients(tiny_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneship.train import speed

    def run(m, x):
        m.zero_grad()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    m = load_4bit(tiny_dir, torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # non-zero B, so the LoRA branch matters
    m = get_peft_model(m, lora)
    x = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    speed.disable_fused_lora()
    try:
        l0, g0 = run(m, x)
        assert speed.enable_fused_lora()
        calls = []
        layer = next(
            mod for mod in m.modules() if type(mod).__name__ == "Linear4bit" and hasattr(mod, "lora_A")
        )
        layer.register_forward_hook(lambda *a: calls.append(1))
        l1, g1 = run(m, x)
    finally:
        speed.disable_fused_lora()
    assert calls and type(layer).forward is not speed._fused_lora_forward  # restored
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # and the LoRA branch is really there: with the adapter off the loss differs
    with m.disable_adapter():
        assert m(input_ids=x, labels=x).loss.item() != pytest.approx(l0, rel=1e-4)


def test_fused_qlora_keys_default_on_and_switch_off():
    from tuneship.train.config import TrainConfig

    cfg = load_config(TrainConfig, overrides=[])
    assert cfg.speed.fused_qlora is True and cfg.speed.fused_qlora_save_weights is True
    assert cfg.speed.compile_layers is True
    cfg = load_config(
        TrainConfig, overrides=["speed.fused_qlora=false", "speed.fused_qlora_save_weights=false"]
    )
    assert cfg.speed.fused_qlora is False and cfg.speed.fused_qlora_save_weights is False
    with pytest.raises(TuneshipError, match="speed.compile_layers"):
        load_config(TrainConfig, overrides=["speed.compile_layers=sometimes"])


def test_on_the_cpu_fused_qlora_and_compile_layers_switch_off_with_a_reason(tiny_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneship.train import speed

    cfg = SpeedConfig(compile_layers=True)
    notes = apply_speed(cfg, "cpu", {}, sft_defaults())
    assert any("compile_layers is off on the CPU" in n for n in notes)
    speed.enable_fused_qlora()  # left on by an earlier GPU run in this process: the CPU switches it off
    m = load_4bit(tiny_dir, torch.float32)
    notes = patch_model(cfg, m, "cpu")
    assert any("fused_qlora are GPU levers; off on the CPU" in n for n in notes)
    assert speed._FUSED["qlora"] is False
    m = get_peft_model(m, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    layer = next(mod for mod in m.modules() if type(mod).__name__ == "Linear4bit" and hasattr(mod, "lora_A"))
    assert type(layer).forward is not speed._fused_qlora_forward
    assert speed.patch_trainer(cfg, type("T", (), {"model": m})(), "cpu") == []  # nothing compiled on the CPU
    assert not any(getattr(mod, "_compiled_call_impl", None) for mod in m.modules())


@pytest.mark.parametrize("save_weights", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_qlora_matches_peft_forward_and_gradients(tiny_dir, dropout, save_weights):
    """The fused 4-bit + LoRA function is the same math as peft + bitsandbytes (fp32 on the CPU: to rounding)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneship.train import speed

    m = load_4bit(tiny_dir, torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    m = get_peft_model(m, lora)
    m.train()
    x = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))

    def run():
        m.zero_grad()
        torch.manual_seed(5)  # the same dropout masks: one dropout call per layer on both paths
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    speed.disable_fused_lora()
    speed.disable_fused_qlora()
    fast = []
    try:
        l0, g0 = run()
        assert speed.enable_fused_qlora(save_weights=save_weights)
        orig = speed._qlora_fast
        speed._qlora_fast = lambda self, x: fast.append(1) or orig(self, x)
        try:
            l1, g1 = run()
            with torch.no_grad():  # generation and eval keep bitsandbytes' own path
                n = len(fast)
                m(input_ids=x)
                assert len(fast) == n
        finally:
            speed._qlora_fast = orig
    finally:
        speed.disable_fused_qlora()
    assert len(fast) == 2 * 7  # every 4-bit LoRA layer of the two decoder layers took the fused function
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_compile_layers_only_on_a_gpu_outside_fsdp(monkeypatch):
    from tuneship.train.plan import RecipeOptions
    from tuneship.train.speed import compiling_layers

    assert compiling_layers(SpeedConfig(), "cuda") is True  # and then patch_model leaves Liger out
    assert compiling_layers(SpeedConfig(), "cpu") is False
    assert compiling_layers(SpeedConfig(compile_layers=False), "cuda") is False
    assert compiling_layers(SpeedConfig(enabled=False), "cuda") is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what tuneship.train.distributed sets for FSDP
    assert compiling_layers(SpeedConfig(), "cuda") is False
    # the planner counts the compiled layers' fused norm/SwiGLU/RoPE like Liger's
    no_liger = dict(liger_rms_norm=False, liger_swiglu=False, liger_rope=False)
    assert RecipeOptions.from_speed(SpeedConfig(**no_liger)).liger_swiglu is True
    assert RecipeOptions.from_speed(SpeedConfig(compile_layers=False, **no_liger)).liger_swiglu is False


@pytest.mark.parametrize("enabled", [True, False])
def test_under_fsdp_lora_weights_become_fp32_before_wrapping(monkeypatch, enabled):
    """Seen on an H100: accelerate upcasts FSDP's flat LoRA parameters to fp32 after wrapping while FSDP casts
    their gradients to the dtype it wrapped, and AdamW refuses the mix. So under FSDP (even with speed off) the
    trainable weights are fp32 before the Trainer wraps them; frozen ones keep their dtype; nothing compiles."""
    from types import SimpleNamespace

    import torch

    from tuneship.train.speed import patch_trainer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    trainer = SimpleNamespace(model=model)
    cfg = SpeedConfig(enabled=enabled)
    if not enabled:  # outside FSDP, speed off: the stock recipe, untouched
        assert patch_trainer(cfg, trainer, "cuda") == [] and model[1].weight.dtype == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    notes = patch_trainer(cfg, trainer, "cuda")
    assert model[1].weight.dtype == model[1].bias.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16  # frozen: untouched
    assert any("2 LoRA tensors kept in fp32 (FSDP" in n for n in notes)
    assert not any("torch.compile on" in n for n in notes)
    assert patch_trainer(cfg, trainer, "cpu") == []  # FSDP needs CUDA; the CPU path is left alone


def test_compiled_layers_get_aligned_padding_and_one_graph_per_shape(tiny_dir, monkeypatch):
    """Seen on an H100 with variable-length rows: a new length recompiled the layers when it broke inductor's
    multiple-of-8 alignment guard, and layer 0 (whose input, the frozen embedding's output, needed no grad)
    compiled a second graph per shape. So: batches padded to a multiple of 8, and the embedding output requires
    grad, whenever the layers are compiled."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneship.train.speed import patch_trainer

    def padded(**kw) -> object:
        sft = sft_defaults()
        notes = apply_speed(SpeedConfig(checkpointing="off", **kw), "cuda", {}, sft)
        return sft.get("pad_to_multiple_of"), notes

    multiple, notes = padded()
    assert multiple == 8 and any("multiple of 8" in n for n in notes)
    assert padded(compile_layers=False)[0] is None
    assert padded(enabled=False)[0] is None
    import torch

    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    x = torch.randint(0, 64, (1, 8))
    assert not m.get_input_embeddings()(x).requires_grad
    notes = patch_trainer(SpeedConfig(), SimpleNamespace(model=m), "cuda")
    assert any("torch.compile on each of" in n for n in notes)
    assert m.get_input_embeddings()(x).requires_grad
    layers = [mod for mod in m.modules() if type(mod).__name__.endswith("DecoderLayer")]
    assert layers and all(mod._compiled_call_impl is not None for mod in layers)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert padded()[0] is None  # nothing is compiled under FSDP


def test_planner_counts_the_saved_weights_only_without_checkpointing():
    from tuneship.train.plan import BUILTIN, RecipeOptions, predict_peak

    shape = BUILTIN["qwen2.5-1.5b"]
    for policy, extra in (("off", shape.linear_params() * 2), ("full", 0), ("selective", 0)):
        plain = predict_peak(shape, 8, 1024, RecipeOptions(checkpointing=policy)).allocated
        kept = predict_peak(shape, 8, 1024, RecipeOptions(checkpointing=policy, saved_weights=True)).allocated
        assert kept - plain == pytest.approx(extra)
    o = RecipeOptions.from_speed(SpeedConfig())
    assert o.saved_weights is True
    assert RecipeOptions.from_speed(SpeedConfig(fused_qlora=False)).saved_weights is False
    assert RecipeOptions.from_speed(SpeedConfig(enabled=False)).saved_weights is False


@pytest.mark.gpu
def test_on_a_gpu_the_levers_switch_on(tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sft = sft_defaults()
    mk: dict = {}
    cfg = SpeedConfig()
    notes = apply_speed(cfg, "cuda", mk, sft, model_config=tiny_dir)
    assert sft["optim"] == "adamw_torch_fused"
    assert sft["gradient_checkpointing"] is False  # a tiny model's activations fit any card
    assert any("checkpointing=auto chose off" in n for n in notes)


@pytest.mark.gpu
def test_on_a_gpu_auto_checkpointing_is_decided_after_loading_and_the_levers_apply(tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneship.train import speed

    cfg = SpeedConfig()
    sft = sft_defaults()
    mk: dict = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    mk["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    notes = apply_speed(cfg, "cuda", mk, sft)  # no model_config: decided in patch_model
    assert sft["gradient_checkpointing"] is True
    m = AutoModelForCausalLM.from_pretrained(tiny_dir, **mk)
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    notes += patch_model(cfg, m, "cuda")
    assert sft["gradient_checkpointing"] is False and not m.is_gradient_checkpointing
    assert any("checkpointing=auto chose off" in n for n in notes)
    assert not [n for n, p in m.named_parameters() if p.dtype == torch.float32]  # keep_bf16 undid the upcast
    m = get_peft_model(
        m,
        LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    x = torch.randint(0, 1024, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = m(input_ids=x, labels=x).loss.float()
        speed.disable_fused_lora()
        plain = m(input_ids=x, labels=x).loss.float()
    assert torch.isfinite(fused) and abs(fused.item() - plain.item()) < 2e-2


@pytest.mark.gpu
def test_on_a_gpu_fused_qlora_matches_peft(tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneship.train import speed

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    m = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, quantization_config=q, device_map={"": 0}
    )
    m = get_peft_model(
        m,
        LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    m.train()
    x = torch.randint(0, 1024, (2, 64), device="cuda")

    def run():
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=x, labels=x).loss.float()
        loss.backward()
        return loss.item(), [p.grad.float().clone() for p in m.parameters() if p.requires_grad]

    speed.disable_fused_lora()
    speed.disable_fused_qlora()
    l0, g0 = run()
    try:
        for save in (False, True):
            speed.enable_fused_qlora(save_weights=save)
            l1, g1 = run()
            assert abs(l1 - l0) < 2e-2
            for a, b in zip(g0, g1, strict=True):
                assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    finally:
        speed.disable_fused_qlora()
