"""What `tuneship serve` starts, and the supervisor that starts and stops it.

A plan is a list of `LaunchSpec`s (backends first, then the router) plus notes; `--dry-run` prints it.
The `Supervisor` starts each process in its own process group (so a stop reaches the whole tree, for example a
vLLM server's workers), waits until each answers its ready path, and on `stop()` sends SIGTERM to every group,
then SIGKILL to what is still there after a grace period. On Linux, children also get SIGTERM if the
supervisor itself dies (PR_SET_PDEATHSIG), so no backend outlives it.

Versions that join the route while serving (`tuneship registry promote NAME@v3 --to canary`): the router stays
its own process, and the serving process (the one running the supervisor) follows the route with a
`RouteFollower`, polled from `run_until_signal`'s loop. When the registry's route revision changes and the route
holds a version with no backend, it starts one: llama.cpp, a llama-cpp-python server on a free port for that
version's GGUF of the chosen quant, waited on until it answers; vLLM, the adapter loaded into the running server
through POST /v1/load_lora_adapter. Only then does it rewrite the backends file (`--backends-file`, in the log
directory) that the router polls, so the version's traffic moves to a backend that is already up, and no request
in flight is touched (the router swaps in a new backend table). A version whose backend fails to start is
logged with the reason and stays out of the router's table, so it gets no traffic (with a stable and a canary,
its users stay on stable); it is tried again only when the route's revision changes again. A version that
leaves the route keeps its backend (and stays reachable as NAME@vN): it costs one idle process, and a version
that comes back, as after a rollback and re-promotion, gets traffic at once. Everything stops with the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.artifacts import RECORD
from tuneship.errors import TuneshipError
from tuneship.progress import log
from tuneship.serve.backends import (
    LaunchSpec,
    LoraModule,
    base_label,
    llamacpp_spec,
    load_lora_adapter,
    same_base,
    vllm_merged_spec,
    vllm_spec,
)

DEFAULT_QUANT = "Q4_K_M"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServePlan:
    target: str
    kind: str  # gguf | registry | adapter | merged
    backend: str  # llamacpp | vllm
    specs: list[LaunchSpec]
    url: str  # what clients call (the router, or the single server)
    model: str  # the model name clients send
    runnable: bool = True
    notes: list[str] = field(default_factory=list)
    follower: RouteFollower | None = None  # registry names: starts backends for versions added later

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "kind": self.kind,
            "backend": self.backend,
            "url": self.url,
            "base_url": self.url + "/v1",
            "model": self.model,
            "runnable": self.runnable,
            "notes": self.notes,
            "processes": [s.as_dict() for s in self.specs],
        }


def router_spec(
    name: str,
    backends: dict[str, tuple[str, str]],
    host: str,
    port: int,
    root: str | None,
    api_key_env: str | None = None,
    options: list[str] | tuple[str, ...] = (),
    python: str | None = None,
    backends_file: str | None = None,
) -> LaunchSpec:
    """The router as its own process: `python -m tuneship.serve.router --backend NAME:vN=URL#MODEL ...`."""
    argv = [python or sys.executable, "-m", "tuneship.serve.router"]
    if root:
        argv += ["--root", str(root)]
    for version, (url, model) in backends.items():
        argv += ["--backend", f"{name}:{version}={url}#{model}"]
    argv += ["--host", host, "--port", str(port)]
    if api_key_env:
        argv += ["--api-key-env", api_key_env]
    if backends_file:
        argv += ["--backends-file", str(backends_file)]
    argv += list(options)
    return LaunchSpec(role="router", label="router", argv=argv, host=host, port=port, ready_path="/ready")


def plan_gguf(
    path: str | Path, host: str, port: int, n_ctx: int = 2048, threads: int | None = None
) -> ServePlan:
    p = Path(path)
    if not p.is_file():
        raise TuneshipError(f"GGUF file {p} does not exist")
    name = p.stem
    spec = llamacpp_spec(p.resolve(), name, host=host, port=port, n_ctx=n_ctx, n_threads=threads, label=name)
    return ServePlan(str(p), "gguf", "llamacpp", [spec], spec.url, name)


def _version_gguf(name: str, version: str, info: dict, quant: str) -> str:
    ggufs = info.get("gguf") or {}
    if quant in ggufs:
        return ggufs[quant]
    have = ", ".join(sorted(ggufs)) or "none"
    raise TuneshipError(
        f"{name}@{version} has no {quant} GGUF (has: {have}); export one with `tuneship export gguf` from its "
        f"merge, or pick another with --quant"
    )


def vllm_base_arg(base: dict) -> str:
    """What `vllm serve` loads for a recorded base: the bundled model's cached checkpoint, a local path, or an
    HF id."""
    spec = str(base.get("spec") or base.get("id") or "")
    if spec.startswith("bundled:"):
        from tuneship.models import bundled_checkpoint

        return str(bundled_checkpoint(spec.split(":", 1)[1]))
    return str(base.get("id") or spec)


def plan_registry(
    name: str,
    root: str | None,
    backend: str,
    host: str,
    port: int,
    backend_host: str = "127.0.0.1",
    quant: str = DEFAULT_QUANT,
    n_ctx: int = 2048,
    threads: int | None = None,
    api_key_env: str | None = None,
    router_options: list[str] | tuple[str, ...] = (),
    ports: list[int] | None = None,
    backends_file: str | None = None,
) -> ServePlan:
    """Backends for every version on NAME's route (each on a free port) and the router on `port`.
    With `backends_file`, the plan's `follower` starts backends for versions added to the route later."""
    from tuneship import registry

    route = registry.export_route(name, root=root)
    versions: dict[str, dict] = route["versions"]
    root_arg = str(registry.registry_root(root).resolve())
    ports = list(ports or [])
    specs: list[LaunchSpec] = []
    backends: dict[str, tuple[str, str]] = {}
    if backend == "llamacpp":
        for version, info in versions.items():
            gguf = _version_gguf(name, version, info, quant)
            model = f"{name}-{version}"
            bport = ports.pop(0) if ports else free_port(backend_host)
            spec = llamacpp_spec(
                gguf,
                model,
                host=backend_host,
                port=bport,
                n_ctx=n_ctx,
                n_threads=threads,
                label=f"{name}@{version}",
                version=version,
            )
            specs.append(spec)
            backends[version] = (spec.url + "/v1", model)
    elif backend == "vllm":
        stable = route["stable"]
        base = versions[stable]["base_model"]
        modules = [
            LoraModule(f"{name}-{v}", info["adapter_path"], info["base_model"], info.get("lora_r"))
            for v, info in versions.items()
        ]
        bport = ports.pop(0) if ports else free_port(backend_host)
        spec = vllm_spec(vllm_base_arg(base), base, modules, host=backend_host, port=bport, label=name)
        specs.append(spec)
        for v in versions:
            backends[v] = (spec.url + "/v1", f"{name}-{v}")
    else:
        raise TuneshipError(f"unknown backend {backend!r}; choose llamacpp or vllm")
    rspec = router_spec(
        name,
        backends,
        host,
        port,
        root_arg,
        api_key_env=api_key_env,
        options=router_options,
        backends_file=backends_file,
    )
    specs.append(rspec)
    notes = [
        f"route revision {route['revision']}: weights {route['weights']} (stable {route['stable']}, canary {route['canary']})"
    ]
    follower = None
    if backends_file:
        follower = RouteFollower(
            name,
            root_arg,
            backend,
            backends_file,
            backends,
            int(route["revision"]),
            backend_host=backend_host,
            quant=quant,
            n_ctx=n_ctx,
            threads=threads,
        )
        if backend == "vllm":
            follower.vllm_url, follower.vllm_base = specs[0].url, versions[route["stable"]]["base_model"]
        notes.append(f"versions added to the route later get a backend; the router reads {backends_file}")
    return ServePlan(name, "registry", backend, specs, rspec.url, name, notes=notes, follower=follower)


class RouteFollower:
    """Start a backend for each version that joins NAME's route while serving; tell the router once it is up.

    `backends` is the router's table as started ({vN: (base URL ending in /v1, model name)}); `check(sup)`
    is cheap while the route's revision is unchanged (one SQLite query)."""

    def __init__(
        self,
        name: str,
        root: str,
        backend: str,
        backends_file: str | Path,
        backends: dict[str, tuple[str, str]],
        revision: int,
        backend_host: str = "127.0.0.1",
        quant: str = DEFAULT_QUANT,
        n_ctx: int = 2048,
        threads: int | None = None,
    ):
        self.name = name
        self.root = root
        self.backend = backend
        self.backends_file = Path(backends_file)
        self.backends = dict(backends)
        self.revision = revision
        self.backend_host = backend_host
        self.quant = quant
        self.n_ctx = n_ctx
        self.threads = threads
        self.failed: dict[str, int] = {}  # version -> route revision it failed to start at
        self.vllm_url: str | None = None  # vLLM: the running server, and the base its adapters must share
        self.vllm_base: dict | None = None

    def check(self, sup: Supervisor) -> list[str]:
        """Start backends for the route's versions that have none; return the versions added."""
        from tuneship import registry

        try:
            rev = int(registry.route_revision(self.name, root=self.root))
            if rev == self.revision:
                return []
            route = registry.export_route(self.name, root=self.root)
        except Exception as e:  # the registry is busy or broken: keep serving, look again next time
            log(f"serve: reading the route of {self.name} failed ({e}); trying again")
            return []
        self.revision = rev = int(route["revision"])
        added = []
        for version, info in route["versions"].items():
            if version in self.backends or self.failed.get(version) == rev:
                continue
            try:
                self.backends[version] = self.start(sup, version, info)
            except TuneshipError as e:
                self.failed[version] = rev
                log(
                    f"serve: {self.name}@{version} joined the route but its backend failed to start, so it gets "
                    f"no traffic (its share stays on the other versions): {e}"
                )
                continue
            self.failed.pop(version, None)
            added.append(version)
            self.write()
            log(f"serve: {self.name}@{version} is up at {self.backends[version][0]}; the router adds it")
        return added

    def start(self, sup: Supervisor, version: str, info: dict) -> tuple[str, str]:
        model = f"{self.name}-{version}"
        if self.backend == "vllm":
            assert self.vllm_url and self.vllm_base is not None
            if not same_base(info.get("base_model") or {}, self.vllm_base):
                raise TuneshipError(
                    f"it was trained on {base_label(info.get('base_model') or {})}, but the vLLM server's base is "
                    f"{base_label(self.vllm_base)}"
                )
            log(f"serve: loading {self.name}@{version} into vLLM at {self.vllm_url}")
            load_lora_adapter(self.vllm_url, model, info["adapter_path"])
            return self.vllm_url + "/v1", model
        gguf = _version_gguf(self.name, version, info, self.quant)
        spec = llamacpp_spec(
            gguf,
            model,
            host=self.backend_host,
            port=free_port(self.backend_host),
            n_ctx=self.n_ctx,
            n_threads=self.threads,
            label=f"{self.name}@{version}",
            version=version,
        )
        log(f"serve: starting {spec.label} for the route: {spec.shell()}")
        sup.start_one(spec)
        try:
            took = sup.wait_ready(spec)
        except TuneshipError:
            sup.stop_one(spec.label)
            raise
        sup.specs.append(spec)
        log(f"serve: {spec.label} ready on {spec.url} ({took:.1f} s)")
        return spec.url + "/v1", model

    def write(self) -> None:
        """Rewrite the backends file in one rename, so the router never reads half of it."""
        table = {v: {"url": url, "model": model} for v, (url, model) in sorted(self.backends.items())}
        tmp = self.backends_file.with_name(self.backends_file.name + ".tmp")
        tmp.write_text(json.dumps({self.name: table}, indent=1))
        os.replace(tmp, self.backends_file)


@dataclass
class ServeOptions:
    backend: str | None = None  # llamacpp | vllm; None: llamacpp for a GGUF or a name, vllm for a directory
    host: str = "127.0.0.1"
    port: int = 8000
    backend_host: str = "127.0.0.1"
    root: str | None = None
    quant: str = DEFAULT_QUANT
    n_ctx: int = 2048
    threads: int | None = None
    api_key_env: str | None = None  # the variable holding the bearer key, when one is required
    router_options: list[str] = field(default_factory=list)
    backends_file: str | None = None  # registry names: lets the router take backends started later


def plan_target(target: str, o: ServeOptions) -> ServePlan:
    """What `tuneship serve TARGET` runs: a .gguf, an adapter or merged directory, or a registered name."""
    from tuneship.registry import check_name

    p = Path(target)
    if p.suffix == ".gguf":
        if o.backend == "vllm":
            raise TuneshipError(
                "a .gguf is served by llama.cpp; drop --backend vllm (vLLM serves adapter or merged directories)"
            )
        plan = plan_gguf(p, o.host, o.port, n_ctx=o.n_ctx, threads=o.threads)
        if (
            o.api_key_env
        ):  # llama-cpp-python reads its settings from the environment too: the key stays out of argv
            plan.specs[0].env_from["API_KEY"] = o.api_key_env
            plan.notes.append(f"the server requires the bearer key from ${o.api_key_env}")
        return plan
    if p.is_dir():
        if o.backend == "llamacpp":
            raise TuneshipError(
                f"llama.cpp serves GGUF files; export {p} first with `tuneship export gguf`, then serve the .gguf"
            )
        if (p / "adapter_config.json").is_file():
            return plan_adapter_dir(p, o.host, o.port)
        if (p / "config.json").is_file():
            spec = vllm_merged_spec(str(p.resolve()), p.name, host=o.host, port=o.port)
            return ServePlan(target, "merged", "vllm", [spec], spec.url, p.name)
        raise TuneshipError(
            f"{p} is neither an adapter (adapter_config.json) nor a merged model (config.json)"
        )
    if p.exists() or "/" in target or target.startswith("."):
        what = "is a file but not a .gguf" if p.exists() else "does not exist"
        raise TuneshipError(
            f"{target} {what}; serve a .gguf, an adapter or merged directory, or a registered name"
        )
    check_name(target)
    return plan_registry(
        target,
        o.root,
        o.backend or "llamacpp",
        o.host,
        o.port,
        backend_host=o.backend_host,
        quant=o.quant,
        n_ctx=o.n_ctx,
        threads=o.threads,
        api_key_env=o.api_key_env,
        router_options=o.router_options,
        backends_file=o.backends_file,
    )


def plan_adapter_dir(path: Path, host: str, port: int) -> ServePlan:
    """vLLM with one adapter directory as a LoRA module on its recorded base."""
    from tuneship.models import adapter_base_spec

    record = json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else {}
    base = record.get("base_model") or {"spec": adapter_base_spec(path), "id": adapter_base_spec(path)}
    r = (record.get("lora") or {}).get("r") or json.loads((path / "adapter_config.json").read_text()).get("r")
    name = path.name
    spec = vllm_spec(
        vllm_base_arg(base),
        base,
        [LoraModule(name, str(path.resolve()), base, r)],
        host=host,
        port=port,
        label=name,
    )
    return ServePlan(str(path), "adapter", "vllm", [spec], spec.url, name)


def has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Start the plan's processes in order, each in its own process group; stop them all on demand."""

    def __init__(
        self,
        specs: list[LaunchSpec],
        log_dir: str | Path | None = None,
        ready_timeout: float = 180.0,
        env: dict | None = None,
    ):
        self.specs = specs
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tuneship-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def log_path(self, spec: LaunchSpec) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.label)
        return self.log_dir / f"{safe}.log"

    def start_one(self, spec: LaunchSpec) -> subprocess.Popen:
        path = self.log_path(spec)
        self.logs[spec.label] = path
        env = {**os.environ, **self.env}
        for key in spec.unset_env:
            env.pop(key, None)
        env.update({k: env.get(src, "") for k, src in spec.env_from.items()})
        env.update(spec.env)
        # The router's own log lines go to our stderr; the model servers' chatter goes to log files.
        out = None if spec.role == "router" else open(path, "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                spec.argv,
                stdout=out or subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            if out:
                out.close()
        self.procs[spec.label] = proc
        return proc

    def wait_ready(self, spec: LaunchSpec) -> float:
        import httpx

        proc = self.procs[spec.label]
        t0 = time.monotonic()
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise TuneshipError(
                        f"{spec.label} exited with status {proc.returncode} while starting; {self.tail(spec)}"
                    )
                try:
                    if client.get(spec.url + spec.ready_path).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > self.ready_timeout:
                    raise TuneshipError(
                        f"{spec.label} did not become ready on {spec.url} in {self.ready_timeout:.0f} s; {self.tail(spec)}"
                    )
                time.sleep(0.1)

    def tail(self, spec: LaunchSpec, lines: int = 5) -> str:
        path = self.logs.get(spec.label)
        if not path or not path.exists():
            return "no log"
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
        return f"log {path}: " + " | ".join(text)

    def start(self) -> dict[str, float]:
        """Start every process: backends together, then the router once they are ready."""
        times: dict[str, float] = {}
        try:
            backends = [s for s in self.specs if s.role != "router"]
            for spec in backends:
                log(f"starting {spec.label}: {spec.shell()}")
                self.start_one(spec)
            for spec in backends:
                times[spec.label] = self.wait_ready(spec)
                log(f"{spec.label} ready on {spec.url} ({times[spec.label]:.1f} s)")
            for spec in self.specs:
                if spec.role == "router":
                    log(f"starting router: {spec.shell()}")
                    self.start_one(spec)
                    times[spec.label] = self.wait_ready(spec)
                    log(f"router ready on {spec.url}")
        except BaseException:
            self.stop()
            raise
        return times

    def stop_one(self, label: str, grace: float = 10.0) -> None:
        """Stop one process group (SIGTERM, then SIGKILL) and forget it."""
        proc = self.procs.pop(label, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def exited(self) -> list[tuple[str, int]]:
        return [(label, p.returncode) for label, p in self.procs.items() if p.poll() is not None]

    def kill(self, label: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process's whole group (tests use this to kill a backend under load)."""
        proc = self.procs[label]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every group (router first, so it stops taking requests), then SIGKILL after `grace`."""
        order = sorted(self.procs.items(), key=lambda kv: kv[0] != "router")
        for _, proc in order:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in order:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in order:
            # the group may hold children even after its leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Stop(BaseException):  # not an Exception: it must get through handlers of backend start-up failures
    pass


def run_until_signal(
    sup: Supervisor, on_ready=None, follower: RouteFollower | None = None, poll_interval: float = 1.0
) -> int:
    """Start everything, then block until SIGTERM/SIGINT (exit 0) or until the router dies (exit 1).
    With a `follower`, versions added to the route meanwhile get backends. Either way every process group is
    stopped before returning."""
    got: list[int] = []

    def handler(signum, frame):
        if not got:
            got.append(signum)
            raise _Stop

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    reported: set[str] = set()
    next_check = 0.0
    try:
        sup.start()
        if on_ready:
            on_ready()
        while True:
            if follower is not None and time.monotonic() >= next_check:
                follower.check(sup)
                next_check = time.monotonic() + poll_interval
            for label, code in sup.exited():
                if label == "router" or len(sup.procs) == 1:
                    log(f"{label} exited with status {code}; stopping")
                    return 1
                if label not in reported:
                    reported.add(label)
                    log(f"{label} exited with status {code}; the router sends its traffic to stable")
            time.sleep(0.2)
    except _Stop:
        log(f"got {signal.Signals(got[0]).name}; stopping")
        return 0
    finally:
        sup.stop()
        for s, h in old.items():
            signal.signal(s, h)
