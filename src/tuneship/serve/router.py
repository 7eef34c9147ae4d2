"""The A/B router: one OpenAI-compatible endpoint in front of several versions of a model.

`build_app(RouterConfig)` returns the ASGI app; `python -m tuneship.serve.router ...` runs it as its own
process under uvicorn, or as several processes on one port with `--workers N` (tuneship.serve.workers). Per request it:
1. checks the bearer key, when one is set (constant-time compare);
2. maps the public `model` name to a version: sticky by the `user` field or the `X-User-Id` header
   (weighted rendezvous hashing), weighted random without a key; `NAME@vN` pins a version;
3. rewrites `model` to the name that version's backend knows it by, and forwards the request over a pooled
   aiohttp client session; SSE streams are relayed chunk by chunk, unbuffered;
4. on connection refused, a 5xx or a timeout, marks that backend down for a cool-down and retries on stable
   (bounded, and only before any byte was streamed to the client);
5. answers with `X-Tuneship-Version: vN`, and records per-version metrics and a sample for the watcher.
Background tasks reload the route when the source's revision changes (in-flight requests keep the route they
started with), and roll the canary back when the watcher finds it worse than stable.

Backends added at run time: the router runs as its own process, and `tuneship serve` (launch.RouteFollower)
starts a backend for a version that joins the route after start-up. Once that backend answers, the serving
process rewrites a JSON file (`--backends-file`, {NAME: {vN: {"url": ..., "model": ...}}}) and the router, which
polls the file's mtime with the route, merges it into its backend table: a new dict, so requests in flight keep
the table they started with, and the version then gets its share. Until then (or for good, when its backend
failed to start) a version on the route with no backend gets no traffic: it is left out of the sticky split,
so with a stable and a canary its users stay on stable. Backends are only ever added, never dropped.

Why aiohttp for the upstream side, not httpx: on the 2-core machine, an httpx.AsyncClient cost 1.0-4.7 ms of CPU
per request and fell from 388 req/s at 1 connection to 96 req/s at 128 (its pool scans every connection on each
request), while aiohttp's pooled client cost about 0.1 ms and held 3,000-4,900 req/s (bench/router_overhead.py's
upstream, same loop). The router's whole budget is 1 ms, so the client had to be the cheap one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from tuneship.progress import log
from tuneship.serve.hashing import pick_random, pick_sticky
from tuneship.serve.routes import Route, RouteSource
from tuneship.serve.watcher import Sample, Watcher, WatcherConfig, is_json_content

VERSION_HEADER = "X-Tuneship-Version"
JSON_HEADERS = {"content-type": "application/json"}
# connection refused or reset, a timeout, a server that hung up mid-answer
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)
# per-request work the router does not need: no access log, no Server/Date headers, no X-Forwarded-* rewriting
UVICORN_OPTIONS = dict(
    log_level="warning", access_log=False, server_header=False, date_header=False, proxy_headers=False
)
# `usage` token counts in an OpenAI answer; a quote inside a string value is escaped, so content cannot match
USAGE_RE = re.compile(rb'(?<!\\)"(prompt|completion)_tokens"\s*:\s*(\d+)')
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Backend:
    """Where one version is served: an OpenAI-compatible base URL (ending in /v1) and its model name there."""

    url: str
    model: str


@dataclass
class RouterConfig:
    sources: list[RouteSource]
    # public name -> version -> backend
    backends: dict[str, dict[str, Backend]]
    api_key: str | None = None
    connect_timeout: float = 2.0
    request_timeout: float = 300.0
    cooldown: float = 10.0
    max_retries: int = 1
    poll_interval: float = 1.0
    max_connections: int = 512
    watcher: WatcherConfig | None = field(default_factory=WatcherConfig)
    # JSON {name: {version: {url, model}}} rewritten by the serving process when it adds a backend
    backends_file: str | None = None


def _error(
    status: int, message: str, etype: str, code: str | None = None, version: str = "none"
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": etype, "code": code}},
        status_code=status,
        headers={VERSION_HEADER: version},
    )


class Metrics:
    """Per-version metrics. With several router processes (PROMETHEUS_MULTIPROC_DIR set), prometheus-client keeps
    each process's values in files there, and `expose` sums them, so any process's /metrics shows all traffic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        r = self.registry
        self.requests = Counter(
            "tuneship_router_requests",
            "Requests answered, by version and status",
            ["model", "version", "code"],
            registry=r,
        )
        self.errors = Counter(
            "tuneship_router_errors",
            "Backend failures, by version and kind",
            ["model", "version", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "tuneship_router_request_seconds",
            "End-to-end latency of answered requests (to the last byte for streams)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tuneship_router_tokens",
            "Tokens by version: prompt and completion from `usage`; for streams without usage, content chunks",
            ["model", "version", "type"],
            registry=r,
        )
        self.failovers = Counter(
            "tuneship_router_failovers",
            "Requests moved to another version",
            ["model", "from_version", "to_version"],
            registry=r,
        )
        self.weight = Gauge(
            "tuneship_router_route_weight",
            "Route weight by version",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.up = Gauge(
            "tuneship_router_backend_up",
            "1 unless the backend is in its cool-down (in any router process)",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.revision = Gauge(
            "tuneship_router_route_revision",
            "Route revision served",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollbacks = Counter(
            "tuneship_router_rollbacks", "Automatic rollbacks", ["model", "version"], registry=r
        )
        self._children: dict[tuple, object] = {}

    def expose(self) -> bytes:
        if not self.multiproc_dir:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)

    def child(self, metric, *labels):
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c


class Router:
    """One router process. Alone (`link=None`) it also runs the watcher. As one of several workers
    (tuneship.serve.workers) it sends its samples through `link` to the parent, which runs the one watcher
    over every worker's traffic, and takes route changes from it."""

    def __init__(self, config: RouterConfig, link=None):
        self.config = config
        self.sources = {s.name: s for s in config.sources}
        self.routes: dict[str, Route] = {}
        self.live: dict[str, dict[str, float]] = {}  # name -> weights of versions that have a backend
        self.down_until: dict[tuple[str, str], float] = {}
        self.metrics = Metrics()
        self.link = link
        self.watcher = Watcher(config.watcher) if config.watcher and link is None else None
        # where each request's outcome goes: this process's watcher, the parent's (through the link), or nowhere
        self.sink = (
            self.watcher.record if self.watcher else link.record if (link and config.watcher) else None
        )
        # called with ("route", Route) after each install and ("rollback", (name, version)) after a rollback
        self.notify = None
        self.session: aiohttp.ClientSession | None = None
        self._key = config.api_key.encode() if config.api_key else None
        self._tasks: list[asyncio.Task] = []
        self._warned: set[tuple[str, str]] = set()
        self._backends_stamp: tuple[int, int] | None = None

    # ---- routes -------------------------------------------------------------------------------------------
    def install(self, route: Route) -> None:
        backends = self.config.backends.get(route.name, {})
        live = {}
        for version, weight in route.weights.items():
            if weight > 0 and version not in backends:
                if (route.name, version) not in self._warned:
                    self._warned.add((route.name, version))
                    log(
                        f"router: {route.name}@{version} has weight {weight:g} but no backend; it gets no traffic"
                    )
                continue
            live[version] = weight
        old = self.routes.get(route.name)
        self.routes[route.name] = route
        self.live[route.name] = live
        for version in set(route.weights) | set(backends):
            self.metrics.child(self.metrics.weight, route.name, version).set(route.weights.get(version, 0.0))
            if version in backends:
                self.metrics.child(self.metrics.up, route.name, version).set(
                    0 if (route.name, version) in self.down_until else 1
                )
        self.metrics.child(self.metrics.revision, route.name).set(route.revision)
        if old is not None and old.revision != route.revision:
            log(f"router: {route.name} reloaded at revision {route.revision}: weights {route.weights}")
        if self.notify:
            self.notify("route", route)

    def reload_backends(self) -> None:
        """Merge the backends file into the backend table when it changed (backends are only added)."""
        path = self.config.backends_file
        if not path:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._backends_stamp:
            return
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        self._backends_stamp = stamp
        for name, table in data.items():
            if name not in self.sources:
                continue
            current = self.config.backends.get(name, {})
            new = {v: Backend(url=str(b["url"]).rstrip("/"), model=str(b["model"])) for v, b in table.items()}
            added = {v: b for v, b in new.items() if current.get(v) != b}
            if not added:
                continue
            # a new dict: a request in flight keeps the table it started with
            self.config.backends = {**self.config.backends, name: {**current, **added}}
            for version, b in added.items():
                self._warned.discard((name, version))
                log(f"router: {name}@{version} is now served by {b.url} (model {b.model})")
            if name in self.routes:
                self.install(self.routes[name])

    async def load_all(self) -> None:
        try:
            self.reload_backends()
        except Exception as e:
            log(f"router: reading backends file {self.config.backends_file} failed ({e})")
        for source in self.sources.values():
            self.install(await asyncio.to_thread(source.load))

    async def poll_routes(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                self.reload_backends()
            except Exception as e:  # a half-read or bad file: keep the table, try again next poll
                log(f"router: reading backends file {self.config.backends_file} failed ({e})")
            for name, source in self.sources.items():
                try:
                    rev = await asyncio.to_thread(source.revision)
                    if rev != self.routes[name].revision:
                        self.install(await asyncio.to_thread(source.load))
                except Exception as e:  # keep serving the last good route
                    log(
                        f"router: reloading route {name} failed ({e}); keeping revision {self.routes[name].revision}"
                    )

    async def watch(self) -> None:
        assert self.watcher is not None
        while True:
            await asyncio.sleep(self.watcher.config.interval)
            for name, route in list(self.routes.items()):
                canary, stable = route.canary, route.stable
                if not canary or not stable or canary == stable or route.weights.get(canary, 0) <= 0:
                    continue
                trip = (name, canary, route.revision)
                if trip in self.watcher.tripped:
                    continue
                evidence = self.watcher.verdict(name, stable, canary)
                if evidence is None:
                    continue
                self.watcher.tripped.add(trip)
                reason = f"auto-rollback of {name}@{canary}: " + "; ".join(evidence["reasons"])
                log(f"router: {reason}")
                try:
                    await asyncio.to_thread(self.sources[name].rollback, canary, reason, evidence)
                    self.metrics.child(self.metrics.rollbacks, name, canary).inc()
                    if self.notify:
                        self.notify("rollback", (name, canary))
                    self.install(await asyncio.to_thread(self.sources[name].load))
                    self.watcher.reset(name, canary)
                except Exception as e:
                    log(f"router: rollback of {name}@{canary} failed: {e}")

    # ---- backends' health ---------------------------------------------------------------------------------
    def is_down(self, name: str, version: str) -> bool:
        until = self.down_until.get((name, version))
        if until is None:
            return False
        if time.monotonic() >= until:  # cool-down over: let the next request try it
            del self.down_until[(name, version)]
            self.metrics.child(self.metrics.up, name, version).set(1)
            return False
        return True

    def mark_down(self, name: str, version: str, kind: str, latency: float) -> None:
        if (name, version) not in self.down_until:
            log(f"router: {name}@{version} failed ({kind}); down for {self.config.cooldown:g} s")
        self.down_until[(name, version)] = time.monotonic() + self.config.cooldown
        m = self.metrics
        m.child(m.errors, name, version, kind).inc()
        m.child(m.up, name, version).set(0)
        if self.sink:
            self.sink(name, version, Sample(False, latency))

    def plan(self, name: str, route: Route, first: str, pinned: bool) -> list[str]:
        """Versions to try, in order: the chosen one (unless down), then stable, then the rest by weight."""
        if pinned:
            return [first]
        live = self.live[name]
        order = [first]
        fb = route.fallback
        if fb and fb in live and fb != first:
            order.append(fb)
        order += sorted((v for v in live if v not in order), key=lambda v: -live[v])
        up = [v for v in order if not self.is_down(name, v)]
        if first not in up:
            self.metrics.child(self.metrics.errors, name, first, "down").inc()
            if self.sink:
                self.sink(name, first, Sample(False, 0.0))
        return (up or order)[: self.config.max_retries + 1]

    # ---- requests -----------------------------------------------------------------------------------------
    def authorized(self, header: str | bytes | None) -> bool:
        """Whether an Authorization header value carries the key (always, when no key is set)."""
        if self._key is None:
            return True
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key)

    async def asgi_proxy(self, scope, receive, send, path: str) -> None:
        """The hot path as plain ASGI: no Request/Response objects and no middleware for a plain answer
        (they cost about a sixth of the router's CPU per request); errors and streams use Starlette's."""
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        result = await self.proxy(dict(scope["headers"]), b"".join(chunks), path)
        if isinstance(result, Response):
            await result(scope, receive, send)
            return
        status, content, content_type, version = result
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(content)).encode()),
                    (b"x-tuneship-version", version.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def proxy(self, headers: dict[bytes, bytes], raw: bytes, path: str) -> Response | tuple:
        """One request: a Starlette response (errors, streams), or (status, body, content type, version)."""
        if not self.authorized(headers.get(b"authorization")):
            resp = _error(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                "authentication_error",
                "invalid_api_key",
            )
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        try:
            body = json.loads(raw)
        except ValueError as e:
            return _error(
                400, f"request body is not valid JSON ({e})", "invalid_request_error", "invalid_json"
            )
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error", "invalid_body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(
                400, "request body needs a 'model' string", "invalid_request_error", "missing_model"
            )
        name, _, tag = model.partition("@")
        route = self.routes.get(name)
        if route is None:
            known = ", ".join(sorted(self.routes)) or "none"
            return _error(
                404,
                f"model {model!r} is not served here; models: {known}",
                "invalid_request_error",
                "model_not_found",
            )
        live = self.live[name]
        if tag:
            if tag not in self.config.backends.get(name, {}):
                return _error(
                    404, f"{name} has no served version {tag!r}", "invalid_request_error", "model_not_found"
                )
            first = tag
        else:
            user = body.get("user") or headers.get(b"x-user-id", b"").decode("latin-1")
            first = pick_sticky(str(user), live) if user else pick_random(live)
            if first is None:
                return _error(503, f"no version of {name} has traffic weight", "server_error", "no_route")
        stream = body.get("stream") is True
        versions = self.plan(name, route, first, pinned=bool(tag))
        backends = self.config.backends[name]
        session = self.session
        assert session is not None
        last: Response | None = None
        for i, version in enumerate(versions):
            backend = backends[version]
            body["model"] = backend.model
            payload = json.dumps(body).encode()
            if i > 0:
                self.metrics.child(self.metrics.failovers, name, versions[i - 1], version).inc()
            t0 = time.perf_counter()
            resp: aiohttp.ClientResponse | None = None
            try:
                resp = await session.post(backend.url + path, data=payload, headers=JSON_HEADERS)
                if resp.status >= 500:
                    content = await resp.read()
                    resp.release()
                    self.mark_down(name, version, f"http_{resp.status}", time.perf_counter() - t0)
                    last = Response(
                        content or b'{"error": {"message": "backend error", "type": "server_error"}}',
                        status_code=resp.status,
                        media_type=resp.content_type or "application/json",
                        headers={VERSION_HEADER: version},
                    )
                    continue
                if stream and resp.status == 200:
                    chunks = resp.content.iter_any()
                    # the first chunk is still retryable: nothing has reached the client yet
                    first_chunk = await anext(chunks, b"")
                    return StreamingResponse(
                        self.relay(name, version, resp, chunks, first_chunk, t0),
                        status_code=200,
                        media_type=resp.content_type or "text/event-stream",
                        headers={
                            VERSION_HEADER: version,
                            "Cache-Control": "no-cache",
                            "X-Accel-Buffering": "no",
                        },
                    )
                content = await resp.read()
                resp.release()
            except UPSTREAM_ERRORS as e:
                if resp is not None:
                    resp.close()
                self.mark_down(name, version, _kind(e), time.perf_counter() - t0)
                last = _error(
                    502,
                    f"{name}@{version} failed: {_kind(e)}",
                    "server_error",
                    "backend_unavailable",
                    version,
                )
                continue
            self.finished(name, version, resp.status, time.perf_counter() - t0, content)
            ctype = resp.headers.get("content-type") or "application/json"
            return resp.status, content, ctype.encode("latin-1"), version
        assert last is not None
        self.metrics.child(self.metrics.requests, name, versions[-1], str(last.status_code)).inc()
        return last

    def finished(self, name: str, version: str, status: int, latency: float, content: bytes | None) -> None:
        m = self.metrics
        m.child(m.requests, name, version, str(status)).inc()
        if status >= 400:  # the client's mistake, not the version's
            return
        self.down_until.pop((name, version), None)
        m.child(m.latency, name, version).observe(latency)
        json_ok = None
        if content is not None and b'"usage"' in content:
            # the counts without parsing the whole answer (a sixth of the per-request cost when parsed)
            for kind, count in USAGE_RE.findall(content):
                m.child(m.tokens, name, version, kind.decode()).inc(int(count))
        if self.sink:
            if self.config.watcher.json_signal and content is not None:
                json_ok = is_json_content(content)
            self.sink(name, version, Sample(True, latency, json_ok))

    async def relay(self, name, version, resp: aiohttp.ClientResponse, chunks, first: bytes, t0: float):
        """Pass an SSE stream through as it arrives. A failure here cannot be retried: bytes were sent."""
        ok = True
        pieces = 0
        try:
            if first:
                pieces += first.count(b'"content"') + first.count(b'"text"')
                yield first
            async for chunk in chunks:
                pieces += chunk.count(b'"content"') + chunk.count(b'"text"')
                yield chunk
        except UPSTREAM_ERRORS as e:
            ok = False
            self.mark_down(name, version, "stream_" + _kind(e), time.perf_counter() - t0)
        finally:
            resp.close() if not ok else resp.release()
            m = self.metrics
            if ok:
                m.child(m.tokens, name, version, "completion").inc(pieces)
                self.finished(name, version, 200, time.perf_counter() - t0, None)
            else:
                m.child(m.requests, name, version, "stream_error").inc()

    # ---- small endpoints ----------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        if not self.authorized(request.headers.get("authorization")):
            return _error(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                "authentication_error",
                "invalid_api_key",
            )
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "tuneship",
                "weights": route.weights,
                "revision": route.revision,
            }
            for name, route in sorted(self.routes.items())
        ]
        return JSONResponse({"object": "list", "data": data}, headers={VERSION_HEADER: "none"})

    def state(self) -> dict:
        out = {}
        for name, route in self.routes.items():
            out[name] = {
                "revision": route.revision,
                "weights": route.weights,
                "stable": route.stable,
                "canary": route.canary,
                "serving": sorted(self.live[name]),
                "down": sorted(v for v in self.live[name] if self.is_down(name, v)),
            }
        return out

    async def ready(self, request: Request) -> Response:
        state = self.state()
        ok = bool(state) and all(set(s["serving"]) - set(s["down"]) for s in state.values())
        return JSONResponse(
            {"ready": ok, "routes": state}, status_code=200 if ok else 503, headers={VERSION_HEADER: "none"}
        )

    async def health(self, request: Request) -> Response:
        # pid: which router process answered (several share the port with --workers)
        return JSONResponse({"status": "ok", "pid": os.getpid()}, headers={VERSION_HEADER: "none"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            self.metrics.expose(),
            media_type=CONTENT_TYPE_LATEST,
            headers={VERSION_HEADER: "none"},
        )

    # ---- lifecycle ----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        c = self.config
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c.max_connections, limit_per_host=0),
            # no total limit (streams may run long); connecting and each read are bounded
            timeout=aiohttp.ClientTimeout(total=None, connect=c.connect_timeout, sock_read=c.request_timeout),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies; and it saves work per request
        )
        await self.load_all()
        if os.environ.get("TUNESHIP_ROUTER_GC_FREEZE", "1") == "1":
            # what exists now lives as long as the process: keep it out of the collector's full passes
            gc.collect()
            gc.freeze()
        self._tasks = [asyncio.create_task(self.poll_routes())]
        if self.watcher:
            self._tasks.append(asyncio.create_task(self.watch()))
        if self.link:
            self._tasks.append(asyncio.create_task(self.link.run(self)))
        try:
            yield
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.session.close()


def _kind(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connect"
    return type(e).__name__


class RouterApp:
    """The ASGI app: POSTs to the two completion paths go straight to the router; the rest (the small
    endpoints, wrong methods, unknown paths, the lifespan) goes through Starlette."""

    HOT = {"/v1/chat/completions": "/chat/completions", "/v1/completions": "/completions"}

    def __init__(self, router: Router, app: Starlette):
        self.router = router
        self.app = app
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            upstream_path = self.HOT.get(scope["path"])
            if upstream_path is not None:
                await self.router.asgi_proxy(scope, receive, send, upstream_path)
                return
        await self.app(scope, receive, send)


def build_app(config: RouterConfig, link=None) -> RouterApp:
    """The router as an ASGI app (its lifespan opens the client and starts the reload and watcher tasks)."""
    router = Router(config, link)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error"
        )

    app = Starlette(
        exception_handlers={HTTPException: http_error},
        routes=[
            # POST is served by RouterApp before Starlette; these routes answer other methods with a 405
            HttpRoute("/v1/chat/completions", _post_only, methods=["POST"]),
            HttpRoute("/v1/completions", _post_only, methods=["POST"]),
            HttpRoute("/v1/models", router.models, methods=["GET"]),
            HttpRoute("/health", router.health, methods=["GET"]),
            HttpRoute("/ready", router.ready, methods=["GET"]),
            HttpRoute("/metrics", router.metrics_endpoint, methods=["GET"]),
        ],
        lifespan=router.lifespan,
    )
    app.state.router = router
    return RouterApp(router, app)


async def _post_only(request: Request) -> Response:  # pragma: no cover - RouterApp answers every POST
    raise HTTPException(405)


# ---- its own process ----------------------------------------------------------------------------------------
def parse_backend(spec: str) -> tuple[str, str, Backend]:
    """`NAME:vN=URL[#MODEL]` -> (name, version, Backend); MODEL defaults to NAME-vN."""
    from tuneship.errors import TuneshipError

    left, sep, right = spec.partition("=")
    name, colon, version = left.partition(":")
    if not sep or not colon or not name or not version or not right.startswith(("http://", "https://")):
        raise TuneshipError(f"--backend {spec!r} must look like NAME:vN=http://HOST:PORT/v1[#MODEL]")
    url, _, model = right.partition("#")
    return name, version, Backend(url=url.rstrip("/"), model=model or f"{name}-{version}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    import uvicorn

    from tuneship.errors import TuneshipError
    from tuneship.serve.routes import RegistryRouteSource, StaticRouteSource

    p = argparse.ArgumentParser(prog="python -m tuneship.serve.router", description=__doc__.split("\n")[0])
    p.add_argument(
        "--backend", action="append", default=[], help="NAME:vN=http://HOST:PORT/v1[#MODEL], once per version"
    )
    p.add_argument("--root", help="registry root: routes come from the registry (default when no --weights)")
    p.add_argument(
        "--weights", action="append", default=[], help="NAME=v1:90,v2:10 for a fixed route instead"
    )
    p.add_argument("--stable", action="append", default=[], help="NAME=vN (fixed routes)")
    p.add_argument("--canary", action="append", default=[], help="NAME=vN (fixed routes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="router processes sharing the port (SO_REUSEPORT); one process tops out at one core",
    )
    p.add_argument(
        "--api-key-env", default="TUNESHIP_API_KEY", help="environment variable holding the bearer key"
    )
    p.add_argument("--cooldown", type=float, default=10.0)
    p.add_argument("--max-retries", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--no-watcher", action="store_true")
    p.add_argument("--rollback-threshold", type=float, default=0.05)
    p.add_argument("--min-samples", type=int, default=50)
    p.add_argument("--json-signal", action="store_true", help="count valid-JSON answers as a quality signal")
    p.add_argument(
        "--backends-file",
        help="JSON {NAME: {vN: {url, model}}} of backends added at run time; polled with the route",
    )
    a = p.parse_args(argv)
    try:
        backends: dict[str, dict[str, Backend]] = {}
        for spec in a.backend:
            name, version, backend = parse_backend(spec)
            backends.setdefault(name, {})[version] = backend
        if not backends:
            raise TuneshipError("give at least one --backend NAME:vN=URL")
        stable = dict(s.partition("=")[::2] for s in a.stable)
        canary = dict(s.partition("=")[::2] for s in a.canary)
        sources: list[RouteSource] = []
        fixed = {}
        for spec in a.weights:
            name, _, table = spec.partition("=")
            fixed[name] = {v: float(w) for v, _, w in (x.partition(":") for x in table.split(","))}
        for name in backends:
            if name in fixed:
                sources.append(StaticRouteSource(name, fixed[name], stable.get(name), canary.get(name)))
            else:
                sources.append(RegistryRouteSource(name, a.root))
        if a.workers < 1:
            raise TuneshipError(f"--workers must be 1 or more, not {a.workers}")
        config = RouterConfig(
            sources=sources,
            backends=backends,
            api_key=os.environ.get(a.api_key_env) or None,
            cooldown=a.cooldown,
            max_retries=a.max_retries,
            request_timeout=a.request_timeout,
            poll_interval=a.poll_interval,
            backends_file=a.backends_file,
            watcher=None
            if a.no_watcher
            else WatcherConfig(
                threshold=a.rollback_threshold, min_samples=a.min_samples, json_signal=a.json_signal
            ),
        )
    except (TuneshipError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if a.workers > 1:
        from tuneship.serve.workers import WorkerPool

        try:
            pool = WorkerPool(config, a.host, a.port, a.workers)
        except TuneshipError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        return pool.run()
    uvicorn.run(build_app(config), host=a.host, port=a.port, **UVICORN_OPTIONS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
