"""Serving: llama.cpp and vLLM backends, and the A/B router in front of a registered name's versions.

Heavy or optional imports (llama_cpp, vllm, torch) stay inside functions; importing this package is cheap.
"""

from tuneship.serve.backends import LaunchSpec, LoraModule, llamacpp_spec, max_lora_rank_for, vllm_spec
from tuneship.serve.hashing import pick_random, pick_sticky
from tuneship.serve.router import Backend, RouterConfig, build_app
from tuneship.serve.routes import RegistryRouteSource, Route, StaticRouteSource
from tuneship.serve.watcher import WatcherConfig

__all__ = [
    "Backend",
    "LaunchSpec",
    "LoraModule",
    "RegistryRouteSource",
    "Route",
    "RouterConfig",
    "StaticRouteSource",
    "WatcherConfig",
    "build_app",
    "llamacpp_spec",
    "max_lora_rank_for",
    "pick_random",
    "pick_sticky",
    "vllm_spec",
]
