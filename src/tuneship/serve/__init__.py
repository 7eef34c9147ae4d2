"""Serving: llama.cpp and vLLM backends, and the A/B router in front of a registered name's versions.

Names are imported lazily, so `python -m tuneship.serve.router` and the CLI's --help stay cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Backend": "tuneship.serve.router",
    "RouterConfig": "tuneship.serve.router",
    "build_app": "tuneship.serve.router",
    "LaunchSpec": "tuneship.serve.backends",
    "LoraModule": "tuneship.serve.backends",
    "llamacpp_spec": "tuneship.serve.backends",
    "max_lora_rank_for": "tuneship.serve.backends",
    "vllm_spec": "tuneship.serve.backends",
    "pick_random": "tuneship.serve.hashing",
    "pick_sticky": "tuneship.serve.hashing",
    "RegistryRouteSource": "tuneship.serve.routes",
    "Route": "tuneship.serve.routes",
    "StaticRouteSource": "tuneship.serve.routes",
    "WatcherConfig": "tuneship.serve.watcher",
    "Supervisor": "tuneship.serve.launch",
    "plan_registry": "tuneship.serve.launch",
    "RouteFollower": "tuneship.serve.launch",
    "plan_gguf": "tuneship.serve.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tuneship.serve' has no attribute {name!r}")
