"""Merge a LoRA adapter into its base, in bf16, and check the result.

The base is reloaded in bf16 (never 4-bit, even for a QLoRA adapter), the adapter is folded in with PEFT's
`merge_and_unload`, and the result is saved as sharded safetensors with the tokenizer and chat template.
The merge is then verified: the saved checkpoint, reloaded, must give the same logits as a *fresh* base with
the adapter applied (merge_and_unload changes its base object in place, so that one cannot be the reference).
"""

from __future__ import annotations

import time
from pathlib import Path

from tuneship.artifacts import RECORD, atomic_dir, read_record, sha256_dir, write_record
from tuneship.errors import TuneshipError
from tuneship.models import (
    ModelSpec,
    adapter_base_spec,
    chat_template_info,
    check_no_pickle,
    resolve,
    same_base,
)
from tuneship.progress import log

# The gate on max |logit difference| between the saved merged checkpoint and base+adapter (both run in fp32).
# Adding a small LoRA delta to a bf16 weight rounds the *delta* to the weight's bf16 step, so the merged
# logits carry an error proportional to how far the adapter moves them: measured about 0.1x the adapter's own
# effect on SmolLM2-135M. A lost, doubled or mis-scaled adapter errs by about 1x. So the bound is relative to
# the adapter's effect, with a small absolute floor for adapters that barely move the logits.
DEFAULT_TOLERANCE = 0.5  # x the adapter's max |effect| on the logits
ABS_FLOOR = 0.05
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _describe(identity: dict) -> str:
    return identity.get("spec") or identity.get("id") or "an unknown base"


def _adapter_dir(adapter: str | Path, allow_pickle: bool) -> tuple[Path, str | None]:
    p = Path(adapter)
    if p.is_dir():
        if not (p / "adapter_config.json").exists():
            raise TuneshipError(
                f"{p} is not an adapter directory (no adapter_config.json); give what `tuneship train` wrote"
            )
        check_no_pickle(p, allow_pickle)
        return p, None
    spec = resolve(str(adapter), allow_pickle=allow_pickle)  # registry refs
    if spec.kind != "adapter" or not spec.path:
        raise TuneshipError(
            f"{adapter} resolves to a {spec.kind} model, not an adapter; merge takes an adapter"
        )
    return Path(spec.path), spec.registry_ref


def _resolve_base(adapter_dir: Path, record: dict, base: str | None, allow_pickle: bool) -> ModelSpec:
    recorded = record.get("base_model") or {}
    if base is not None:
        spec = resolve(base, allow_pickle=allow_pickle)
        if spec.kind != "hf":
            raise TuneshipError(
                f"--base {base} is a {spec.kind} model; give the HF checkpoint the adapter was trained on"
            )
        if recorded and not same_base(recorded, spec.identity):
            raise TuneshipError(
                f"adapter {adapter_dir} was trained on {_describe(recorded)}, not on --base {base}; "
                "merge it into the base it was trained on (drop --base)"
            )
        return spec
    spec = resolve(adapter_base_spec(adapter_dir), allow_pickle=allow_pickle)
    if spec.kind != "hf":
        raise TuneshipError(
            f"adapter {adapter_dir} names a {spec.kind} base; pass --base with an HF checkpoint"
        )
    if recorded and not same_base(recorded, spec.identity):
        raise TuneshipError(
            f"adapter {adapter_dir} was trained on {_describe(recorded)} but that spec now resolves to a different "
            f"model ({spec.identity.get('id')}); pass --base with the exact base it was trained on"
        )
    return spec


def _logits(model, ids_list) -> list:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].float() for ids in ids_list]


def verify_merge(merged_dir: Path, base_path: str, adapter_dir: Path, ids_list: list[list[int]]) -> dict:
    """Max |logit| difference of the saved merged model vs a fresh base + adapter, both in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    ref = _logits(reference, ids_list)
    with reference.disable_adapter():
        plain = _logits(reference, ids_list)
    del reference, fresh
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    got = _logits(merged, ids_list)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    effect = max(float((a - b).abs().max()) for a, b in zip(ref, plain, strict=True))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got, strict=True))
    n = sum(map(len, ids_list))
    return {
        "max_abs_diff": diff,
        "adapter_effect_max_abs": effect,
        "top1_agreement": agree / n,
        "n_tokens": n,
    }


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "1GB",
    tolerance: float = DEFAULT_TOLERANCE,
    allow_pickle: bool = False,
    n_probes: int = 3,
) -> dict:
    """Merge `adapter` (a dir or registry ref) into its bf16 base, save to `out`, verify, and return a summary."""
    started = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise TuneshipError(f"output {out} already exists; choose another --out or pass --overwrite")
    adapter_dir, ref = _adapter_dir(adapter, allow_pickle)
    record = read_record(adapter_dir) if (adapter_dir / RECORD).exists() else {}
    if record and record.get("kind") not in (None, "adapter"):
        raise TuneshipError(f"{adapter_dir} is a {record.get('kind')!r} artifact, not an adapter")
    base_spec = _resolve_base(adapter_dir, record, base, allow_pickle)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneship.export.probes import probe_token_ids

    tok_src = (
        adapter_dir if any((adapter_dir / f).exists() for f in TOKENIZER_FILES) else Path(base_spec.path)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=False)
    template = chat_template_info(tokenizer)
    recorded_sha = record.get("chat_template_sha256")
    if recorded_sha and template["chat_template_sha256"] != recorded_sha:
        raise TuneshipError(
            f"the chat template in {tok_src} (sha256 {str(template['chat_template_sha256'])[:12]}) is not the one the "
            f"adapter was trained with ({recorded_sha[:12]}); restore the adapter's tokenizer files"
        )

    log(f"merging {adapter_dir} into {_describe(base_spec.identity)} in bf16")
    model = AutoModelForCausalLM.from_pretrained(
        base_spec.path, dtype=torch.bfloat16, trust_remote_code=False
    )
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        del merged, model
        log("verifying merged logits against a fresh base + adapter")
        check = verify_merge(
            tmp,
            base_spec.path,
            adapter_dir,
            probe_token_ids(tokenizer, record.get("system_prompt"), limit=n_probes),
        )
        bound = max(ABS_FLOOR, tolerance * check["adapter_effect_max_abs"])
        log(
            f"max |logit diff| {check['max_abs_diff']:.4g} (bound {bound:.4g}); adapter moves logits by up to "
            f"{check['adapter_effect_max_abs']:.4g}; top-1 agreement {check['top1_agreement']:.1%}"
        )
        if not check["max_abs_diff"] <= bound:
            raise TuneshipError(
                f"merged model's logits differ from base+adapter by {check['max_abs_diff']:.4g}, above the bound "
                f"{bound:.4g} ({tolerance} x the adapter's effect {check['adapter_effect_max_abs']:.4g}); "
                "the merge is wrong, nothing was written"
            )
        digest = sha256_dir(tmp)
        parent_sha = record.get("sha256") or sha256_dir(adapter_dir)
        fields = {
            "sha256": digest,
            "parent": {
                "kind": "adapter",
                "path": str(adapter_dir.resolve()),
                "sha256": parent_sha,
                "registry_ref": ref,
            },
            "base_model": base_spec.identity,
            **template,
            "system_prompt": record.get("system_prompt"),
            "lora": record.get("lora"),
            "dataset_sha256": record.get("dataset_sha256"),
            "dtype": "bfloat16",
            "max_shard_size": max_shard_size,
            "merge_max_abs_diff": check["max_abs_diff"],
            "metrics": {
                **check,
                "tolerance": tolerance,
                "bound": bound,
                "seconds": round(time.time() - started, 1),
            },
            "files": sorted(p.name for p in tmp.iterdir() if p.is_file()),
        }
        write_record(tmp, "merged", **fields)
    result = {"out": str(out), "kind": "merged", "adapter": str(adapter_dir), **fields}
    result["registry"] = _attach(adapter, out, fields)
    return result


def _attach(source: str | Path, out: Path, data: dict):
    try:
        from tuneship.registry import attach_result
    except ImportError:
        return None
    return attach_result(source=str(source), kind="merged", data=data, artifact=str(out))
