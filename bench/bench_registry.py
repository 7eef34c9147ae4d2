"""Registry timings: CLI start-up, the router's polling call, add and export-route.

    .venv/bin/python bench/bench_registry.py [--versions 50]

Prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tuneship import registry as reg


def adapter(path: Path, r: int = 16, hidden: int = 576, layers: int = 30) -> Path:
    """An adapter of the real demo shape: r=16 on q,k,v,o of SmolLM2-135M (about 9 MB in fp32)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    )
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"layers.{i}.{m}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
            tensors[f"layers.{i}.{m}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "registry"
        src = adapter(Path(tmp) / "adapter")
        size_mb = (src / "adapter_model.safetensors").stat().st_size / 1e6
        adds = timed(lambda: reg.add_version(src, "demo", root=root), args.versions)
        reg.promote("demo@v1", to="stable", root=root)
        reg.promote("demo@v2", to="canary", weight=10, root=root)
        tuneship = str(Path(sys.executable).with_name("tuneship"))
        cmd = [tuneship, "registry", "list", "--json", "--root", str(root)]
        cli = timed(lambda: subprocess.run(cmd, capture_output=True, check=True), 5)
        poll = timed(lambda: reg.route_revision("demo", root=root), 200)
        export = timed(lambda: reg.export_route("demo", root=root), 20)
        resolve = timed(lambda: reg.resolve_ref("demo@stable", root=root), 20)
        rows = [
            (f"add ({size_mb:.1f} MB adapter)", adds),
            (f"`tuneship registry list --json` ({args.versions} versions), whole process", cli),
            ("route_revision (router poll)", poll),
            ("export_route (2 versions, adapters re-hashed)", export),
            ("resolve_ref (hash verified)", resolve),
        ]
        print(f"{'operation':<62} {'median ms':>10} {'max ms':>10} {'n':>5}")
        for label, t in rows:
            print(f"{label:<62} {statistics.median(t) * 1e3:>10.2f} {max(t) * 1e3:>10.2f} {len(t):>5}")


if __name__ == "__main__":
    main()
