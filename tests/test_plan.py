"""The memory planner and `tuneship plan`: pure arithmetic, CPU only, fast."""

from __future__ import annotations

import json

import pytest

from tuneship.cli import main
from tuneship.errors import TuneshipError
from tuneship.train.plan import (
    BUILTIN,
    GiB,
    ModelShape,
    RecipeOptions,
    builtin_shape,
    choose,
    gpu_memory,
    parse_mem,
    predict_peak,
)

QWEN7 = BUILTIN["qwen2.5-7b"]
QWEN15 = BUILTIN["qwen2.5-1.5b"]


def test_builtin_shapes_have_the_published_parameter_counts():
    assert 1.50e9 < QWEN15.params() < 1.58e9  # Qwen2.5-1.5B: 1.54B
    assert 7.5e9 < QWEN7.params() < 7.7e9  # Qwen2.5-7B: 7.62B
    assert 7.9e9 < BUILTIN["llama-3-8b"].params() < 8.1e9  # Llama-3-8B: 8.03B
    assert 0.13e9 < BUILTIN["smollm2-135m"].params() < 0.14e9


def test_builtin_shape_matches_hub_ids_and_bundled_names():
    assert builtin_shape("Qwen/Qwen2.5-7B-Instruct") is QWEN7
    assert builtin_shape("qwen2.5-1.5b") is QWEN15
    assert builtin_shape("bundled:smollm2-135m-instruct") is BUILTIN["smollm2-135m"]
    assert builtin_shape("meta-llama/Meta-Llama-3-8B") is BUILTIN["llama-3-8b"]
    assert builtin_shape("some-org/unknown-model") is None


def test_nf4_weights_of_a_7b_model_take_about_half_a_byte_per_linear_param():
    o = RecipeOptions()
    w = predict_peak(QWEN7, 1, 512, o).weights
    # 6.5B linear params at ~0.516 bytes (NF4 + double-quant constants) plus 2 x 545M bf16 embedding rows
    assert 5.0 * GiB < w < 5.6 * GiB
    no_dq = predict_peak(QWEN7, 1, 512, RecipeOptions(double_quant=False)).weights
    assert no_dq - w == pytest.approx(QWEN7.linear_params() * (4 / 64 - 1 / 64 - 4 / 64 / 256), rel=1e-6)


def test_seed_002_a_7b_model_fits_a_16gb_t4_with_a_plausible_micro_batch():
    best, cands = choose(QWEN7, 1024, parse_mem("16GiB"), 16, RecipeOptions())
    assert best is not None and best.fits
    assert best.peak.total <= 16 * GiB
    assert 1 <= best.micro_batch <= 16 and best.micro_batch * best.grad_accum == 16
    # without checkpointing a whole micro-batch of 16 x 1024 tokens cannot fit
    assert any(c.checkpointing == "off" and c.micro_batch == 16 and not c.fits for c in cands)


def test_more_memory_never_picks_a_smaller_micro_batch_or_more_recompute():
    order = {"off": 0, "selective": 1, "full": 2}
    prev = None
    for gib in (12, 16, 24, 40, 80):
        best, _ = choose(QWEN15, 1024, gib * GiB, 32, RecipeOptions())
        assert best is not None
        if prev:
            assert best.score >= prev.score
            assert (
                order[best.checkpointing] <= order[prev.checkpointing] or best.micro_batch > prev.micro_batch
            )
        prev = best


def test_activations_scale_with_tokens_and_checkpointing_saves_most_of_them():
    o_off = RecipeOptions(checkpointing="off")
    a1 = predict_peak(QWEN15, 4, 1024, o_off).activations
    a2 = predict_peak(QWEN15, 8, 1024, o_off).activations
    assert a2 == pytest.approx(2 * a1)
    full = predict_peak(QWEN15, 8, 1024, RecipeOptions(checkpointing="full")).activations
    sel = predict_peak(QWEN15, 8, 1024, RecipeOptions(checkpointing="selective")).activations
    assert full < sel < a2 / 4


def test_full_logits_dominate_the_stock_recipe_and_the_fused_head_removes_them():
    stock = predict_peak(QWEN15, 8, 1024, RecipeOptions.stock())
    assert stock.loss > 0.6 * stock.allocated  # 8192 tokens x 151,936 logits in fp32, several copies
    fused = predict_peak(QWEN15, 8, 1024, RecipeOptions(checkpointing="off"))
    assert fused.loss < 2 * GiB


def test_predictions_are_near_the_h100_measurements():
    # measured by bench/train_speed.py on an H100 (bench/results/train_speed.json), batch 8 x 1024
    off = predict_peak(QWEN15, 8, 1024, RecipeOptions(checkpointing="off")).allocated / GiB
    assert off == pytest.approx(17.31, rel=0.1)
    no_liger = RecipeOptions(checkpointing="off", liger_rms_norm=False, liger_swiglu=False, liger_rope=False)
    assert predict_peak(QWEN15, 8, 1024, no_liger).allocated / GiB == pytest.approx(22.50, rel=0.1)
    # and at the largest micro-batch that ran without checkpointing (32 x 1024: 65.23 GiB)
    assert predict_peak(
        QWEN15, 32, 1024, RecipeOptions(checkpointing="off")
    ).allocated / GiB == pytest.approx(65.23, rel=0.1)
    full = RecipeOptions(checkpointing="full")
    assert predict_peak(QWEN15, 8, 1024, full).allocated / GiB == pytest.approx(2.73, rel=0.15)
    # the stock recipe: full logits and peft's fp32 upcast (16.93 GiB with checkpointing active)
    assert predict_peak(QWEN15, 8, 1024, RecipeOptions.stock()).allocated / GiB == pytest.approx(
        16.93, rel=0.1
    )


def test_model_shape_from_a_config_json(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_config(tmp_path)
    assert (shape.hidden, shape.kv_dim, shape.head_dim, shape.tied) == (576, 192, 64, True)
    assert shape.params() == BUILTIN["smollm2-135m"].params()
    with pytest.raises(TuneshipError, match="num_hidden_layers"):
        ModelShape.from_config({k: v for k, v in cfg.items() if k != "num_hidden_layers"})


def test_parse_mem_and_gpu_names():
    assert parse_mem("16GiB") == 16 * GiB
    assert parse_mem("24 GB") == 24 * GiB
    assert parse_mem("512MiB") == 512 * 2**20
    assert gpu_memory("T4") < 16 * GiB
    assert gpu_memory("nvidia h100") == gpu_memory("H100")
    with pytest.raises(TuneshipError, match="not a size"):
        parse_mem("lots")
    with pytest.raises(TuneshipError, match="unknown GPU"):
        gpu_memory("Voodoo2")


def test_cli_plans_a_7b_model_on_a_t4(capsys):
    rc = main(
        [
            "plan",
            "--gpu",
            "T4",
            "--model",
            "Qwen/Qwen2.5-7B-Instruct",
            "--seq",
            "1024",
            "--target-batch",
            "16",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["model"] == "qwen2.5-7b"
    c = out["choice"]
    assert c["micro_batch"] * c["grad_accum"] == 16 and c["predicted_peak_gib"] <= out["gpu_mem_gib"]
    assert f"batch_size={c['micro_batch']}" in out["set"]


def test_cli_reads_the_train_config_and_a_local_model_dir(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            }
        )
    )
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"base_model: {model}\nbatch_size: 4\ngrad_accum: 4\nmax_length: 2048\n")
    assert main(["plan", "--config", str(cfg), "--gpu-mem", "24GiB"]) == 0
    text = capsys.readouterr().out
    assert "effective batch 16" in text and "sequences of 2048 tokens" in text and "choice:" in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", "--gpu", "T4", "--gpu-mem", "16GiB", "--model", "qwen2.5-7b"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["plan", "--gpu", "T4", "--model", "nobody/nothing-here"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main(["plan", "--gpu", "T4", "--model", "qwen2.5-7b", "--target-batch", "0"]) == 2
