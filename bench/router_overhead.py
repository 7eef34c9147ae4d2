"""Router overhead: latency added and throughput, router vs hitting a fast upstream directly.

    .venv/bin/python bench/router_overhead.py [--seconds 5] [--concurrency 1 32 128] [--workers 1 2]
                                              [--rate 2000] [--out results.json]

Processes on this machine:
- upstream: a minimal asyncio HTTP/1.1 server answering every POST with one fixed chat completion (so the
  upstream costs next to nothing and the numbers are the router's);
- router: `python -m tuneship.serve.router --workers W` with a two-version route at 90/10 (sticky by
  X-User-Id, watcher and metrics on), both versions pointing at the upstream; one setup per W in --workers;
- load: an asyncio client in this process with N keep-alive connections, each with its own user id.
Two kinds of run, each direct (client -> upstream) and routed (client -> router -> upstream):
- open loop at a fixed offered load (--rate req/s over all connections, at most 500 req/s per connection):
  the latency a request sees below saturation, counted from when the request was due, so a late send counts
  against the server. "Added" is routed minus direct at the same offered load: the router's own overhead;
- closed loop (each connection sends its next request as soon as the answer is in): the maximum req/s. Its
  latency is concurrency / throughput by Little's law, queueing and not overhead, so it is printed but
  not subtracted. The router's CPU time per request (its processes' user + system time from /proc) is
  measured here too: unlike latency, it hardly moves with other work on the machine.
Everything shares the same cores, so the client's own cost is in both columns. This is a benchmark, not a
test: it passes or fails nothing.
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
def request_bytes(path: bytes, user: int) -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-user-id: user-"
        + str(user).encode()
        + b"\r\ncontent-length: "
        + str(len(REQUEST_BODY)).encode()
        + b"\r\n\r\n"
        + REQUEST_BODY
    )


async def exchange(reader, writer, req: bytes) -> bool:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    low = head.lower()
    i = low.find(b"content-length:")
    n = int(low[i + 15 : low.find(b"\r\n", i)])
    await reader.readexactly(n)
    return head.startswith(b"HTTP/1.1 200")


async def one_connection(
    port: int,
    stop_at: float,
    lat: list[float],
    user: int,
    errors: list[int],
    interval: float | None = None,
    offset: float = 0.0,
):
    """Closed loop (interval None): the next request as soon as the answer is in. Open loop: one request
    every `interval` seconds from `offset` on; latency counts from when the request was due, so a late send
    (the previous answer still pending) counts against the server (no coordinated omission)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = request_bytes(b"/v1/chat/completions", user)
    due = time.perf_counter() + offset
    try:
        while True:
            if interval is not None:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                t0 = due
                due += interval
            else:
                t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            ok = await exchange(reader, writer, req)
            lat.append(time.perf_counter() - t0)
            if not ok:
                errors.append(1)
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the router's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def load(
    port: int,
    concurrency: int,
    seconds: float,
    rate: float | None = None,
    warmup: float = 0.5,
    server_pid: int | None = None,
) -> dict:
    """`concurrency` keep-alive connections for `seconds`: closed loop, or open loop at `rate` req/s in all.
    With `server_pid`, also the CPU time the server (and its children) spent per request."""
    interval = concurrency / rate if rate else None
    offsets = [(interval or 0) * u / concurrency for u in range(concurrency)]
    # warm-up: open connections, fill the router's upstream pool, settle the caches
    t = time.perf_counter() + warmup
    await asyncio.gather(
        *(one_connection(port, t, [], u, [], interval, offsets[u]) for u in range(concurrency))
    )
    lat: list[float] = []
    errors: list[int] = []
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(
        *(one_connection(port, stop, lat, u, errors, interval, offsets[u]) for u in range(concurrency))
    )
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else None
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "n": len(lat),
        "rps": len(lat) / wall,
        "p50": q[49] * 1000,
        "p99": q[98] * 1000,
        "errors": len(errors),
        "cpu_us_per_request": cpu / len(lat) * 1e6 if cpu is not None else None,
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


def start_router(port: int, up_port: int, workers: int, env: dict, cpus: set[int] | None) -> subprocess.Popen:
    url = f"http://127.0.0.1:{up_port}/v1"
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    return subprocess.Popen(
        pin
        + [sys.executable, "-m", "tuneship.serve.router", "--port", str(port), "--workers", str(workers)]
        + ["--backend", f"bench:v1={url}#bench-v1", "--backend", f"bench:v2={url}#bench-v2"]
        + ["--weights", "bench=v1:90,v2:10", "--stable", "bench=v1", "--canary", "bench=v2"],
        env=env,
    )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def offered(rate: float, concurrency: int) -> float:
    """The open-loop rate at this concurrency: `rate`, but at most 500 req/s per connection (one request
    every 2 ms), so one connection is never driven into its own queue."""
    return min(rate, 500.0 * concurrency)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="router processes, one setup each")
    p.add_argument(
        "--rate", type=float, default=2000.0, help="open-loop offered load in req/s (0: closed loop only)"
    )
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument(
        "--pin",
        action="store_true",
        help="1-worker router on the last core, client and upstream on the others (less scheduler noise)",
    )
    p.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: run only the upstream
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    a = p.parse_args()
    if a.upstream:
        run_upstream(a.upstream)
        return 0
    load_before = os.getloadavg()
    up_port = free_port()
    env = {**os.environ, "TUNESHIP_QUIET": "1"}
    cpus = sorted(os.sched_getaffinity(0))
    if a.pin and len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    if a.pin:
        os.sched_setaffinity(0, cpus[:-1])  # this client and the upstream it starts
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)], env=env)
    results: dict = {"direct": {}, "routed": {}}
    try:
        wait_port(up_port)
        for c in a.concurrency:
            results["direct"][c] = {
                "closed": asyncio.run(load(up_port, c, a.seconds, server_pid=upstream.pid))
            }
            if a.rate:
                results["direct"][c]["open"] = asyncio.run(load(up_port, c, a.seconds, offered(a.rate, c)))
        for w in a.workers:
            port = free_port()
            router = start_router(port, up_port, w, env, {cpus[-1]} if a.pin and w == 1 else set(cpus))
            try:
                wait_port(port)
                time.sleep(1.0 if w > 1 else 0.2)  # every worker up
                results["routed"][w] = {}
                for c in a.concurrency:
                    r = results["routed"][w][c] = {
                        "closed": asyncio.run(load(port, c, a.seconds, server_pid=router.pid))
                    }
                    if a.rate:
                        r["open"] = asyncio.run(load(port, c, a.seconds, offered(a.rate, c)))
            finally:
                stop([router])
    finally:
        stop([upstream])
    info = {
        "machine": machine(),
        "stack": stack(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": a.seconds,
        "rate": a.rate,
        "date": time.strftime("%Y-%m-%d"),
        "pinned": a.pin,
    }
    print(f"machine: {info['machine']}")
    print(
        f"load:    {' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in info['load_after'])} after (1/5/15-min averages; other work on the cores skews every column)"
    )
    print(f"stack:   {info['stack']}")
    print(f"{a.seconds:g} s per run, keep-alive, 90/10 sticky route, metrics + watcher on\n")
    if a.rate:
        print(
            f"Latency added at a fixed offered load (open loop: {a.rate:,.0f} req/s, at most 500 req/s per "
            "connection; latency from when each request was due)"
        )
        hdr = "| concurrency | offered req/s | direct p50 ms | direct p99 ms |" + "".join(
            f" {w}w added p50 ms | {w}w added p99 ms |" for w in a.workers
        )
        print(hdr)
        print("|" + "|".join("---:" for _ in range(hdr.count("|") - 1)) + "|")
        for c in a.concurrency:
            d = results["direct"][c]["open"]
            cells = [f"{c}", f"{offered(a.rate, c):,.0f}", f"{d['p50']:.2f}", f"{d['p99']:.2f}"]
            for w in a.workers:
                r = results["routed"][w][c]["open"]
                cells += [f"{r['p50'] - d['p50']:+.2f}", f"{r['p99'] - d['p99']:+.2f}"]
            print("| " + " | ".join(cells) + " |")
        print()
    print(
        "Maximum throughput (closed loop: each connection sends its next request as soon as the answer is in)"
    )
    hdr = (
        "| concurrency | direct req/s | direct p99 ms |"
        + "".join(f" {w}w req/s | {w}w p99 ms | {w}w router CPU µs/req |" for w in a.workers)
        + " errors |"
    )
    print(hdr)
    print("|" + "|".join("---:" for _ in range(hdr.count("|") - 1)) + "|")
    for c in a.concurrency:
        d = results["direct"][c]["closed"]
        cells = [f"{c}", f"{d['rps']:,.0f}", f"{d['p99']:.2f}"]
        errors = sum(x["errors"] for x in results["direct"][c].values())
        for w in a.workers:
            r = results["routed"][w][c]
            cells += [
                f"{r['closed']['rps']:,.0f}",
                f"{r['closed']['p99']:.2f}",
                f"{r['closed']['cpu_us_per_request']:.0f}",
            ]
            errors += sum(x["errors"] for x in r.values())
        print("| " + " | ".join(cells) + f" | {errors} |")
    out = {"info": info, **results}
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, a.out)
    if a.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
