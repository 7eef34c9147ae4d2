"""`tuneship serve TARGET`: a GGUF, an adapter or merged directory, or a registered name behind the router."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option
from tuneship.errors import TuneshipError

API_KEY_ENV = "TUNESHIP_API_KEY"


@click.command(name="serve")
@click.argument("target")
@click.option(
    "--backend",
    type=click.Choice(["llamacpp", "vllm"]),
    help="Model server (default: llamacpp for a GGUF or a name, vllm for a directory).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address the router (or the single server) listens on.",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=int,
    help="Port the router (or the single server) listens on.",
)
@click.option(
    "--backend-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the backends listen on (they take free ports).",
)
@click.option(
    "--root",
    envvar="TUNESHIP_REGISTRY",
    help="Registry root (default: $TUNESHIP_REGISTRY or the default registry).",
)
@click.option(
    "--quant", default="Q4_K_M", show_default=True, help="Which GGUF of each version llama.cpp serves."
)
@click.option("--n-ctx", default=2048, show_default=True, type=int, help="llama.cpp context size.")
@click.option("--threads", type=int, help="llama.cpp threads per backend (default: llama-cpp-python's).")
@click.option("--api-key", envvar=API_KEY_ENV, help=f"Require this bearer key (or set ${API_KEY_ENV}).")
@click.option(
    "--cooldown",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds a failed backend stays out of rotation.",
)
@click.option(
    "--rollback-threshold",
    default=0.05,
    show_default=True,
    type=float,
    help="Canary regression (error rate, valid-JSON rate) that triggers auto-rollback.",
)
@click.option(
    "--min-samples",
    default=50,
    show_default=True,
    type=int,
    help="Samples per version before the watcher judges.",
)
@click.option("--json-signal", is_flag=True, help="Judge the canary also by its rate of valid-JSON answers.")
@click.option(
    "--router-workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Router processes sharing --port (SO_REUSEPORT). One process tops out at one core (~6,000-7,000 req/s "
    "on the 2-core test VM); give more where the router has cores of its own.",
)
@click.option("--no-watcher", is_flag=True, help="Turn automatic rollback off.")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    help="Where backend logs go (default: a temporary directory).",
)
@click.option("--dry-run", is_flag=True, help="Print the exact commands instead of running them.")
@json_option
def serve(
    target: str,
    backend: str | None,
    host: str,
    port: int,
    backend_host: str,
    root: str | None,
    quant: str,
    n_ctx: int,
    threads: int | None,
    api_key: str | None,
    cooldown: float,
    rollback_threshold: float,
    min_samples: int,
    json_signal: bool,
    router_workers: int,
    no_watcher: bool,
    log_dir: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Serve TARGET over an OpenAI-compatible API.

    \b
    TARGET is one of:
      MODEL.gguf      one llama-cpp-python server (CPU or GPU)
      ADAPTER_DIR     vLLM with the adapter as a LoRA module (GPU; on a CPU host the command is printed)
      MERGED_DIR      vLLM serving the merged checkpoint (GPU; printed on a CPU host)
      NAME            every version on NAME's registry route, each on its own backend, behind the A/B
                      router on --port (sticky weighted split, failover, metrics, auto-rollback)

    SIGTERM or SIGINT stops everything, backends included.
    """
    import tempfile
    from pathlib import Path

    from tuneship.serve import launch

    if not dry_run:
        log_dir = log_dir or tempfile.mkdtemp(prefix="tuneship-serve-")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    # how the router learns of backends started for versions added to the route while serving
    backends_file = str(Path(log_dir) / "backends.json") if log_dir else None
    if backends_file and not dry_run:
        Path(backends_file).unlink(missing_ok=True)  # a previous run's backends are gone
    env: dict[str, str] = {}
    if api_key:
        env[API_KEY_ENV] = api_key
    router_options = ["--cooldown", str(cooldown), "--rollback-threshold", str(rollback_threshold)]
    router_options += ["--min-samples", str(min_samples), "--workers", str(router_workers)]
    router_options += (["--json-signal"] if json_signal else []) + (["--no-watcher"] if no_watcher else [])
    options = launch.ServeOptions(
        backend=backend,
        host=host,
        port=port,
        backend_host=backend_host,
        root=root,
        quant=quant,
        n_ctx=n_ctx,
        threads=threads,
        api_key_env=API_KEY_ENV if api_key else None,
        router_options=router_options,
        backends_file=backends_file,
    )
    plan = launch.plan_target(target, options)
    if plan.backend == "vllm" and not dry_run and not (launch.has_gpu() and launch.vllm_importable()):
        plan.runnable = False
        plan.notes.append(
            "vLLM needs an NVIDIA GPU and the vllm extra (pip install 'tuneship[vllm]'); this host has "
            + ("no GPU" if not launch.has_gpu() else "no vllm")
            + ", so the command is printed instead: run it on a GPU host"
        )
    if dry_run or not plan.runnable:
        emit(plan.as_dict(), as_json, _human(plan, dry_run))
        return
    sup = launch.Supervisor(plan.specs, log_dir=log_dir, env=env)

    def ready() -> None:
        emit(
            {**plan.as_dict(), "status": "serving", "log_dir": str(sup.log_dir)},
            as_json,
            f"serving {plan.model} on {plan.url}/v1 (logs in {sup.log_dir}); Ctrl-C stops",
        )

    code = launch.run_until_signal(sup, on_ready=ready, follower=plan.follower)
    if code:
        raise TuneshipError(f"a serving process died; see the logs in {sup.log_dir}")


def _human(plan, dry_run: bool) -> str:
    lines = []
    for note in plan.notes:
        lines.append(f"# {note}")
    for spec in plan.specs:
        lines.append(f"# {spec.role} {spec.label} -> {spec.url}")
        lines.append(spec.shell())
    if dry_run and plan.runnable:
        lines.append(f"# clients: base_url={plan.url}/v1 model={plan.model}")
    return "\n".join(lines)
