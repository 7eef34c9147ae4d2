"""Launch specs for the model servers: pure functions from what to serve to the exact command line.

- llama.cpp: one llama-cpp-python OpenAI-compatible server per GGUF (`python -m llama_cpp.server`), which
  names the model `--model_alias` (the version's backend name, NAME-vN).
- vLLM: one `vllm serve BASE` with every adapter as a LoRA module in vLLM's JSON form, sized so all fit:
  `--max-loras` >= adapters, `--max-lora-rank` the smallest value vLLM allows that is >= the largest r,
  `--max-cpu-loras` >= `--max-loras`. An adapter trained on another base is refused.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.errors import TuneshipError

# vLLM's allowed --max-lora-rank values: `MaxLoRARanks` in vllm/config/lora.py (checked against vLLM's source).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LaunchSpec:
    """One process to start: its argv, the base URL it will answer on, and the path that says it is ready."""

    role: str  # backend | router
    label: str  # NAME@vN, NAME (a vLLM server of several adapters) or router
    argv: list[str]
    host: str
    port: int
    ready_path: str = "/v1/models"
    env: dict[str, str] = field(default_factory=dict)
    # child variable -> the supervisor's variable it is copied from (secrets stay out of argv and printouts)
    env_from: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)  # version -> model name at this server

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}"

    def shell(self) -> str:
        """The command as one shell line (environment assignments first)."""
        parts = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        parts += [f'{k}="${src}"' for k, src in self.env_from.items()]
        if self.unset_env:
            parts = ["env", *(f"-u {k}" for k in self.unset_env), *parts]
        return " ".join([*parts, shlex.join(self.argv)])

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "label": self.label,
            "url": self.url,
            "command": self.shell(),
            "argv": self.argv,
            "models": self.models,
        }


def llamacpp_spec(
    gguf: str | Path,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    label: str | None = None,
    version: str | None = None,
    extra: list[str] | tuple[str, ...] = (),
    python: str | None = None,
) -> LaunchSpec:
    gguf = Path(gguf)
    if gguf.suffix != ".gguf":
        raise TuneshipError(
            f"{gguf} is not a .gguf file; llama.cpp serves GGUF (run `tuneship export gguf` first)"
        )
    argv = [
        python or sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        model_name,
    ]
    argv += ["--host", host, "--port", str(port), "--n_ctx", str(n_ctx)]
    if n_threads:
        argv += ["--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)]
    argv += list(extra)
    return LaunchSpec(
        role="backend",
        label=label or model_name,
        argv=argv,
        host=host,
        port=port,
        # llama-cpp-python lets $HOST and $PORT override --host and --port: drop them (containers set PORT)
        unset_env=("HOST", "PORT"),
        models={version or model_name: model_name},
    )


@dataclass
class LoraModule:
    """One adapter for vLLM: the module name requests use, where it lies, its base identity and rank."""

    name: str
    path: str
    base: dict  # {spec, id, revision, sha256}
    r: int | None


def allowed_lora_ranks() -> tuple[int, ...]:
    """vLLM's own list when vLLM is importable, else the list above."""
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks  # type: ignore[import-not-found]

        ranks = tuple(sorted(int(x) for x in get_args(MaxLoRARanks)))
        return ranks or VLLM_MAX_LORA_RANKS
    except Exception:
        return VLLM_MAX_LORA_RANKS


def max_lora_rank_for(r: int, allowed: tuple[int, ...] | None = None) -> int:
    """The smallest allowed --max-lora-rank that is at least r."""
    allowed = tuple(sorted(allowed or VLLM_MAX_LORA_RANKS))
    for value in allowed:
        if value >= r:
            return value
    raise TuneshipError(
        f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({allowed[-1]}); retrain with r <= {allowed[-1]}"
    )


def same_base(a: dict, b: dict) -> bool:
    """Two base identities match: by sha256 when both have one, else by id (or spec) and revision."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    ida, idb = a.get("id") or a.get("spec"), b.get("id") or b.get("spec")
    return bool(ida) and ida == idb and (a.get("revision") or None) == (b.get("revision") or None)


def base_label(base: dict) -> str:
    return str(base.get("spec") or base.get("id") or "?")


def vllm_spec(
    base_arg: str,
    base: dict,
    modules: list[LoraModule],
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    max_loras: int | None = None,
    allowed_ranks: tuple[int, ...] | None = None,
    extra: list[str] | tuple[str, ...] = (),
    label: str = "vllm",
) -> LaunchSpec:
    """`vllm serve BASE --enable-lora --lora-modules {...} ...` for `modules` on the base `base`.

    `base_arg` is what vLLM loads (an HF id or a local checkpoint); `base` is its identity, which every
    adapter's recorded base must match.
    """
    if not modules:
        raise TuneshipError("no adapters to serve with vLLM")
    for m in modules:
        if not same_base(m.base, base):
            raise TuneshipError(
                f"adapter {m.name} was trained on {base_label(m.base)}, but this vLLM server's base is "
                f"{base_label(base)}; serve it on its own base or retrain it on this one"
            )
    ranks = [int(m.r) for m in modules if m.r]
    max_r = max(ranks) if ranks else 16
    n = max(len(modules), max_loras or 0)
    argv = ["vllm", "serve", base_arg, "--host", host, "--port", str(port)]
    if served_name:
        argv += ["--served-model-name", served_name]
    argv += ["--enable-lora", "--lora-modules"]
    argv += [json.dumps({"name": m.name, "path": m.path, "base_model_name": base_arg}) for m in modules]
    argv += [
        "--max-loras",
        str(n),
        "--max-lora-rank",
        str(max_lora_rank_for(max_r, allowed_ranks or allowed_lora_ranks())),
    ]
    argv += ["--max-cpu-loras", str(n)]
    argv += list(extra)
    return LaunchSpec(
        role="backend",
        label=label,
        argv=argv,
        host=host,
        port=port,
        # lets the router add a version later without a restart (POST /v1/load_lora_adapter)
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        models={m.name: m.name for m in modules},
    )


def load_lora_request(url: str, name: str, path: str) -> tuple[str, dict]:
    """The POST that loads an adapter into a running vLLM server: (endpoint URL, JSON body)."""
    return f"{url.rstrip('/')}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}


def load_lora_adapter(url: str, name: str, path: str, timeout: float = 120.0) -> None:
    """Load one more adapter into a running vLLM server (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    import httpx

    endpoint, body = load_lora_request(url, name, path)
    try:
        resp = httpx.post(endpoint, json=body, timeout=timeout, trust_env=False)
    except httpx.HTTPError as e:
        raise TuneshipError(f"vLLM at {url} could not be asked to load adapter {name}: {e}") from e
    if resp.status_code != 200:
        raise TuneshipError(
            f"vLLM at {url} refused to load adapter {name}: HTTP {resp.status_code} {resp.text[:200]}"
        )


def vllm_merged_spec(
    model_dir: str, served_name: str, host: str = "127.0.0.1", port: int = 8000
) -> LaunchSpec:
    """`vllm serve MERGED_DIR --served-model-name NAME` for a merged checkpoint (no LoRA)."""
    argv = [
        "vllm",
        "serve",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        served_name,
    ]
    return LaunchSpec(
        role="backend", label=served_name, argv=argv, host=host, port=port, models={served_name: served_name}
    )
