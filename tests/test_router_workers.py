"""Several router processes on one port (`python -m tuneship.serve.router --workers 2`), as real processes.

Upstreams are `tuneship.serve.stub` servers. Requests go over a fresh TCP connection each (httpx without a
pool), so SO_REUSEPORT spreads them over both workers: with 40 connections, the chance that one worker got
them all is 2**-39. What is checked: the workers agree on every user's version, /metrics sums both workers,
the parent's one watcher sees both workers' samples and its rollback reaches every worker (a fixed route and a
registry route), a killed worker is started again without failing a request, and SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fixtures_serve import NAME, make_registry, port_closed
from tuneship import registry as reg
from tuneship.serve.hashing import pick_sticky
from tuneship.serve.launch import free_port

MSG = [{"role": "user", "content": "Senior Engineer at Acme in Berlin, remote"}]


class Workers:
    """`python -m tuneship.serve.router --workers N ...` on a free port; stopped (SIGTERM) at the end."""

    def __init__(self, stubs, *args: str, workers: int = 2):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tuneship.serve.router", "--port", str(self.port)]
        argv += ["--workers", str(workers), "--poll-interval", "0.1"]
        for v, s in stubs.items():
            argv += ["--backend", f"{NAME}:{v}={s.url}/v1"]
        self.proc = subprocess.Popen([*argv, *args], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the router workers never became ready")

    def pids(self, n: int = 40) -> set[int]:
        """Worker pids seen over n fresh connections."""
        return {httpx.get(self.base + "/health", timeout=10).json()["pid"] for _ in range(n)}

    def ask(self, user: str, timeout: float = 10.0) -> str:
        r = httpx.post(
            self.base + "/v1/chat/completions",
            json={"model": NAME, "messages": MSG, "max_tokens": 4, "user": user},
            timeout=timeout,
        )
        assert r.status_code == 200, r.text
        return r.headers["x-tuneship-version"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def start_workers():
    started: list[Workers] = []

    def start(*a, **kw) -> Workers:
        w = Workers(*a, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_workers_share_the_port_agree_on_users_and_sum_their_metrics(stubs, start_workers):
    w = start_workers(stubs, "--weights", f"{NAME}=v1:90,v2:10", "--stable", f"{NAME}=v1", "--no-watcher")
    assert len(w.pids()) == 2  # both workers answer on the one port
    users = [f"user-{i}" for i in range(60)]
    for _ in range(2):  # each user twice, on fresh connections, so usually through both workers
        for u in users:
            assert w.ask(u) == pick_sticky(u, {"v1": 90, "v2": 10})
    text = httpx.get(w.base + "/metrics").text
    assert metric(text, "tuneship_router_requests_total{") == 120  # every worker's requests, summed
    assert metric(text, f'tuneship_router_request_seconds_count{{model="{NAME}"') == 120
    assert 'tuneship_router_route_weight{model="jobs",version="v2"} 10.0' in text
    assert w.stop() == 0
    assert port_closed(w.port)


def users_for(version: str, weights: dict, n: int) -> list[str]:
    found = (f"u{i}" for i in range(100_000))
    return [u for u in found if pick_sticky(u, weights) == version][:n]


@pytest.mark.parametrize("source", ["fixed", "registry"])
def test_one_watcher_sees_every_worker_and_its_rollback_reaches_all(
    source, stubs, start_workers, request, tmp_path
):
    stubs["v2"].app.state.stub.content = "Sure! The title is Engineer."  # answers, but not JSON
    weights = {"v1": 50, "v2": 50}
    if source == "fixed":
        route = ["--weights", f"{NAME}=v1:50,v2:50", "--stable", f"{NAME}=v1", "--canary", f"{NAME}=v2"]
    else:
        root = make_registry(tmp_path / "registry", request.getfixturevalue("adapter_dir"))
        reg.set_weights(NAME, weights, root=root)
        route = ["--root", str(root)]
    w = start_workers(stubs, *route, "--min-samples", "20", "--json-signal")
    # exactly 20 requests per version, each on a fresh connection: no single worker can reach 20 of each
    batch = users_for("v1", weights, 20) + users_for("v2", weights, 20)
    assert [w.ask(u) for u in batch] == ["v1"] * 20 + ["v2"] * 20
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        models = [httpx.get(w.base + "/v1/models").json()["data"][0] for _ in range(10)]
        if all(m["weights"].get("v2", 0) == 0 for m in models):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the rollback did not reach every worker: {models}")
    assert len({m["revision"] for m in models}) == 1  # all workers serve the same revision
    assert {w.ask(u) for u in batch[20:]} == {"v1"}  # the canary's users are on stable, whichever worker
    assert metric(httpx.get(w.base + "/metrics").text, "tuneship_router_rollbacks_total{") == 1
    if source == "registry":
        last = reg.history(NAME, root=root, details=True)[-1]
        assert last["action"] == "rollback" and last["from"] == "v2"
        ev = last["evidence"]
        # the parent's watcher holds all 40 samples: both workers' share
        assert ev["canary"]["samples"] == 20 and ev["stable"]["samples"] == 20
        assert ev["canary"]["json_valid_rate"] == 0 and ev["stable"]["json_valid_rate"] == 1


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie until the parent reaps it
    except FileNotFoundError:
        return True


def test_a_killed_worker_is_started_again_and_no_request_fails(stubs, start_workers):
    w = start_workers(stubs, "--weights", f"{NAME}=v1:100", "--stable", f"{NAME}=v1", "--no-watcher")
    before = w.pids()
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    while not dead(victim):  # a request the dying process had already accepted would be lost with it
        time.sleep(0.01)
    with ThreadPoolExecutor(8) as pool:  # connections hashed to the dead worker wait in its socket's backlog
        versions = list(pool.map(lambda i: w.ask(f"k{i}", timeout=30), range(40)))
    assert versions == ["v1"] * 40
    deadline = time.monotonic() + 30
    while (after := w.pids()) and (victim in after or len(after) < 2):
        assert time.monotonic() < deadline, f"worker not restarted: {after}"
        time.sleep(0.2)
    assert w.stop() == 0
    for pid in after:  # SIGTERM to the parent stopped every worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_worker_counts_and_a_taken_port_are_clear_errors(stubs):
    up = f"{NAME}:v1={stubs['v1'].url}/v1"
    base = [sys.executable, "-m", "tuneship.serve.router", "--backend", up, "--weights", f"{NAME}=v1:100"]
    r = subprocess.run([*base, "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers must be 1 or more" in r.stderr
    taken = stubs["v1"].port  # a plain listener without SO_REUSEPORT holds it
    r = subprocess.run(
        [*base, "--workers", "2", "--port", str(taken)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{taken}" in r.stderr
