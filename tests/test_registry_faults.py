"""Registry faults with real processes: 8 concurrent writers, SIGKILL in the middle of an add, start-up speed."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_registry import DATA_A, make_adapter
from tuneship import registry as reg

REPO = Path(__file__).resolve().parents[1]
TUNESHIP = Path(sys.executable).with_name("tuneship")


def python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, **kw)


def make_big_adapter(path: Path, mib: int = 200) -> Path:
    """A valid adapter whose safetensors file is large (sparse on disk), so that copying it takes a while."""
    make_adapter(path)
    n = mib * (1 << 20) // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    return path


def assert_consistent(root: Path, name: str) -> list[str]:
    """Visible versions are contiguous and intact, and each has exactly one 'add' in the history."""
    versions = [r["version"] for r in reg.list_versions(root=root, name=name)]
    assert versions == [f"v{i}" for i in range(1, len(versions) + 1)]
    report = reg.verify(root=root, name=name)
    assert report["ok"], report["problems"]
    adds = [h["to"] for h in reg.history(name, root=root) if h["action"] == "add"] if versions else []
    assert adds == versions
    on_disk = (
        sorted(p.name for p in (root / "versions" / name).iterdir())
        if (root / "versions" / name).exists()
        else []
    )
    assert set(on_disk) - set(versions) <= {f"v{len(versions) + 1}"}  # at most one unpublished leftover
    return versions


# ---------------------------------------------------------------- concurrency


WORKER = """
import sys, time
from pathlib import Path
from tuneship import registry as reg
root, src, idx, go = {root!r}, {src!r}, {idx}, {go!r}
while not Path(go).exists():
    time.sleep(0.005)
for i in range(3):
    ref = reg.add_version(src, "shared", root=root, notes=f"worker {idx} #{{i}}")
    reg.attach_result(ref, "eval", {{"metrics": {{"exact_match": {{"value": 0.9}}}}, "data_sha256": {data!r}}}, root=root)
    reg.promote(ref, to="stable", root=root, reason=f"worker {idx}")
    reg.add_version(src, "own{idx}", root=root)
    print(ref, flush=True)
"""


def test_eight_processes_adding_and_promoting_lose_nothing(tmp_path):
    root = tmp_path / "registry"
    src = make_adapter(tmp_path / "adapter")
    go = tmp_path / "go"
    procs = [
        python(
            WORKER.format(root=str(root), src=str(src), idx=i, go=str(go), data=DATA_A),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    time.sleep(1.0)  # let them all import and wait at the line
    go.touch()
    refs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        refs += out.split()

    assert len(refs) == 24 and len(set(refs)) == 24
    assert sorted(refs, key=lambda r: int(r.split("@v")[1])) == [f"shared@v{i}" for i in range(1, 25)]
    assert assert_consistent(root, "shared") == [f"v{i}" for i in range(1, 25)]
    for i in range(8):
        assert assert_consistent(root, f"own{i}") == ["v1", "v2", "v3"]

    hist = reg.history("shared", root=root)
    actions = [h["action"] for h in hist]
    assert (
        actions.count("add") == 24 and actions.count("attach-eval") == 24 and actions.count("promote") == 24
    )
    promotions = [h for h in hist if h["action"] == "promote"]
    assert sorted(h["to"] for h in promotions) == sorted(f"v{i}" for i in range(1, 25))
    # serializable: each promotion saw the stable that the previous one set
    assert promotions[0]["from"] is None
    assert all(b["from"] == a["to"] for a, b in zip(promotions, promotions[1:], strict=False))
    route = reg.get_route("shared", root=root)
    assert route["stable"] == promotions[-1]["to"] and route["weights"] == {route["stable"]: 100}
    assert not any((root / ".staging").iterdir())


# ---------------------------------------------------------------- SIGKILL in the middle of an add


ADD = """
from tuneship.registry import add_version
add_version({src!r}, "demo", root={root!r})
"""


def _staged_bytes(root: Path) -> int:
    total = 0
    for f in (root / ".staging").glob("*/adapter/adapter_model.safetensors"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_sigkill_mid_copy_leaves_no_half_version(tmp_path):
    root = tmp_path / "registry"
    reg.add_version(make_adapter(tmp_path / "small"), "demo", root=root)
    big = make_big_adapter(tmp_path / "big")
    full = (big / "adapter_model.safetensors").stat().st_size

    proc = python(ADD.format(src=str(big), root=str(root)))
    deadline = time.time() + 60
    while time.time() < deadline and not 0 < _staged_bytes(root) < full and proc.poll() is None:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert 0 < _staged_bytes(root) < full, "the kill should land in the middle of the copy"

    # nothing half-done is visible: not in list, refs, history, nor the versions folder
    assert assert_consistent(root, "demo") == ["v1"]
    assert reg.route_revision("demo", root=root) == 0
    with pytest.raises(Exception, match="unknown ref demo@v2"):
        reg.resolve_ref("demo@v2", root=root)
    assert reg.resolve_ref("demo@latest", root=root).parent.name == "v1"
    assert sorted(p.name for p in (root / "versions" / "demo").iterdir()) == ["v1"]

    # the next add succeeds, takes v2, and sweeps the dead process's staging copy
    assert reg.add_version(make_adapter(tmp_path / "next", seed=3), "demo", root=root) == "demo@v2"
    assert assert_consistent(root, "demo") == ["v1", "v2"]
    assert not any((root / ".staging").iterdir())


def test_leftover_from_a_kill_after_rename_is_invisible_and_replaced(tmp_path):
    """A kill between renaming the copy into place and COMMIT leaves a folder the database never knew."""
    root = tmp_path / "registry"
    reg.add_version(make_adapter(tmp_path / "a"), "demo", root=root)
    leftover = root / "versions" / "demo" / "v2" / "adapter"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    assert assert_consistent(root, "demo") == ["v1"]
    ref = reg.add_version(make_adapter(tmp_path / "b", seed=1), "demo", root=root)
    assert (
        ref == "demo@v2"
        and (reg.resolve_ref(ref, root=root) / "adapter_model.safetensors").read_bytes() != b"half"
    )
    assert assert_consistent(root, "demo") == ["v1", "v2"]


def test_sigkill_at_any_moment_keeps_the_registry_consistent(tmp_path):
    root = tmp_path / "registry"
    big = make_big_adapter(tmp_path / "big", mib=100)
    t0 = time.time()
    assert python(ADD.format(src=str(big), root=str(root))).wait(timeout=120) == 0
    full_add = time.time() - t0
    for frac in (0.3, 0.6, 0.8, 0.9, 0.97):
        proc = python(ADD.format(src=str(big), root=str(root)))
        time.sleep(full_add * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert_consistent(root, "demo")
    before = len(reg.list_versions(root=root, name="demo"))
    ref = reg.add_version(make_adapter(tmp_path / "last", seed=5), "demo", root=root)
    assert ref == f"demo@v{before + 1}"
    assert assert_consistent(root, "demo")[-1] == f"v{before + 1}"


# ---------------------------------------------------------------- speed: no torch, fast start


def test_registry_commands_do_not_import_torch(tmp_path):
    root = tmp_path / "registry"
    reg.add_version(make_adapter(tmp_path / "a"), "demo", root=root)
    code = f"""
    import sys
    import tuneship.cli
    rc = tuneship.cli.main(["registry", "list", "--json", "--root", {str(root)!r}])
    import tuneship.registry.hub
    heavy = sorted(m for m in ("torch", "transformers", "peft", "llama_cpp", "huggingface_hub") if m in sys.modules)
    print("HEAVY", heavy, rc)
    """
    proc = python(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"version": "v1"' in out
    assert "HEAVY [] 0" in out


def test_registry_list_is_fast(tmp_path):
    root = tmp_path / "registry"
    src = make_adapter(tmp_path / "a")
    for _ in range(20):
        reg.add_version(src, "demo", root=root)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(TUNESHIP), "registry", "list", "--json", "--root", str(root)], capture_output=True, text=True
        )
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == 20
    # the whole process, interpreter start included, on a busy 2-core machine
    assert min(times) < 1.0, times
