"""Serving for real: two registered versions on llama.cpp behind the router, asked with the `openai` client.

Setup (tests/fixtures_serve.py): the shared QLoRA adapter registered twice as jobs@v1 (stable, 90) and
jobs@v2 (canary, 10). Their GGUFs are two Q4_K_M quantizations of the same merge: v1 the export stage's own
file, v2 a "pure" Q4_K_M of it (no Q6_K mix). Each version runs in its own llama-cpp-python server process on
127.0.0.1; answers use max_tokens of a few tokens to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.fixtures_serve import NAME, port_closed, read_summary
from tuneship import registry as reg
from tuneship.serve.hashing import pick_sticky
from tuneship.serve.launch import Supervisor
from tuneship.serve.router import Backend, RouterConfig
from tuneship.serve.routes import RegistryRouteSource, StaticRouteSource

pytestmark = pytest.mark.slow

USERS = [f"user-{i:03d}" for i in range(100)]
MSG = [{"role": "user", "content": "Data Analyst at Globex, Paris. Remote: no"}]


def ask(client, user=None, max_tokens=2):
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=MSG, max_tokens=max_tokens, temperature=0, user=user or openai.NOT_GIVEN
    )
    return raw.headers["x-tuneship-version"], raw.parse()


def registry_router(start_router, root, llama_backends, **kw):
    kw.setdefault("watcher", None)
    cfg = RouterConfig(
        sources=[RegistryRouteSource(NAME, str(root))],
        backends={NAME: llama_backends["backends"]},
        poll_interval=0.2,
        **kw,
    )
    return start_router(cfg)


def test_sticky_split_90_10_then_50_50_moves_only_the_expected_users(
    serve_registry, llama_backends, start_router
):
    r = registry_router(start_router, serve_registry, llama_backends)
    client = r.client()
    requests = [u for u in USERS for _ in range(5)]  # 500 requests from 100 users

    def one(user):
        version, resp = ask(client, user)
        assert resp.model == f"{NAME}-{version}" and resp.choices[0].message.content is not None
        return user, version

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, requests))
    by_user = defaultdict(set)
    for user, version in results:
        by_user[user].add(version)
    assert all(len(v) == 1 for v in by_user.values()), "a user saw two versions under unchanged weights"
    before = {u: next(iter(v)) for u, v in by_user.items()}
    share = Counter(v for _, v in results)["v2"] / len(results)
    # 100 users, each v2 with p=0.1: the share of users (and so of requests) is 0.10 +- 3 sigma (0.09)
    assert 0.01 <= share <= 0.19, share
    assert before == {u: pick_sticky(u, {"v1": 90, "v2": 10}) for u in USERS}

    rev = r.get("/ready").json()["routes"][NAME]["revision"]
    reg.set_weights(NAME, {"v1": 50, "v2": 50}, root=serve_registry, reason="serve test: 50/50")
    try:
        deadline = time.monotonic() + 10
        while r.get("/ready").json()["routes"][NAME]["revision"] == rev:
            assert time.monotonic() < deadline, "router did not reload the route"
            time.sleep(0.1)
        with ThreadPoolExecutor(4) as pool:
            after = dict(pool.map(one, USERS))
    finally:
        reg.set_weights(NAME, {"v1": 90, "v2": 10}, root=serve_registry, reason="serve test: back to 90/10")
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(before[u] == "v1" and after[u] == "v2" for u in moved), (
        "a user moved away from the version that gained"
    )
    # expected share moving is 0.5 - 0.1 = 0.4: 40 +- 3 sigma (15) users of 100
    assert 25 <= len(moved) <= 55, len(moved)
    assert after == {u: pick_sticky(u, {"v1": 50, "v2": 50}) for u in USERS}


def test_streaming_through_the_router(serve_registry, llama_backends, start_router):
    r = registry_router(start_router, serve_registry, llama_backends)
    raw = r.client().chat.completions.with_raw_response.create(
        model=NAME, messages=MSG, max_tokens=8, temperature=0, stream=True, user="streamer"
    )
    version = raw.headers["x-tuneship-version"]
    assert version == pick_sticky("streamer", {"v1": 90, "v2": 10})
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text.strip()
    assert all(c.model == f"{NAME}-{version}" for c in chunks)


def test_canary_backend_killed_under_load_fails_over_to_stable(
    serve_ggufs, llama_backends, start_router, tmp_path
):
    """A third llama.cpp process serves the canary here, so killing it leaves the shared backends alone."""
    from tuneship.serve.backends import llamacpp_spec
    from tuneship.serve.launch import free_port

    spec = llamacpp_spec(
        serve_ggufs["v2"], f"{NAME}-v2", port=free_port(), n_threads=1, label="doomed-canary"
    )
    sup = Supervisor([spec], log_dir=tmp_path)
    sup.start()
    try:
        backends = {"v1": llama_backends["backends"]["v1"], "v2": Backend(spec.url + "/v1", f"{NAME}-v2")}
        source = StaticRouteSource(NAME, {"v1": 50, "v2": 50}, stable="v1", canary="v2")
        r = start_router(RouterConfig(sources=[source], backends={NAME: backends}, watcher=None, cooldown=60))
        client = r.client()
        outcomes: list[tuple[float, float, str | None]] = []  # (start, end, version or None on failure)
        lock = threading.Lock()
        stop = time.monotonic() + 8.0
        killed_at: list[float] = []

        def worker(k):
            i = 0
            while time.monotonic() < stop:
                user = f"load-{k}-{i % 10}"
                i += 1
                t0 = time.monotonic()
                try:
                    version, _ = ask(client, user)
                except openai.APIError:
                    version = None
                with lock:
                    outcomes.append((t0, time.monotonic(), version))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        killed_at.append(time.monotonic())
        sup.kill("doomed-canary", signal.SIGKILL)
        for t in threads:
            t.join()
        kill = killed_at[0]
        failed = [o for o in outcomes if o[2] is None]
        in_flight = [o for o in outcomes if o[0] <= kill <= o[1]]
        assert len(failed) <= len(in_flight), (failed, len(in_flight))
        before = [o for o in outcomes if o[1] < kill]
        after = [o for o in outcomes if o[0] > kill]
        assert {o[2] for o in before} == {"v1", "v2"}  # both served before the kill
        assert after and {o[2] for o in after} == {"v1"}  # stable takes everything after it
        metrics = r.get("/metrics").text
        assert re.search(
            r'tuneship_router_errors_total\{kind="[a-zA-Z_]+",model="jobs",version="v2"\} [1-9]', metrics
        )
        assert re.search(
            r'tuneship_router_failovers_total\{from_version="v2",model="jobs",to_version="v1"\} [1-9]',
            metrics,
        )
        assert r.get("/ready").json()["routes"][NAME]["down"] == ["v2"]
    finally:
        sup.stop()


def test_tuneship_serve_name_runs_backends_and_router_and_stops_cleanly(serve_registry, tmp_path):
    """The real command: backends on free ports, two router workers on --port, a bearer key, SIGTERM stops
    all (test_serve_reload.py runs the same command with one router process)."""
    from tuneship.serve.launch import free_port

    port = free_port()
    env = {**os.environ, "TUNESHIP_API_KEY": "k3y", "TUNESHIP_QUIET": ""}
    cmd = [
        sys.executable,
        "-m",
        "tuneship.cli",
        "serve",
        NAME,
        "--root",
        str(serve_registry),
        "--port",
        str(port),
    ]
    cmd += ["--threads", "1", "--log-dir", str(tmp_path / "logs"), "--router-workers", "2", "--json"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    try:
        summary = read_summary(proc, timeout=120)
        assert summary["status"] == "serving" and summary["url"] == f"http://127.0.0.1:{port}"
        backend_ports = [
            int(p["url"].rsplit(":", 1)[1]) for p in summary["processes"] if p["role"] == "backend"
        ]
        assert len(backend_ports) == 2 and port not in backend_ports
        client = openai.OpenAI(base_url=summary["base_url"], api_key="k3y", max_retries=0)
        version, answer = ask(client, "cli-user")
        assert version in ("v1", "v2") and answer.model == f"{NAME}-{version}"
        assert httpx.get(f"{summary['url']}/v1/models", trust_env=False).status_code == 401
        # fresh connections: SO_REUSEPORT spreads them over both router workers
        pids = {httpx.get(f"{summary['url']}/health", trust_env=False).json()["pid"] for _ in range(40)}
        assert len(pids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert port_closed(port) and all(port_closed(p) for p in backend_ports)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tuneship_serve_gguf_answers_over_http(serve_ggufs, tmp_path):
    from tuneship.serve.launch import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tuneship.cli",
        "serve",
        str(serve_ggufs["v1"]),
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    cmd += ["--log-dir", str(tmp_path), "--json"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        summary = read_summary(proc, timeout=90)
        client = openai.OpenAI(base_url=summary["base_url"], api_key="none", max_retries=0)
        answer = client.chat.completions.create(
            model=summary["model"], messages=MSG, max_tokens=4, temperature=0
        )
        assert answer.choices[0].message.content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 and port_closed(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
