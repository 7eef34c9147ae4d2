"""Several router processes on one port (`python -m tuneship.serve.router --workers N`).

One Python process tops out at one core (6,000 to 7,000 req/s against a fast upstream on the 2-core machine,
bench/router_overhead.py); past that, requests queue in it. With N workers:
- **Sockets.** The parent binds N listening sockets to HOST:PORT with SO_REUSEPORT, so the kernel spreads new
  connections over them, and hands one to each worker. The parent keeps its copies: a worker that dies is
  started again on the same socket, and connections that arrive meanwhile wait in that socket's backlog.
- **Request plane (workers).** Each worker is the ordinary router (`build_app`) under uvicorn. Routing is
  stateless (rendezvous hashing of the user key), so every worker sends a user to the same version. Backend
  health is per worker: the first worker that sees a backend fail marks it down for itself and fails over.
- **Control plane (parent).** One watcher sees every worker's traffic: workers send each request's outcome in
  batches (every 50 ms) over a pipe. The parent polls the route source, rolls the canary back through it, and
  sends every route it installs to the workers; a fixed (`--weights`) route lives only in memory, so that
  message is how the workers learn of a rollback. Registry routes are also re-read by each worker's own poll.
- **Metrics.** prometheus-client's multiprocess mode (a fresh PROMETHEUS_MULTIPROC_DIR per run): every
  worker's /metrics sums all workers.
- **Stopping.** SIGTERM or SIGINT to the parent stops the workers gracefully (in-flight requests finish);
  a worker whose parent is gone stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

from tuneship.errors import TuneshipError
from tuneship.progress import log
from tuneship.serve.routes import Route, StaticRouteSource
from tuneship.serve.watcher import Sample

FLUSH_INTERVAL = 0.05  # seconds between a worker's sample batches
MAX_RESTARTS = 5  # restarts of one worker within RESTART_WINDOW seconds before the pool gives up
RESTART_WINDOW = 60.0


class MirrorRouteSource:
    """A worker's copy of a fixed route: the parent owns the route and sends each new revision."""

    def __init__(self, route: Route):
        self.name = route.name
        self.route = route

    def revision(self) -> int:
        return self.route.revision

    def load(self) -> Route:
        return self.route

    def rollback(self, version: str, reason: str, evidence: dict) -> None:
        raise TuneshipError("a worker does not roll back; the parent process does")


class WorkerLink:
    """A worker's end of its pipe to the parent: samples go up in batches, routes come down."""

    def __init__(self, conn, parent_pid: int):
        self.conn = conn
        self.parent_pid = parent_pid
        self.buffer: list[tuple] = []

    def record(self, name: str, version: str, sample: Sample) -> None:
        self.buffer.append((name, version, sample.ok, sample.latency, sample.json_ok))

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.conn.send(("samples", batch))

    def receive(self, router) -> None:
        while self.conn.poll():
            kind, payload = self.conn.recv()
            if kind == "route":
                source = router.sources.get(payload.name)
                if isinstance(source, MirrorRouteSource) and payload.revision > source.route.revision:
                    source.route = payload
                current = router.routes.get(payload.name)
                if current is None or payload.revision > current.revision:
                    router.install(payload)
            elif kind == "rollback":
                name, version = payload
                router.metrics.child(router.metrics.rollbacks, name, version).inc()

    async def run(self, router) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_readable, router)
        self.conn.send(("ready", os.getpid()))  # the routes are loaded: from now on a death is not start-up
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                if os.getppid() != self.parent_pid:  # the parent died without stopping us
                    log(f"router worker {os.getpid()}: parent is gone; stopping")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                try:
                    self.flush()
                except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                    self.buffer.clear()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.conn.fileno())
            with contextlib.suppress(Exception):
                self.flush()

    def _on_readable(self, router) -> None:
        try:
            self.receive(router)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())


def listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on HOST:PORT sharing the port through SO_REUSEPORT."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise TuneshipError("--workers > 1 needs SO_REUSEPORT (Linux, macOS); run one worker on this system")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.listen(2048)
            s.set_inheritable(True)
    except OSError as e:
        for s in socks:
            s.close()
        raise TuneshipError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from e
    return socks


def _worker_main(config, sock: socket.socket, conn, parent_pid: int) -> None:
    """A worker process: the ordinary router app under uvicorn, on the socket the parent bound."""
    import uvicorn

    from tuneship.serve.router import UVICORN_OPTIONS, build_app

    app = build_app(config, link=WorkerLink(conn, parent_pid))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **UVICORN_OPTIONS))
    server.run(sockets=[sock])


@dataclass
class _Worker:
    index: int
    sock: socket.socket
    process: multiprocessing.process.BaseProcess | None = None
    conn: object = None
    ready: bool = False
    restarts: list[float] = field(default_factory=list)


class WorkerPool:
    """The parent: starts N workers, feeds their samples to its own watcher, restarts a worker that dies."""

    def __init__(self, config, host: str, port: int, workers: int):
        from tuneship.serve.router import Router

        if workers < 2:
            raise TuneshipError("WorkerPool is for --workers 2 or more")
        self.config = config
        self.host, self.port = host, port
        self.socks = listen_sockets(host, port, workers)
        self.workers = [_Worker(i, s) for i, s in enumerate(self.socks)]
        self.ctx = multiprocessing.get_context("spawn")
        self.control = Router(config)  # never serves HTTP: routes, the watcher and rollbacks
        self.control.notify = self._broadcast
        self.stopping = False
        self.failed: str | None = None
        self.metrics_dir = ""

    # ---- talking to workers --------------------------------------------------------------------------------
    def _broadcast(self, kind: str, payload) -> None:
        targets = [w for w in self.workers if w.conn is not None and w.process and w.process.is_alive()]
        if kind == "rollback":  # counted once: by the first live worker
            targets = targets[:1]
        for w in targets:
            with contextlib.suppress(OSError, EOFError):
                w.conn.send((kind, payload))

    def _reader(self, w: _Worker, conn, loop: asyncio.AbstractEventLoop) -> None:
        """A thread per worker pipe: batches of samples -> the watcher, on the event loop."""
        watcher = self.control.watcher
        while True:
            try:
                kind, batch = conn.recv()
            except (EOFError, OSError):
                return
            if kind == "samples" and watcher is not None:
                loop.call_soon_threadsafe(self._record, watcher, batch)
            elif kind == "ready":
                w.ready = True

    @staticmethod
    def _record(watcher, batch) -> None:
        for name, version, ok, latency, json_ok in batch:
            watcher.record(name, version, Sample(ok, latency, json_ok))

    def _worker_config(self):
        """The workers' config: fixed routes become mirrors of the parent's current route."""
        sources = []
        for s in self.config.sources:
            if isinstance(s, StaticRouteSource):
                sources.append(MirrorRouteSource(self.control.routes.get(s.name) or s.load()))
            else:
                sources.append(s)
        return replace(self.config, sources=sources, backends=dict(self.config.backends))

    def _start(self, w: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        if w.conn is not None:
            with contextlib.suppress(OSError):
                w.conn.close()
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        w.process = self.ctx.Process(
            target=_worker_main,
            args=(self._worker_config(), w.sock, child_end, os.getpid()),
            name=f"tuneship-router-{w.index}",
            daemon=False,
        )
        w.ready = False
        w.process.start()
        child_end.close()
        w.conn = parent_end
        threading.Thread(target=self._reader, args=(w, parent_end, loop), daemon=True).start()

    async def _supervise(self, loop) -> None:
        from prometheus_client import multiprocess

        while not self.stopping:
            await asyncio.sleep(0.2)
            for w in self.workers:
                if self.stopping or w.process is None or w.process.is_alive():
                    continue
                code, pid = w.process.exitcode, w.process.pid
                multiprocess.mark_process_dead(pid, self.metrics_dir)
                now = time.monotonic()
                w.restarts = [t for t in w.restarts if now - t < RESTART_WINDOW] + [now]
                if not w.ready or len(w.restarts) > MAX_RESTARTS:
                    when = (
                        "at start-up" if not w.ready else f"{len(w.restarts)} times in {RESTART_WINDOW:g} s"
                    )
                    self.failed = f"router worker {w.index} exited with status {code} {when}"
                    self.stopping = True
                    return
                await asyncio.sleep(0.3)  # a SIGTERM to the whole group reaches us too: let it land first
                if self.stopping:
                    return
                log(f"router: worker {w.index} (pid {pid}) exited with status {code}; starting it again")
                self._start(w, loop)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.control.load_all()
        for w in self.workers:
            self._start(w, loop)
        tasks = [asyncio.create_task(self.control.poll_routes())]
        if self.control.watcher:
            tasks.append(asyncio.create_task(self.control.watch()))
        supervisor = asyncio.create_task(self._supervise(loop))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([supervisor, waiter], return_when=asyncio.FIRST_COMPLETED)
        self.stopping = True
        for t in (*tasks, supervisor, waiter):
            t.cancel()
        await asyncio.gather(*tasks, supervisor, waiter, return_exceptions=True)

    def _stop_workers(self, grace: float = 15.0) -> None:
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                w.process.terminate()  # SIGTERM: uvicorn stops accepting and lets requests in flight finish
        deadline = time.monotonic() + grace
        for w in self.workers:
            if w.process is None:
                continue
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)

    def run(self) -> int:
        self.metrics_dir = tempfile.mkdtemp(prefix="tuneship-router-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # the workers inherit it at spawn
        log(f"router: {len(self.workers)} workers on {self.host}:{self.port} (SO_REUSEPORT)")
        try:
            asyncio.run(self._main())
        finally:
            self.stopping = True
            self._stop_workers()
            for s in self.socks:
                s.close()
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.failed:
            log(f"router: {self.failed}; see the lines above")
            return 1
        return 0
