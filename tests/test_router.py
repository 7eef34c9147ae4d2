"""The router's logic against small real HTTP upstreams (no model): hashing, auth, bad requests, streaming,
failover, metrics, route reloads and auto-rollback recorded in a real registry.

The upstreams are `tuneship.serve.stub` apps: real uvicorn servers on 127.0.0.1 that answer a fixed
completion, so these tests take seconds. The same paths through real llama.cpp backends are in test_serve.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import openai
import pytest

from tests.fixtures_serve import NAME, make_registry
from tuneship import registry as reg
from tuneship.serve.hashing import pick_random, pick_sticky
from tuneship.serve.router import Backend, RouterConfig
from tuneship.serve.routes import RegistryRouteSource, StaticRouteSource
from tuneship.serve.watcher import WatcherConfig

USERS = [f"user-{i}" for i in range(100)]
MSG = [{"role": "user", "content": "Senior Engineer at Acme in Berlin, remote"}]


def backends_of(servers) -> dict:
    return {NAME: {v: Backend(url=s.url + "/v1", model=f"{NAME}-{v}") for v, s in servers.items()}}


def static_config(servers, weights=None, **kw) -> RouterConfig:
    source = StaticRouteSource(NAME, weights or {"v1": 90, "v2": 10}, stable="v1", canary="v2")
    kw.setdefault("watcher", None)
    return RouterConfig(sources=[source], backends=backends_of(servers), poll_interval=0.1, **kw)


def ask(client, user=None, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=MSG, max_tokens=4, user=user or openai.NOT_GIVEN, **kw
    )
    return raw.headers["x-tuneship-version"], raw.parse()


# ---- hashing (pure) ---------------------------------------------------------------------------------------------
def test_rendezvous_hashing_splits_by_weight_and_moves_the_minimum():
    keys = [f"k{i}" for i in range(20000)]
    before = {k: pick_sticky(k, {"v1": 90, "v2": 10}) for k in keys}
    share = Counter(before.values())
    assert abs(share["v2"] / len(keys) - 0.10) < 0.01
    assert all(
        pick_sticky(k, {"v1": 90, "v2": 10}) == v for k, v in list(before.items())[:500]
    )  # deterministic
    after = {k: pick_sticky(k, {"v1": 50, "v2": 50}) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "v1" and after[k] == "v2" for k in moved)  # only toward the version that gained
    assert abs(len(moved) / len(keys) - 0.40) < 0.015  # the minimal share: 50 % - 10 %
    # a third version at 20 % takes users only for itself
    third = {k: pick_sticky(k, {"v1": 50, "v2": 50, "v3": 25}) for k in keys}
    assert all(third[k] in (after[k], "v3") for k in keys)
    assert abs(Counter(third.values())["v3"] / len(keys) - 0.20) < 0.015
    # weight 0 never wins; no live version gives None
    assert all(pick_sticky(k, {"v1": 0, "v2": 10}) == "v2" for k in keys[:200])
    assert pick_sticky("k", {"v1": 0}) is None and pick_random({"v1": 0}) is None


# ---- routing through the router -------------------------------------------------------------------------------
def test_unkeyed_requests_split_by_weight_and_every_response_names_its_version(stubs, start_router):
    r = start_router(static_config(stubs))
    client = r.client()
    seen = Counter()
    for _ in range(400):
        version, resp = ask(client)
        assert resp.model == f"{NAME}-{version}"  # the backend got the rewritten model name
        seen[version] += 1
    assert 0.05 <= seen["v2"] / 400 <= 0.16, seen  # 10 % +- 3 sigma for n=400
    # X-User-Id header works as the key too, and `NAME@vN` pins a version
    got = {
        r.post(
            "/v1/chat/completions", json={"model": NAME, "messages": MSG}, headers={"X-User-Id": "alice"}
        ).headers["x-tuneship-version"]
        for _ in range(5)
    }
    assert got == {pick_sticky("alice", {"v1": 90, "v2": 10})}
    assert (
        r.post("/v1/completions", json={"model": f"{NAME}@v2", "prompt": "hi"}).headers["x-tuneship-version"]
        == "v2"
    )
    models = r.client().models.list()
    assert [m.id for m in models.data] == [NAME]


def test_auth_rejects_missing_and_wrong_keys_in_constant_time(stubs, start_router):
    r = start_router(static_config(stubs, api_key="s3cret"))
    with pytest.raises(openai.AuthenticationError):
        ask(r.client(api_key="wrong"))
    resp = r.post("/v1/chat/completions", json={"model": NAME, "messages": MSG})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert r.get("/v1/models").status_code == 401
    version, answer = ask(r.client(api_key="s3cret"))
    assert version in ("v1", "v2") and answer.choices[0].message.content
    assert r.get("/health").status_code == 200  # probes need no key


def test_bad_requests_get_clear_4xx_and_the_router_keeps_serving(stubs, start_router):
    r = start_router(static_config(stubs))
    bad = r.post(
        "/v1/chat/completions",
        content=b'{"model": "jobs", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert r.post("/v1/chat/completions", json=["a list"]).status_code == 400
    missing = r.post("/v1/chat/completions", json={"messages": MSG})
    assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        r.client().chat.completions.create(model="no-such-model", messages=MSG)
    assert "no-such-model" in str(e.value) and NAME in str(e.value)
    assert r.post("/v1/chat/completions", json={"model": f"{NAME}@v9", "messages": MSG}).status_code == 404
    version, answer = ask(r.client(), user="bob")  # still serving
    assert answer.choices[0].message.content.startswith("{")


def test_sse_streams_pass_through_unbuffered(stubs, start_router):
    for s in stubs.values():
        s.app.state.stub.chunk_delay = 0.3
        s.app.state.stub.chunks = 4
    r = start_router(static_config(stubs))
    raw = r.client().chat.completions.with_raw_response.create(
        model=NAME, messages=MSG, stream=True, user="carol"
    )
    assert raw.headers["x-tuneship-version"] == pick_sticky("carol", {"v1": 90, "v2": 10})
    t0 = time.monotonic()
    arrivals, text = [], ""
    for chunk in raw.parse():
        arrivals.append(time.monotonic() - t0)
        text += chunk.choices[0].delta.content or ""
    assert json.loads(text)["company"] == "Acme"
    assert len(arrivals) >= 4
    # chunks arrive as the upstream sends them, not all at the end
    assert arrivals[0] < arrivals[-1] - 0.6, arrivals


def test_failover_to_stable_with_cooldown_and_metrics(stubs, start_router):
    stubs["v2"].app.state.stub.status = 500
    r = start_router(static_config(stubs, cooldown=2.0))
    client = r.client()
    v2_users = [u for u in USERS if pick_sticky(u, {"v1": 90, "v2": 10}) == "v2"]
    assert v2_users
    for u in v2_users:
        version, answer = ask(client, user=u)
        assert version == "v1" and answer.model == f"{NAME}-v1"  # served by stable
    calls = stubs["v2"].app.state.stub.calls
    assert calls == 1  # marked down after the first 5xx: the rest skipped it
    stubs["v2"].app.state.stub.status = 200  # recovered
    time.sleep(2.1)
    assert ask(client, user=v2_users[0])[0] == "v2"  # tried again after the cool-down
    text = r.get("/metrics").text
    assert f'tuneship_router_errors_total{{kind="http_500",model="{NAME}",version="v2"}} 1.0' in text
    assert f'tuneship_router_failovers_total{{from_version="v2",model="{NAME}",to_version="v1"}} 1.0' in text
    assert (
        f'tuneship_router_requests_total{{code="200",model="{NAME}",version="v1"}} {len(v2_users)}.0' in text
    )
    n = len(v2_users)  # the stub's usage: 5 prompt and 7 completion tokens per answer
    assert f'tuneship_router_tokens_total{{model="jobs",type="completion",version="v1"}} {7 * n}.0' in text
    assert f'tuneship_router_tokens_total{{model="jobs",type="prompt",version="v1"}} {5 * n}.0' in text
    assert 'tuneship_router_request_seconds_bucket{le="0.5",model="jobs",version="v2"} 1.0' in text
    assert r.get("/ready").json()["ready"] is True


def test_connection_refused_fails_over_and_ready_reports_down(stubs, start_router):
    dead_url = stubs["v2"].url
    stubs["v2"].stop()  # nothing listens there any more
    cfg = static_config(stubs, cooldown=30)
    cfg.backends[NAME]["v2"] = Backend(url=dead_url + "/v1", model=f"{NAME}-v2")
    r = start_router(cfg)
    v2_user = next(u for u in USERS if pick_sticky(u, {"v1": 90, "v2": 10}) == "v2")
    assert ask(r.client(), user=v2_user)[0] == "v1"
    state = r.get("/ready").json()["routes"][NAME]
    assert state["down"] == ["v2"] and state["serving"] == ["v1", "v2"]
    assert 'kind="connect"' in r.get("/metrics").text


# ---- registry-backed routes ---------------------------------------------------------------------------------------
@pytest.fixture
def stub_registry(adapter_dir, tmp_path):
    return make_registry(tmp_path / "registry", adapter_dir)


def registry_config(root, servers, **kw) -> RouterConfig:
    kw.setdefault("watcher", None)
    return RouterConfig(
        sources=[RegistryRouteSource(NAME, str(root))], backends=backends_of(servers), poll_interval=0.1, **kw
    )


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_route_reload_from_registry_keeps_requests_in_flight(stubs, stub_registry, start_router):
    stubs["v1"].app.state.stub.delay = 1.5
    r = start_router(registry_config(stub_registry, stubs))
    rev0 = r.get("/ready").json()["routes"][NAME]["revision"]
    v1_user = next(u for u in USERS if pick_sticky(u, {"v1": 90, "v2": 10}) == "v1")
    result = {}
    t = threading.Thread(
        target=lambda: result.update(zip(("version", "answer"), ask(r.client(), user=v1_user), strict=True))
    )
    t.start()
    time.sleep(0.3)  # the request is now waiting on v1
    reg.set_weights(NAME, {"v1": 0, "v2": 100}, root=stub_registry, reason="test")
    wait_for(lambda: r.get("/ready").json()["routes"][NAME]["revision"] > rev0, what="route reload")
    t.join(timeout=10)
    assert result["version"] == "v1" and result["answer"].choices[0].message.content  # finished, not dropped
    stubs["v1"].app.state.stub.delay = 0
    assert ask(r.client(), user=v1_user)[0] == "v2"  # new requests follow the new route


@pytest.mark.parametrize("failure", ["errors", "invalid_json"])
def test_auto_rollback_of_a_bad_canary_is_recorded_in_the_registry(
    failure, stubs, stub_registry, start_router
):
    stub = stubs["v2"].app.state.stub
    if failure == "errors":
        stub.status = 503
    else:
        stub.content = "Sure! The title is Engineer."  # answers, but not the JSON the task needs
    reg.set_weights(NAME, {"v1": 50, "v2": 50}, root=stub_registry)
    watcher = WatcherConfig(min_samples=20, json_signal=True, interval=0.1)
    r = start_router(registry_config(stub_registry, stubs, watcher=watcher, cooldown=0.05))
    client = r.client()
    for i in range(300):
        ask(client, user=f"u{i}")
        if reg.get_route(NAME, root=stub_registry)["canary"] is None:
            break
        if failure == "errors":
            time.sleep(0.06)  # let the cool-down lapse so the canary keeps being tried
    route = reg.get_route(NAME, root=stub_registry)
    assert route["canary"] is None and route["weights"] == {"v1": 100}
    last = reg.history(NAME, root=stub_registry, details=True)[-1]
    assert last["action"] == "rollback" and last["from"] == "v2" and last["by"] == "tuneship-router"
    assert "auto-rollback" in last["reason"]
    ev = last["evidence"]
    assert ev["canary"]["version"] == "v2" and ev["canary"]["samples"] >= 20 and ev["stable"]["samples"] >= 20
    if failure == "errors":
        assert ev["canary"]["error_rate"] > 0.5 and ev["stable"]["error_rate"] == 0
    else:
        assert ev["canary"]["json_valid_rate"] == 0 and ev["stable"]["json_valid_rate"] == 1
    # the router reloaded: every user is on stable now, and the rollback is counted
    wait_for(
        lambda: r.get("/ready").json()["routes"][NAME]["weights"] == {"v1": 100}, what="reload after rollback"
    )
    assert {ask(client, user=u)[0] for u in USERS[:30]} == {"v1"}
    assert 'tuneship_router_rollbacks_total{model="jobs",version="v2"} 1.0' in r.get("/metrics").text


def test_a_healthy_canary_is_not_rolled_back(stubs, stub_registry, start_router):
    reg.set_weights(NAME, {"v1": 50, "v2": 50}, root=stub_registry)
    # latency gaps under 0.5 s do not count here: other work on a shared CI box can stall one upstream
    watcher = WatcherConfig(min_samples=20, json_signal=True, interval=0.1, latency_min_delta=0.5)
    r = start_router(registry_config(stub_registry, stubs, watcher=watcher))
    for i in range(120):
        ask(r.client(), user=f"u{i}")
    time.sleep(0.3)
    assert reg.get_route(NAME, root=stub_registry)["canary"] == "v2"
    assert r.router.watcher.stats(NAME, "v2")["samples"] >= 20
