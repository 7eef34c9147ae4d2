"""How closely a GGUF reproduces its HF source: KL divergence and top-1 agreement of next-token distributions.

Both models see the very same token ids (the probe conversations, tokenized once by the HF tokenizer). The HF
model runs in fp32 and is the reference P; the GGUF runs in llama.cpp with `logits_all=True` and gives Q. We
report, over every position, the mean KL(P || Q) (as llama.cpp's `llama-perplexity --kl-divergence` does),
its maximum, and how often the argmax tokens agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logprobs(model_dir: str | Path, ids_list: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, trust_remote_code=False
    ).eval()
    out = []
    with torch.inference_mode():
        for ids in ids_list:
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            out.append(_log_softmax(logits).astype(np.float32))
    return out


def gguf_logprobs(
    gguf_path: str | Path, ids_list: list[list[int]], threads: int | None = None
) -> list[np.ndarray]:
    from llama_cpp import Llama

    n_ctx = max(map(len, ids_list)) + 8
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads or os.cpu_count() or 1,
        verbose=False,
    )
    out = []
    try:
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            out.append(_log_softmax(np.array(llm.scores[: len(ids)])).astype(np.float32))
    finally:
        llm.close()
    return out


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Mean and max KL(reference || candidate) per position, and top-1 agreement."""
    kls, agree, n = [], 0, 0
    for p_log, q_log in zip(reference, candidate, strict=True):
        if p_log.shape != q_log.shape:
            raise ValueError(f"shape mismatch {p_log.shape} vs {q_log.shape}")
        p64 = p_log.astype(np.float64)
        kls.append((np.exp(p64) * (p64 - q_log.astype(np.float64))).sum(axis=-1))
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        n += p_log.shape[0]
    kl = np.concatenate(kls)
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1": agree / n,
        "n_tokens": n,
    }
