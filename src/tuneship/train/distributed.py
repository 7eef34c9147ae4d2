"""Training on more than one process: DDP and FSDP-QLoRA through accelerate, launched by `tuneship train --nproc N`.

tuneship runs no distributed engine of its own. `tuneship train --nproc N` (or `distributed.mode: ddp|fsdp` in
the config) re-runs the same command through a launcher, N worker processes each running `tuneship train`:
- on GPUs, `accelerate launch --multi_gpu` (torchrun underneath; with one process, torchrun itself);
- on the CPU, `python -m torch.distributed.run` with the gloo backend (accelerate's own multi-CPU launch needs MPI).
Each worker sees LOCAL_RANK/WORLD_SIZE, so it trains instead of launching again. The HF Trainer (accelerate
underneath) wraps the model in DDP, or FSDP when `distributed.mode: fsdp`; the settings FSDP-QLoRA needs follow
the PEFT/bitsandbytes FSDP-QLoRA docs: 4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`), the
model loaded in that dtype, no fp32 upcast by `prepare_model_for_kbit_training`, FSDP1 flat parameters
(`use_orig_params: false`), module states synced from rank 0; the Trainer itself then wraps the LoRA layers apart
from the frozen ones and sets FSDP's mixed precision to the storage dtype (transformers' update_fsdp_plugin_peft).

Only rank 0 writes the run dir, the adapter, its record and logs; `tuneship.train.run` asks `is_main()`. The
Trainer itself has every rank write its RNG state (and, under FSDP, its optimizer shard) into the checkpoints of
the run dir, which is what lets `--resume` continue on every rank.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Literal

from pydantic import Field

from tuneship.config import StageConfig
from tuneship.errors import TuneshipError

WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
LAUNCHED_ENV = "TUNESHIP_LAUNCHED"  # set for the workers: a worker never launches again


class DistributedSection(StageConfig):
    mode: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description="none = one process; ddp = data parallel (every process holds the whole 4-bit model); "
        "fsdp = FSDP-QLoRA (the model is sharded over the processes). --nproc N > 1 turns none into ddp.",
    )
    nproc: int = Field(
        1, ge=1, le=1024, description="Worker processes on this host (one per GPU); --nproc sets it."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend: auto = nccl on GPUs, gloo on the CPU."
    )
    launcher: Literal["auto", "accelerate", "torchrun"] = Field(
        "auto",
        description="How workers start: auto = accelerate launch on GPUs, torchrun on the CPU (accelerate's multi-CPU launch needs MPI).",
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard",
        description="FSDP: shard parameters, gradients and optimizer state (full_shard), or only the latter two.",
    )
    fsdp_offload_params: bool = Field(
        False, description="FSDP: keep sharded parameters in CPU memory between uses."
    )
    fsdp_cpu_ram_efficient_loading: bool = Field(
        True, description="FSDP: only rank 0 reads the checkpoint; the others get its weights by broadcast."
    )


# ---- where this process stands ----


def in_worker() -> bool:
    """True inside a process started by a launcher (torchrun/accelerate set LOCAL_RANK and WORLD_SIZE)."""
    return any(k in os.environ for k in WORKER_ENV)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def resolve(cfg, nproc: int | None = None):
    """The train config with `--nproc` applied: N > 1 turns mode none into ddp. Inside a worker started by an
    outside launcher (plain torchrun), the world size it was given wins."""
    d = cfg.distributed.model_copy()
    if nproc is not None:
        d.nproc = nproc
    if in_worker() and world_size() > 1:
        d.nproc = world_size()
    if d.nproc > 1 and d.mode == "none":
        d.mode = "ddp"
    return cfg.model_copy(update={"distributed": d})


def needs_launch(cfg) -> bool:
    if cfg.distributed.mode == "none" or in_worker():
        return False
    if os.environ.get(LAUNCHED_ENV):
        raise TuneshipError(
            "this worker was started without LOCAL_RANK/WORLD_SIZE; launch with torchrun or accelerate launch"
        )
    return True


def check(cfg, device: str) -> None:
    """Refuse settings that cannot run here, with one line each."""
    d = cfg.distributed
    if d.mode == "none":
        return
    if device == "cpu":
        if d.mode == "fsdp":
            raise TuneshipError(
                "distributed.mode=fsdp (FSDP-QLoRA) needs CUDA GPUs; use distributed.mode=ddp on the CPU"
            )
        if d.backend == "nccl":
            raise TuneshipError("distributed.backend=nccl needs CUDA GPUs; use gloo (or auto) on the CPU")
    else:
        import torch

        n = torch.cuda.device_count()
        if d.nproc > n:
            raise TuneshipError(
                f"--nproc {d.nproc} asks for more processes than the {n} visible GPU(s); use --nproc {n} or fewer"
            )


def backend(cfg, device: str) -> str:
    b = cfg.distributed.backend
    return b if b != "auto" else ("nccl" if device == "cuda" else "gloo")


# ---- launching ----


def launch_command(cfg, device: str, cli_args: list[str]) -> list[str]:
    """The command that starts `nproc` workers, each running `tuneship train` with `cli_args`."""
    d = cfg.distributed
    launcher = d.launcher if d.launcher != "auto" else ("accelerate" if device == "cuda" else "torchrun")
    if launcher == "accelerate" and d.nproc == 1:  # --multi_gpu wants 2+ processes; it runs torchrun anyway
        launcher = "torchrun"
    worker = ["-m", "tuneship.cli", "train", *cli_args]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(d.nproc),
            *worker,
        ]
    if device == "cpu":
        raise TuneshipError(
            "distributed.launcher=accelerate cannot start several CPU processes without MPI; use torchrun"
        )
    opts = "--multi_gpu --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    opts += ["--num_processes", str(d.nproc), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *opts, *worker]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg, device: str, cli_args: list[str]) -> int:
    """Run the workers and wait for them. Returns the launcher's exit status."""
    from tuneship.progress import log

    cmd = launch_command(cfg, device, cli_args)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **{LAUNCHED_ENV: "1"})
    if device == "cpu":
        threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // cfg.distributed.nproc)
        env["OMP_NUM_THREADS"] = str(threads)
    log(f"launching {cfg.distributed.nproc} {cfg.distributed.mode} worker(s): {' '.join(cmd[1:6])} ...")
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):  # SIGTERM/SIGINT reach the launcher, which stops its workers
        proc.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cpu_threads(cfg) -> int:
    """Torch threads per process on the CPU: the cores shared out between the processes on this host."""
    if cfg.num_threads:
        return cfg.num_threads
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return max(1, (os.cpu_count() or 1) // max(1, per_host))


# ---- inside a worker ----


def init(cfg, device: str) -> None:
    """Join the process group early (the Trainer reuses it), so rank 0 can prepare the run dir behind a barrier.
    On ranks other than 0, library logs and warnings are turned down: logs come from rank 0."""
    if not in_worker():
        return
    check(cfg, device)
    if device == "cuda":
        import torch

        torch.cuda.set_device(local_rank())
    from accelerate import PartialState

    PartialState(cpu=device == "cpu", backend=backend(cfg, device))
    if not is_main():
        import warnings

        import datasets
        import transformers

        warnings.simplefilter("ignore")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply(cfg, device: str, dtype, model_kwargs: dict, sft_kwargs: dict) -> list[str]:
    """Edit the from_pretrained and SFTConfig kwargs for this process's part. Returns notes for the log."""
    d = cfg.distributed
    if d.mode == "none" or not in_worker():
        return []
    notes = [f"distributed: {d.mode}, rank {rank()} of {world_size()}, backend {backend(cfg, device)}"]
    sft_kwargs["ddp_backend"] = backend(cfg, device)
    if d.mode == "ddp":
        if device == "cuda":
            model_kwargs["device_map"] = {"": local_rank()}
        # LoRA on every block: no parameter goes unused, so DDP need not search the graph for them.
        sft_kwargs["ddp_find_unused_parameters"] = False
        return notes
    # FSDP-QLoRA. transformers reads these at load time (before the Trainer exists): rank 0 loads, others wait.
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true" if d.fsdp_cpu_ram_efficient_loading else "false"
    model_kwargs.pop("device_map", None)
    if cfg.quant.load_in_4bit:
        storage = model_kwargs["quantization_config"].bnb_4bit_quant_storage
        if storage != dtype:
            raise TuneshipError(
                f"FSDP-QLoRA: 4-bit storage dtype {storage} differs from the compute dtype {dtype}; set quant.quant_storage=auto"
            )
    sft_kwargs["fsdp"] = d.fsdp_sharding + " auto_wrap" + (" offload" if d.fsdp_offload_params else "")
    sft_kwargs["fsdp_config"] = {
        "version": 1,  # FSDP1 flat parameters: the path bitsandbytes documents for QLoRA (FSDP2 drops Params4bit metadata)
        "use_orig_params": False,
        "sync_module_states": True,
        "cpu_ram_efficient_loading": d.fsdp_cpu_ram_efficient_loading,
        "backward_prefetch": "backward_pre",
        "forward_prefetch": False,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    notes.append(
        f"distributed: FSDP {d.fsdp_sharding}, 4-bit weights stored in {str(dtype).removeprefix('torch.')}"
    )
    if sft_kwargs.get("optim") == "adamw_torch_fused":
        # Seen on an H100: torch's fused AdamW fails at the first step over FSDP1's flat LoRA parameters
        # ("Tensors of the same index must be on the same device and the same dtype").
        sft_kwargs["optim"] = "adamw_torch"
        notes.append("distributed: FSDP uses adamw_torch (the fused AdamW fails on FSDP's flat parameters)")
    return notes


def adapter_state(cfg, trainer) -> dict | None:
    """The full adapter state dict to save, gathered from the shards under FSDP (a collective: every rank calls
    it; rank 0 gets the tensors). None outside FSDP: the model saves its own weights."""
    if cfg.distributed.mode != "fsdp" or not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(
        trainer.model
    )  # FSDP1: a full state dict, offloaded to rank 0's CPU


def lora_digest(model, state: dict | None = None) -> str:
    """sha256 over this rank's LoRA weights (names and raw bytes, in name order): equal digests on every rank
    mean the gradients were synchronized."""
    import torch

    if state is None:
        state = {n: p for n, p in model.named_parameters() if "lora_" in n}
    else:
        state = {n: t for n, t in state.items() if "lora_" in n}
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
