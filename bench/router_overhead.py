"""Router overhead: latency added and throughput, router vs hitting a fast upstream directly.

    .venv/bin/python bench/router_overhead.py [--seconds 5] [--concurrency 1 32 128]

Three processes on this machine:
- upstream: a minimal asyncio HTTP/1.1 server answering every POST with one fixed chat completion (so the
  upstream costs next to nothing and the numbers are the router's);
- router: `python -m tuneship.serve.router` with a two-version route at 90/10 (sticky by X-User-Id, watcher
  and metrics on), both versions pointing at the upstream;
- load: a closed-loop asyncio client in this process: N keep-alive connections, each sending the next request
  as soon as the last answer arrived, for a fixed time per run.
Each concurrency level is run direct (client -> upstream) and routed (client -> router -> upstream). "Added"
is routed minus direct. Everything shares the same cores, so the client's own cost is in both columns.
Prints a table and the machine. This is a benchmark, not a test: it passes or fails nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

BODY = json.dumps(
    {
        "id": "bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": '{"title": "Engineer"}'},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
    }
).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
REQUEST_BODY = json.dumps(
    {
        "model": "bench",
        "messages": [{"role": "user", "content": "Senior Engineer at Acme, Berlin (remote)"}],
        "max_tokens": 8,
    }
).encode()


# ---- the upstream -------------------------------------------------------------------------------------------
class Upstream(asyncio.Protocol):
    """Answers each complete request (headers + content-length body) with RESPONSE. Keep-alive."""

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = (
                int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
                if i >= 0
                else 0
            )
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n :]
            self.t.write(RESPONSE)


def run_upstream(port: int) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---- the load generator ---------------------------------------------------------------------------------------
async def one_connection(
    port: int, path: bytes, stop_at: float, lat: list[float], user: int, errors: list[int]
):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = (
        b"POST "
        + path
        + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-user-id: user-"
        + str(user).encode()
        + b"\r\ncontent-length: "
        + str(len(REQUEST_BODY)).encode()
        + b"\r\n\r\n"
        + REQUEST_BODY
    )
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            low = head.lower()
            i = low.find(b"content-length:")
            n = int(low[i + 15 : low.find(b"\r\n", i)])
            await reader.readexactly(n)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(1)
    finally:
        writer.close()


async def load(port: int, concurrency: int, seconds: float, warmup: float = 0.5) -> dict:
    path = b"/v1/chat/completions"
    # warm-up: open connections, fill pools, JIT nothing (CPython) but settle the caches
    await asyncio.gather(
        *(one_connection(port, path, time.perf_counter() + warmup, [], u, []) for u in range(concurrency))
    )
    lat: list[float] = []
    errors: list[int] = []
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(one_connection(port, path, stop, lat, u, errors) for u in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "n": len(lat),
        "rps": len(lat) / wall,
        "p50": q[49] * 1000,
        "p99": q[98] * 1000,
        "errors": len(errors),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def stack() -> str:
    import importlib.metadata as md

    parts = []
    for dist in ("starlette", "uvicorn", "aiohttp", "uvloop", "httptools"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} -")
    return ", ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: run only the upstream
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    a = p.parse_args()
    if a.upstream:
        run_upstream(a.upstream)
        return 0
    load_before = os.getloadavg()
    up_port, router_port = free_port(), free_port()
    env = {**os.environ, "TUNESHIP_QUIET": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)], env=env)]
    url = f"http://127.0.0.1:{up_port}/v1"
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "tuneship.serve.router", "--port", str(router_port)]
            + ["--backend", f"bench:v1={url}#bench-v1", "--backend", f"bench:v2={url}#bench-v2"]
            + ["--weights", "bench=v1:90,v2:10", "--stable", "bench=v1", "--canary", "bench=v2"],
            env=env,
        )
    )
    try:
        wait_port(up_port)
        wait_port(router_port)
        rows = []
        for c in a.concurrency:
            direct = asyncio.run(load(up_port, c, a.seconds))
            routed = asyncio.run(load(router_port, c, a.seconds))
            rows.append((c, direct, routed))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    print(f"machine: {machine()}")
    print(
        f"load:    {' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in os.getloadavg())} after (1/5/15-min averages; other work on the cores skews every column)"
    )
    print(f"stack:   {stack()}")
    print(f"{a.seconds:g} s per run, closed loop, keep-alive, 90/10 sticky route, metrics + watcher on\n")
    hdr = "| concurrency | direct p50 ms | direct p99 ms | direct req/s | routed p50 ms | routed p99 ms | routed req/s | added p50 ms | added p99 ms | errors |"
    print(hdr)
    print("|" + "|".join("---:" for _ in range(hdr.count("|") - 1)) + "|")
    for c, d, r in rows:
        print(
            f"| {c} | {d['p50']:.2f} | {d['p99']:.2f} | {d['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['rps']:,.0f} | {r['p50'] - d['p50']:+.2f} | {r['p99'] - d['p99']:+.2f} | {d['errors'] + r['errors']} |"
        )
    if a.json:
        print(json.dumps([{"concurrency": c, "direct": d, "routed": r} for c, d, r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
