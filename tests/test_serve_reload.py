"""A version added to the route while `tuneship serve NAME` runs gets a backend, then traffic, with no request lost.

The real command runs as a subprocess over a registry holding only jobs@v1 (the shared adapter, with the
session's Q4_K_M GGUF). Under steady load from the real `openai` client, the test then registers jobs@v2 (the
"pure" Q4_K_M of the same merge, tests/fixtures_serve.py) and promotes it to canary at 50 %: the serving process
must start a llama.cpp backend for it and hand it to the router. Then jobs@v3, which has no GGUF, is promoted
in v2's place: its backend cannot start, so its users stay on stable, and v2 keeps running off the route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures_serve import NAME, QUANT, port_closed, read_summary
from tuneship import registry as reg
from tuneship.serve.hashing import pick_sticky

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Data Analyst at Globex, Paris. Remote: no"}]
USERS = [f"user-{i:02d}" for i in range(30)]


def ask(client, user: str, model: str = NAME) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MSG, max_tokens=2, temperature=0, user=user
    )
    raw.parse()
    return raw.headers["x-tuneship-version"]


def wait_for(what: str, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_version_added_while_serving_gets_a_backend_then_traffic(adapter_dir, serve_ggufs, tmp_path):
    from tuneship.serve.launch import free_port

    root = tmp_path / "registry"
    v1 = reg.add_version(adapter_dir, NAME, root=root)
    reg.attach_result(v1, "gguf", {"quant": QUANT}, artifact=serve_ggufs["v1"], root=root)
    reg.promote(v1, to="stable", root=root)

    port, logs = free_port(), tmp_path / "logs"
    exe = Path(sys.executable).with_name("tuneship")  # the installed console script, as users run it
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tuneship.cli"]
    cmd += ["serve", NAME, "--root", str(root), "--port", str(port)]
    cmd += ["--threads", "1", "--log-dir", str(logs), "--no-watcher", "--json"]
    err_path = tmp_path / "serve.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "TUNESHIP_QUIET": ""},
        )
    stderr = err_path.read_text
    try:
        summary = read_summary(proc, timeout=60)
        assert [p["label"] for p in summary["processes"]] == [f"{NAME}@v1", "router"]
        client = openai.OpenAI(base_url=summary["base_url"], api_key="none", max_retries=0, timeout=60)
        assert ask(client, "warm-up") == "v1"

        outcomes: list[tuple[float, str]] = []  # (finished at, version or "error: ...")
        stop = threading.Event()

        def load(k: int) -> None:
            i = 0
            while not stop.is_set():
                user = USERS[(k * 7 + i) % len(USERS)]
                i += 1
                try:
                    version = ask(client, user)
                except openai.APIError as e:
                    version = f"error: {e}"
                outcomes.append((time.monotonic(), version))

        threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            # -- jobs@v2 joins the route at 50 %: it gets a backend, and only then its users
            v2 = reg.add_version(adapter_dir, NAME, root=root)
            reg.attach_result(v2, "gguf", {"quant": QUANT}, artifact=serve_ggufs["v2"], root=root)
            t_promote = time.monotonic()
            reg.promote(v2, to="canary", weight=50, root=root)
            wait_for("v2 to answer", lambda: any(v == "v2" for _, v in outcomes), timeout=60)
            ready_line = [line for line in stderr().splitlines() if f"{NAME}@v2 ready on" in line]
            assert ready_line, stderr()[-3000:]
            first_v2 = min(t for t, v in outcomes if v == "v2")
            print(f"v2 took {first_v2 - t_promote:.1f} s from promotion to its first answer")
            split = {"v1": 50.0, "v2": 50.0}
            for user in USERS:
                assert ask(client, user) == pick_sticky(user, split), user
            assert {pick_sticky(u, split) for u in USERS} == {"v1", "v2"}

            # -- jobs@v3 (no GGUF) replaces v2 as canary: its backend fails, its users stay on stable
            v3 = reg.add_version(adapter_dir, NAME, root=root)
            reg.promote(v3, to="canary", weight=50, root=root)
            wait_for(
                "the v3 failure log line",
                lambda: f"{NAME}@v3 joined the route but its backend failed" in stderr(),
                timeout=30,
            )
            wait_for(
                "the router to load the v3 route",
                lambda: (
                    httpx.get(summary["url"] + "/ready", trust_env=False).json()["routes"][NAME]["canary"]
                    == "v3"
                ),
                timeout=10,
            )
            assert f"no {QUANT} GGUF" in stderr()
            moved = [u for u in USERS if pick_sticky(u, {"v1": 50.0, "v3": 50.0}) == "v3"]
            assert moved  # some users would be on v3 if it had a backend
            assert {ask(client, u) for u in USERS} == {"v1"}
            assert ask(client, "pinned", model=f"{NAME}@v2") == "v2"  # v2 left the route but still runs
        finally:
            stop.set()
            for t in threads:
                t.join()
        errors = [v for _, v in outcomes if v.startswith("error")]
        assert not errors, errors[:3]
        assert len(outcomes) >= 20 and {v for _, v in outcomes} >= {"v1", "v2"}

        table = json.loads((logs / "backends.json").read_text())[NAME]
        assert sorted(table) == ["v1", "v2"]
        v2_port = int(table["v2"]["url"].rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert port_closed(port) and port_closed(v2_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_vllm_follower_loads_a_new_version_through_load_lora_adapter(adapter_dir, tmp_path):
    """vLLM needs a GPU: a small recording HTTP server stands in for it, to check the request that is sent."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tuneship.serve.backends import load_lora_request
    from tuneship.serve.launch import Supervisor, plan_registry
    from tuneship.serve.stub import ServerThread

    root = tmp_path / "registry"
    reg.promote(reg.add_version(adapter_dir, NAME, root=root), to="stable", root=root)
    backends_file = tmp_path / "backends.json"
    plan = plan_registry(NAME, str(root), "vllm", "127.0.0.1", 0, backends_file=str(backends_file))
    assert plan.follower is not None and "--backends-file" in plan.specs[-1].argv
    calls: list[tuple[str, dict]] = []

    async def load(request):
        calls.append((str(request.url), await request.json()))
        return PlainTextResponse("Success")

    server = ServerThread(Starlette(routes=[Route("/v1/load_lora_adapter", load, methods=["POST"])])).start()
    try:
        plan.follower.vllm_url = server.url  # the running vLLM server, as far as the follower knows
        assert plan.follower.check(Supervisor([], log_dir=tmp_path)) == []  # nothing changed yet
        v2 = reg.add_version(adapter_dir, NAME, root=root)
        reg.promote(v2, to="canary", weight=10, root=root)
        assert plan.follower.check(Supervisor([], log_dir=tmp_path)) == ["v2"]
    finally:
        server.stop()
    adapter_path = reg.export_route(NAME, root=root)["versions"]["v2"]["adapter_path"]
    assert calls == [
        (server.url + "/v1/load_lora_adapter", {"lora_name": f"{NAME}-v2", "lora_path": adapter_path})
    ]
    assert load_lora_request(server.url, f"{NAME}-v2", adapter_path) == (calls[0][0], calls[0][1])
    table = json.loads(backends_file.read_text())[NAME]
    assert table["v2"] == {"url": server.url + "/v1", "model": f"{NAME}-v2"}
