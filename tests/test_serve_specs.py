"""Launch specs and `tuneship serve --dry-run`: the exact commands, checked argument by argument.

vLLM cannot run here (no GPU), so its backend is tested through the command it generates; the GPU test at the
end runs it where vLLM and a GPU exist.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.fixtures_serve import NAME, make_registry
from tuneship.cli import main
from tuneship.errors import TuneshipError
from tuneship.serve.backends import LoraModule, llamacpp_spec, max_lora_rank_for, vllm_spec

BASE = {"spec": "Qwen/Qwen2.5-1.5B", "id": "Qwen/Qwen2.5-1.5B", "revision": "abc", "sha256": None}
OTHER = {
    "spec": "meta-llama/Llama-3.2-1B",
    "id": "meta-llama/Llama-3.2-1B",
    "revision": "def",
    "sha256": None,
}


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def lora_modules(argv: list[str]) -> list[dict]:
    i = argv.index("--lora-modules") + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(json.loads(argv[i]))
        i += 1
    return out


def test_vllm_spec_sizes_the_server_for_every_adapter():
    mods = [
        LoraModule(f"{NAME}-v{i}", f"/reg/{NAME}/v{i}/adapter", BASE, r)
        for i, r in ((1, 16), (2, 48), (3, 8))
    ]
    spec = vllm_spec("Qwen/Qwen2.5-1.5B", BASE, mods, host="0.0.0.0", port=9000)
    argv = spec.argv
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-1.5B"] and "--enable-lora" in argv
    assert lora_modules(argv) == [
        {"name": m.name, "path": m.path, "base_model_name": "Qwen/Qwen2.5-1.5B"} for m in mods
    ]
    assert int(arg(argv, "--max-loras")) >= 3
    assert arg(argv, "--max-lora-rank") == "64"  # smallest allowed value >= 48
    assert int(arg(argv, "--max-cpu-loras")) >= int(arg(argv, "--max-loras"))
    assert (arg(argv, "--host"), arg(argv, "--port")) == ("0.0.0.0", "9000")
    assert spec.url == "http://127.0.0.1:9000" and spec.models == {m.name: m.name for m in mods}
    assert shlex.split(spec.shell().split(" ", 1)[1]) == argv  # the printed line is the argv, quoted right


@pytest.mark.parametrize(("r", "rank"), [(1, 1), (2, 8), (8, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_max_lora_rank_is_the_smallest_allowed_value_at_or_above_r(r, rank):
    assert max_lora_rank_for(r) == rank


def test_vllm_spec_refuses_a_rank_too_large_and_an_adapter_on_another_base():
    with pytest.raises(TuneshipError, match="above vLLM's largest"):
        max_lora_rank_for(513)
    good = LoraModule("a-v1", "/a", BASE, 16)
    bad = LoraModule("a-v2", "/b", OTHER, 16)
    with pytest.raises(TuneshipError, match="trained on meta-llama/Llama-3.2-1B.*base is Qwen/Qwen2.5-1.5B"):
        vllm_spec("Qwen/Qwen2.5-1.5B", BASE, [good, bad])
    # same id, different file hash: a different base too
    h1, h2 = {**BASE, "sha256": "1" * 64}, {**BASE, "sha256": "2" * 64}
    with pytest.raises(TuneshipError):
        vllm_spec("Qwen/Qwen2.5-1.5B", h1, [LoraModule("a-v1", "/a", h2, 8)])


def test_llamacpp_spec_and_refusals(tmp_path):
    spec = llamacpp_spec(
        tmp_path / "m.gguf", "jobs-v1", host="127.0.0.1", port=8123, n_threads=2, version="v1"
    )
    argv = spec.argv
    assert argv[1:3] == ["-m", "llama_cpp.server"]
    assert arg(argv, "--model") == str(tmp_path / "m.gguf") and arg(argv, "--model_alias") == "jobs-v1"
    assert arg(argv, "--port") == "8123" and arg(argv, "--n_threads") == "2"
    assert spec.unset_env == ("HOST", "PORT") and spec.shell().startswith("env -u HOST -u PORT ")
    with pytest.raises(TuneshipError, match="not a .gguf"):
        llamacpp_spec(tmp_path / "model.safetensors", "x")


def run_json(capsys, *args) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main([*args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and out.strip().startswith("{") else None), err


def test_serve_gguf_dry_run_prints_the_llamacpp_command(capsys, tmp_path, monkeypatch):
    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    rc, plan, _ = run_json(
        capsys, "serve", str(gguf), "--port", "8111", "--host", "0.0.0.0", "--dry-run", "--json"
    )
    assert rc == 0 and plan["kind"] == "gguf" and plan["backend"] == "llamacpp"
    (proc,) = plan["processes"]
    assert proc["argv"][2] == "llama_cpp.server" and arg(proc["argv"], "--model") == str(gguf.resolve())
    assert (arg(proc["argv"], "--host"), arg(proc["argv"], "--port")) == ("0.0.0.0", "8111")
    # an API key reaches the server through the environment, never the command line
    monkeypatch.setenv("TUNESHIP_API_KEY", "topsecret")
    rc, plan, _ = run_json(capsys, "serve", str(gguf), "--dry-run", "--json")
    assert (
        "topsecret" not in json.dumps(plan)
        and 'API_KEY="$TUNESHIP_API_KEY"' in plan["processes"][0]["command"]
    )
    rc, out, err = run_json(capsys, "serve", str(gguf), "--backend", "vllm", "--dry-run")
    assert rc == 2 and "llama.cpp" in err


def test_serve_adapter_dir_on_a_cpu_host_prints_the_vllm_command(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 16, "base_model_name_or_path": "Qwen/Qwen2.5-1.5B"})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    rc, plan, _ = run_json(capsys, "serve", str(adapter), "--json")  # not --dry-run: there is no GPU here
    assert rc == 0 and plan["backend"] == "vllm" and plan["runnable"] is False
    assert any("GPU" in n for n in plan["notes"])
    argv = plan["processes"][0]["argv"]
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-1.5B"] and arg(argv, "--max-lora-rank") == "16"
    assert lora_modules(argv) == [
        {"name": "adapter", "path": str(adapter.resolve()), "base_model_name": "Qwen/Qwen2.5-1.5B"}
    ]
    rc, _, err = run_json(capsys, "serve", str(adapter), "--backend", "llamacpp")
    assert rc == 2 and "export" in err and "gguf" in err.lower()


def test_serve_name_dry_run_lists_a_backend_per_version_and_the_router(capsys, adapter_dir, tmp_path):
    root = make_registry(tmp_path / "registry", adapter_dir)
    # no GGUF attached yet: a clear error naming the fix
    rc, _, err = run_json(capsys, "serve", NAME, "--root", str(root), "--dry-run")
    assert rc == 2 and f"{NAME}@v1 has no Q4_K_M GGUF" in err and "tuneship export gguf" in err
    from tuneship import registry as reg

    for v in ("v1", "v2"):
        f = tmp_path / f"{v}-Q4_K_M.gguf"
        f.write_bytes(b"GGUF" + v.encode())
        reg.attach_result(f"{NAME}@{v}", "gguf", {"quant": "Q4_K_M"}, artifact=f, root=root)
    rc, plan, _ = run_json(
        capsys,
        "serve",
        NAME,
        "--root",
        str(root),
        "--port",
        "8200",
        "--router-workers",
        "3",
        "--dry-run",
        "--json",
    )
    assert rc == 0 and plan["url"] == "http://127.0.0.1:8200" and plan["model"] == NAME
    backends = [p for p in plan["processes"] if p["role"] == "backend"]
    (router,) = [p for p in plan["processes"] if p["role"] == "router"]
    assert [b["label"] for b in backends] == [f"{NAME}@v1", f"{NAME}@v2"]
    ports = {int(b["url"].rsplit(":", 1)[1]) for b in backends}
    assert len(ports) == 2 and 8200 not in ports
    expected = [f"{NAME}:{v}={b['url']}/v1#{NAME}-{v}" for v, b in zip(("v1", "v2"), backends, strict=True)]
    got = [router["argv"][i + 1] for i, a in enumerate(router["argv"]) if a == "--backend"]
    assert (
        got == expected
        and arg(router["argv"], "--port") == "8200"
        and arg(router["argv"], "--workers") == "3"
    )
    assert Path(arg(router["argv"], "--root")) == Path(root)
    for b, v in zip(backends, ("v1", "v2"), strict=True):
        assert Path(arg(b["argv"], "--model")).read_bytes() == b"GGUF" + v.encode()
    # vLLM for the same name: one server with both adapters, the router pointing both versions at it
    rc, plan, _ = run_json(
        capsys, "serve", NAME, "--root", str(root), "--backend", "vllm", "--dry-run", "--json"
    )
    (vllm,) = [p for p in plan["processes"] if p["role"] == "backend"]
    assert [m["name"] for m in lora_modules(vllm["argv"])] == [f"{NAME}-v1", f"{NAME}-v2"]
    assert int(arg(vllm["argv"], "--max-loras")) >= 2


def test_serve_help_and_unknown_targets(capsys):
    assert main(["serve", "--help"]) == 0
    assert "A/B" in capsys.readouterr().out
    assert main(["serve", "./no/such/file.gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
def test_vllm_serves_adapters_on_a_gpu(adapter_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    pytest.importorskip("vllm", reason="needs the vllm extra")
    from tuneship.artifacts import read_record
    from tuneship.serve.launch import Supervisor, free_port, vllm_base_arg

    base = read_record(adapter_dir)["base_model"]
    spec = vllm_spec(
        vllm_base_arg(base), base, [LoraModule("demo-v1", str(adapter_dir), base, 16)], port=free_port()
    )
    with Supervisor([spec], ready_timeout=600):
        import openai

        client = openai.OpenAI(base_url=spec.url + "/v1", api_key="none")
        assert (
            client.completions.create(model="demo-v1", prompt="Hello", max_tokens=4).choices[0].text
            is not None
        )
