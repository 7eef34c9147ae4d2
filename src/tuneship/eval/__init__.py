"""The eval stage: one eval path for a candidate and a baseline, with bootstrap CIs and a paired comparison.

`run_eval(EvalConfig(...)) -> dict` writes eval.json, report.md, samples.jsonl and metrics.png and returns the
--json summary. Heavy libraries (torch, transformers, llama_cpp) are imported only when a model is loaded.
"""

from tuneship.eval.config import EvalConfig
from tuneship.eval.run import run_eval

__all__ = ["EvalConfig", "run_eval"]
