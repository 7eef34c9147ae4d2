"""`export gguf`: HF checkpoint -> f16 GGUF -> quantized GGUFs, each measured against the HF model, plus an
Ollama Modelfile and the record.

Layout of the export directory (names are fixed so other stages and tests can rely on them):
    model-f16.gguf          llama.cpp's converter output (always kept: the lossless reference)
    model-<QUANT>.gguf      one per requested quant type, e.g. model-Q4_K_M.gguf
    Modelfile               Ollama: FROM ./model-<first quant>.gguf, TEMPLATE, stop PARAMETERs, SYSTEM
    tuneship.json           kind "gguf": per-file sha256/size/KL/top-1/gate, lineage, template sha, stops
"""

from __future__ import annotations

import time
from pathlib import Path

from tuneship.artifacts import RECORD, atomic_dir, read_record, sha256_dir, sha256_file, write_record
from tuneship.errors import TuneshipError
from tuneship.export import llamacpp
from tuneship.models import REF_RE, chat_template_info, check_no_pickle, hf_identity, resolve
from tuneship.progress import log

F16_MAX_KL = 1e-3
# Default gates (max mean KL, min top-1 agreement) per quant type, for the held-out probes in probes.py.
# Measured on merged SmolLM2-135M (hidden 576, so K-quants fall back to Q5_0/Q4_0 for 180 of 272 tensors):
#   shared 6-step QLoRA adapter (tests): f16 KL 6e-6 top-1 100% | Q4_K_M KL 0.124 top-1 89%
#   a random LoRA: Q8_0 0.006 96% | Q6_K 0.019 94% | Q5_K_M 0.093 86% | Q4_K_M 0.090 85% | Q3_K_M 0.16 82% |
#   Q4_0 0.49 68%
# How far a fine-tune moves these differs (0.090 vs 0.124 at Q4_K_M), so the gates sit about 2x above the
# worst figure seen: they catch a broken conversion or quantization (KL of whole units) and a gross loss,
# with room for other fine-tunes. Larger models quantize better (llama.cpp reports KL 0.031 and top-1 91.9%
# for Llama-3-8B at Q4_K_M), so for them these are loose; tighten with --gate-kl/--gate-top1.
DEFAULT_GATES: dict[str, tuple[float, float]] = {
    "F16": (F16_MAX_KL, 0.99),
    "BF16": (F16_MAX_KL, 0.99),
    "Q8_0": (0.03, 0.90),
    "Q6_K": (0.08, 0.85),
    "Q5_K_M": (0.25, 0.75),
    "Q5_K_S": (0.25, 0.75),
    "Q4_K_M": (0.25, 0.75),
    "Q4_K_S": (0.3, 0.72),
}
# Any other type (Q4_0, Q3_*, Q2_*, IQ*): a sanity gate only, catching a broken file rather than judging quality.
FALLBACK_GATE = (1.0, 0.5)
F16_NAME = "model-f16.gguf"
MODELFILE = "Modelfile"


def gguf_name(quant: str) -> str:
    return F16_NAME if quant.upper() == "F16" else f"model-{quant.upper()}.gguf"


def _model_dir(model: str | Path, allow_pickle: bool) -> Path:
    if REF_RE.match(str(model)) and not Path(model).exists():
        # a registered version: export the merged model attached to it
        from tuneship.registry import show

        merged = (show(str(model)) or {}).get("merged") or {}
        if not merged.get("path"):
            raise TuneshipError(
                f"{model} has no merged model yet; run `tuneship merge {model} --out DIR` first"
            )
        model = merged["path"]
    spec = resolve(str(model), allow_pickle=allow_pickle)
    if spec.kind == "adapter":
        raise TuneshipError(f"{model} is an adapter; merge it first: tuneship merge {model} --out DIR")
    if spec.kind != "hf" or not spec.path or not Path(spec.path).is_dir():
        raise TuneshipError(
            f"{model} is not a local HF checkpoint directory; export gguf converts one (for example a merged dir)"
        )
    p = Path(spec.path)
    check_no_pickle(p, allow_pickle)
    return p


def _gate(quant: str, gate_kl: float | None, gate_top1: float | None) -> dict:
    kl, top1 = DEFAULT_GATES.get(quant, FALLBACK_GATE)
    source = "default" if quant in DEFAULT_GATES else "fallback"
    if quant not in ("F16", "BF16"):
        if gate_kl is not None:
            kl, source = gate_kl, "user"
        if gate_top1 is not None:
            top1, source = gate_top1, "user"
    return {"max_kl": kl, "min_top1": top1, "source": source}


def export_gguf(
    model: str | Path,
    out: str | Path,
    quants: tuple[str, ...] | list[str] = ("Q4_K_M",),
    gate_kl: float | None = None,
    gate_top1: float | None = None,
    system: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    modelfile: bool = True,
    f16_max_kl: float = F16_MAX_KL,
) -> dict:
    """Convert MODEL (a merged or any local HF checkpoint dir, or a registry ref) to GGUF in `out`, measure
    each file against the HF model, gate it, and write the Modelfile and record. Returns the summary."""
    started = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise TuneshipError(f"output {out} already exists; choose another --out or pass --overwrite")
    quants = list(
        dict.fromkeys(q.strip().upper() for q in quants if q.strip() and q.strip().upper() != "F16")
    )
    for q in quants:
        llamacpp.ftype(q)  # unknown names fail here, before any work
    llamacpp.converter_path()  # `make setup` must have fetched it
    model_dir = _model_dir(model, allow_pickle)
    record = read_record(model_dir) if (model_dir / RECORD).exists() else {}

    from transformers import AutoTokenizer

    from tuneship.export import ollama
    from tuneship.export.fidelity import compare, gguf_logprobs, hf_logprobs
    from tuneship.export.probes import PROBES, probe_token_ids

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # no or broken tokenizer files
        raise TuneshipError(
            f"{model_dir} has no usable tokenizer ({type(e).__name__}); save the tokenizer beside the weights"
        ) from None
    template = chat_template_info(tokenizer)
    if (
        record.get("chat_template_sha256")
        and record["chat_template_sha256"] != template["chat_template_sha256"]
    ):
        raise TuneshipError(
            f"the chat template in {model_dir} no longer matches its record (sha256 {record['chat_template_sha256'][:12]}); "
            "the checkpoint was modified after it was written"
        )
    system_prompt = system if system is not None else record.get("system_prompt")
    family, go_template = (None, None)
    if modelfile:  # an unknown template family fails here, before converting
        family, go_template = ollama.go_template(tokenizer)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        f16 = tmp / F16_NAME
        log(
            f"converting {model_dir} to {F16_NAME} with llama.cpp's convert_hf_to_gguf.py ({llamacpp.runtime_version()})"
        )
        llamacpp.convert(model_dir, f16, "f16")
        fallbacks = {}
        for q in quants:
            fallbacks[q] = llamacpp.quantize(f16, tmp / gguf_name(q), q)
            fb = fallbacks[q]
            note = (
                f" ({fb['fallback_tensors']} of {fb['tensors']} tensors needed a fallback type)"
                if fb["fallback_tensors"]
                else ""
            )
            log(f"quantized to {q}{note}")

        ids = probe_token_ids(tokenizer, system_prompt)
        log(f"measuring KL / top-1 against the HF model in fp32 on {len(ids)} held-out conversations")
        reference = hf_logprobs(model_dir, ids)
        files: dict[str, dict] = {}
        failures = []
        for q in ["F16", *quants]:
            name = gguf_name(q)
            figures = compare(reference, gguf_logprobs(tmp / name, ids))
            gate = _gate(q, gate_kl, gate_top1)
            if q == "F16":
                gate["max_kl"] = f16_max_kl
            passed = figures["kl"] <= gate["max_kl"] and figures["top1"] >= gate["min_top1"]
            log(
                f"{name}: KL {figures['kl']:.3g} (max {gate['max_kl']:g}), top-1 {figures['top1']:.1%} "
                f"(min {gate['min_top1']:.0%}) {'ok' if passed else 'FAILED'}"
            )
            files[name] = {"quant": q, **figures, "gate": gate, "passed": passed, **fallbacks.get(q, {})}
            if not passed:
                failures.append(
                    f"{name} KL {figures['kl']:.3g} (max {gate['max_kl']:g}), top-1 {figures['top1']:.1%} "
                    f"(min {gate['min_top1']:.0%})"
                )
        if failures:
            raise TuneshipError(
                "GGUF fidelity gate failed: " + "; ".join(failures) + "; nothing was written "
                "(loosen with --gate-kl/--gate-top1 only if you accept the loss)"
            )
        for name, info in files.items():
            info["sha256"] = sha256_file(tmp / name)
            info["bytes"] = (tmp / name).stat().st_size

        model_file = gguf_name(quants[0]) if quants else F16_NAME
        if modelfile:
            header = f"Generated by tuneship from {model_dir} (chat template sha256 {template['chat_template_sha256']})"
            text = ollama.modelfile_text(
                model_file, go_template, template["stop_tokens"], system_prompt, header
            )
            (tmp / MODELFILE).write_text(text)

        metrics = {}
        for info in files.values():
            key = info["quant"].lower()
            metrics[f"{key}_kl"] = info["kl"]
            metrics[f"{key}_top1"] = info["top1"]
        parent_sha = record.get("sha256") or sha256_dir(model_dir)
        fields = {
            "sha256": sha256_dir(tmp),
            "parent": {
                "kind": record.get("kind", "hf"),
                "path": str(model_dir.resolve()),
                "sha256": parent_sha,
            },
            "base_model": record.get("base_model") or hf_identity(str(model_dir)),
            **template,
            "template_family": family,
            "system_prompt": system_prompt,
            "lora": record.get("lora"),
            "dataset_sha256": record.get("dataset_sha256"),
            "model_file": model_file,
            "modelfile": MODELFILE if modelfile else None,
            "files": files,
            "llama_cpp": {
                "dist": llamacpp.DIST,
                "version": llamacpp.runtime_version(),
                "converter": "convert_hf_to_gguf.py",
            },
            "probes": {"conversations": len(PROBES), "tokens": sum(map(len, ids))},
            "metrics": {**metrics, "seconds": round(time.time() - started, 1)},
        }
        write_record(tmp, "gguf", **fields)
    result = {"out": str(out), "kind": "gguf", "model_path": str(out / model_file), **fields}
    result["registry"] = _attach(model, out, fields)
    return result


def _attach(source: str | Path, out: Path, fields: dict) -> list[str]:
    """Attach each quantized file to the registry version MODEL came from (a no-op outside the registry).
    The Modelfile's quant goes in with the whole export dir; further quants with just their file."""
    try:
        from tuneship.registry import attach_result
    except ImportError:
        return []
    attached = []
    quantized = [(n, i) for n, i in fields["files"].items() if i["quant"] != "F16"] or list(
        fields["files"].items()
    )
    for name, info in quantized:
        data = {**{k: v for k, v in fields.items() if k != "files"}, **info, "file": name}
        artifact = out if name == fields["model_file"] else out / name
        ref = attach_result(source=str(source), kind="gguf", data=data, artifact=str(artifact))
        if ref:
            attached.append(ref)
    return attached
