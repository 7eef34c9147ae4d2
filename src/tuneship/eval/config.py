"""The eval stage's config. Help text is written once here and rendered into `tuneship eval --help`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneship.config import StageConfig
from tuneship.errors import TuneshipError
from tuneship.eval.metrics import ALLOWED, check_metric_names


class EvalConfig(StageConfig):
    model: str = Field(
        description="Candidate model: HF id or dir, bundled:NAME, adapter dir, .gguf file, "
        "http://host:port/v1#model-name endpoint, or a registry ref NAME@vN|stable|canary."
    )
    data: str = Field(description="Eval data file (JSONL in any row shape that `data prepare` accepts).")
    out: str = Field(description="Output directory for eval.json, report.md, samples.jsonl and metrics.png.")
    baseline: str | None = Field(
        default=None,
        description="Baseline model spec (same forms as model); adds a paired comparison with CIs and p-values.",
    )
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "input_output"] = Field(
        default="auto", description="Row shape of the data file; auto detects it per row."
    )
    system_prompt: str | None = Field(
        default=None,
        description="System prompt for every row, replacing the data's own. Unset: the one recorded by training "
        "(adapter or registry version), added where a row has none. Empty string: no added system prompt.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Path of a Jinja chat template for the candidate, replacing the one recorded at training "
        "(HF and adapter models only).",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Most tokens generated per example (greedy).")
    batch_size: int = Field(
        default=16, ge=1, description="Examples generated together (HF models, left padding)."
    )
    metrics: list[str] | None = Field(
        default=None,
        description=f"Quality metrics, any of {', '.join(ALLOWED)}. Unset: JSON metrics when most references "
        "are JSON objects, else exact_match and token_f1. Latency and tokens/s are always measured.",
    )
    n_bootstrap: int = Field(
        default=2000, ge=100, description="Bootstrap and permutation resamples per metric."
    )
    ci_level: float = Field(default=0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")
    seed: int = Field(
        default=0, description="Seed for the bootstrap, the permutation test and the generators."
    )
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N rows.")
    timeout_s: float = Field(
        default=120.0, gt=0, description="Seconds to wait for one endpoint answer (connecting: at most 5 s)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where HF and GGUF models run; auto picks cuda when available (HF: bf16 on "
        "cuda, fp32 on cpu).",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for torch and llama.cpp; unset: every core (os.cpu_count()).",
    )
    n_ctx: int = Field(default=4096, ge=256, description="Context size for GGUF models (llama.cpp).")
    report_examples: int = Field(default=20, ge=0, description="Examples shown side by side in report.md.")
    allow_pickle: bool = Field(default=False, description="Allow loading pickle weights (can run code).")
    registry_root: str | None = Field(
        default=None, description="Registry root for NAME@vN refs and for attaching the result to a version."
    )
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        try:
            return check_metric_names(list(value))
        except TuneshipError as e:
            raise ValueError(str(e)) from None
