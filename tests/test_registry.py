"""The adapter registry: versions, lineage, refs, gate, routes, rollback, attachments, diff, verify, push.

Adapters here are small but valid PEFT directories (adapter_config.json, a safetensors file, a tuneship.json
record): the registry only copies and hashes files, so no model is needed.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tuneship import registry as reg
from tuneship.artifacts import sha256_dir, sha256_file
from tuneship.cli import main
from tuneship.errors import TuneshipError

DATA_A = "a" * 64
DATA_B = "b" * 64
BASE = {
    "spec": "bundled:smollm2-135m-instruct",
    "id": "bundled:smollm2-135m-instruct",
    "revision": "x==1",
    "sha256": "c" * 64,
}


def make_adapter(path: Path, seed: int = 0, r: int = 8, record: bool = True, **fields) -> Path:
    """A small real PEFT adapter directory, as `tuneship train` writes it."""
    path.mkdir(parents=True)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((r, 64)).astype(
            np.float32
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((64, r)).astype(
            np.float32
        ),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    if record:
        rec = {
            "kind": "adapter",
            "schema": 1,
            "base_model": BASE,
            "dataset_sha256": DATA_A,
            "chat_template_sha256": "e" * 64,
            "stop_tokens": ["<|im_end|>"],
            "system_prompt": "Extract JSON.",
            "config": {"lr": 1e-3, "max_steps": 20, "lora": {"r": r, "alpha": 2 * r}},
            "lora": {"r": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
            "metrics": {
                "final_loss": 0.5 + seed / 100,
                "tokens_per_s": 1000.0,
                "peak_mem_gib": 1.5,
                "wall_s": 60.0,
            },
            "git_commit": "abc123",
        }
        rec.update(fields)
        (path / "tuneship.json").write_text(json.dumps(rec))
    return path


def write_eval(path: Path, em: float, data_sha: str = DATA_A, **more) -> Path:
    metrics = {
        "exact_match": {"value": em, "ci": [em - 0.05, em + 0.05]},
        "valid_json": {"value": 1.0, "ci": [1, 1]},
    }
    metrics.update(more)
    path.write_text(json.dumps({"metrics": metrics, "n": 40, "data_sha256": data_sha}))
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *args: str):
    rc, out, err = cli(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [make_adapter(tmp_path / f"run{i}", seed=i) for i in range(4)]


def add(root: Path, adapter: Path, name: str = "demo", **kw) -> str:
    return reg.add_version(adapter, name, root=root, **kw)


# ---------------------------------------------------------------- versions and lineage


def test_add_records_the_whole_lineage(root, adapters, capsys):
    out = cli_json(capsys, "registry", "add", str(adapters[0]), "--name", "demo", "--root", str(root))
    assert out["ref"] == "demo@v1" and out["version"] == "v1"
    out2 = cli_json(
        capsys, "registry", "add", str(adapters[1]), "--name", "demo", "--root", str(root),
        "--parent", "demo@v1", "--notes", "more data", "--tag", "exp1", "--tag", "cpu",
    )  # fmt: skip
    assert out2["ref"] == "demo@v2"

    info = cli_json(capsys, "registry", "show", "demo@v2", "--root", str(root))
    assert info["sha256"] == sha256_dir(adapters[1])
    assert info["base_model"] == BASE
    assert info["lora"] == {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert info["dataset_sha256"] == DATA_A
    assert info["chat_template_sha256"] == "e" * 64 and info["stop_tokens"] == ["<|im_end|>"]
    assert info["config"]["max_steps"] == 20 and info["git_commit"] == "abc123"
    assert info["metrics"]["final_loss"] == pytest.approx(0.51)
    assert info["parent"] == "demo@v1" and info["notes"] == "more data" and info["tags"] == ["exp1", "cpu"]
    assert info["created_by"] and info["created_at"].startswith("20")
    assert info["evals"] == [] and info["merged"] is None and info["gguf"] == {}
    # the copy lives inside the registry, read-only, identical to the original
    copy = Path(info["adapter_path"])
    assert copy.is_relative_to(root) and sha256_dir(copy) == sha256_dir(adapters[1])
    assert not os.stat(copy / "adapter_model.safetensors").st_mode & stat.S_IWUSR


def test_list_json_shape_and_aliases(root, adapters, capsys):
    assert cli_json(capsys, "registry", "list", "--root", str(root)) == []
    add(root, adapters[0])
    add(root, adapters[1])
    add(root, adapters[2], name="other")
    reg.promote("demo@v1", to="stable", root=root)
    rows = cli_json(capsys, "registry", "list", "--root", str(root))
    assert [set(r) for r in rows] == [{"name", "version", "created_at", "aliases"}] * 3
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("demo", "v1", ["stable"]),
        ("demo", "v2", ["latest"]),
        ("other", "v1", ["latest"]),
    ]
    assert [
        r["version"] for r in cli_json(capsys, "registry", "list", "--name", "other", "--root", str(root))
    ] == ["v1"]


def test_plain_peft_adapter_without_record(root, tmp_path):
    plain = make_adapter(tmp_path / "plain", record=False, r=4)
    ref = add(root, plain, name="plain")
    info = reg.show(ref, root=root)
    assert info["lora"] == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    assert info["base_model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["dataset_sha256"] is None and info["metrics"] == {}


def test_add_refuses_what_is_not_an_adapter(root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "registry", "add", str(tmp_path / "empty"), "--name", "x", "--root", str(root))
    assert rc == 2 and "adapter_config.json" in err and len(err.strip().splitlines()) == 1
    merged = make_adapter(tmp_path / "merged", kind="merged")
    with pytest.raises(TuneshipError, match="'merged' artifact"):
        add(root, merged)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(TuneshipError, match="pickle"):
        add(root, pickled)
    assert reg.list_versions(root=root) == []


def test_parent_inferred_from_record(root, adapters, tmp_path):
    add(root, adapters[0])
    child = make_adapter(
        tmp_path / "child", seed=9, parent={"path": str(adapters[0]), "sha256": sha256_dir(adapters[0])}
    )
    assert reg.show(add(root, child), root=root)["parent"] == "demo@v1"
    grandchild = make_adapter(tmp_path / "gc", seed=10, registry_ref="demo@latest")
    assert reg.show(add(root, grandchild), root=root)["parent"] == "demo@v2"


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a/b", "..", ".hidden", "x" * 65, "a..b", "-x", "na\nme"])
def test_bad_names_get_one_line_errors(root, adapters, capsys, bad):
    rc, out, err = cli(capsys, "registry", "add", str(adapters[0]), "--name", bad, "--root", str(root))
    assert rc == 2 and out == ""
    assert err.startswith("error: bad name") and len(err.strip().splitlines()) == 1
    assert not (root / "versions").exists() or not any((root / "versions").iterdir())


def test_refs_resolve_and_unknown_refs_fail(root, adapters, capsys):
    add(root, adapters[0])
    add(root, adapters[1])
    v1 = reg.resolve_ref("demo@v1", root=root)
    assert v1 == (root / "versions/demo/v1/adapter").resolve()
    assert reg.resolve_ref("demo@latest", root=root) == (root / "versions/demo/v2/adapter").resolve()
    reg.promote("demo@v1", to="stable", root=root)
    reg.promote("demo@v2", to="canary", root=root)
    assert reg.resolve_ref("demo@stable", root=root) == v1
    assert reg.resolve_ref("demo@canary", root=root).parent.name == "v2"
    for ref, msg in [
        ("demo@v7", "unknown ref demo@v7: demo has v1..v2"),
        ("nope@v1", "no versions named 'nope'"),
        ("demo@v0", "bad ref"),
        ("demo", "bad ref"),
        ("demo@beta", "bad ref"),
    ]:
        rc, out, err = cli(capsys, "registry", "show", ref, "--root", str(root))
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (ref, err)
    with pytest.raises(TuneshipError, match="no registry at"):
        reg.resolve_ref("demo@v1", root=root.parent / "elsewhere")


def test_root_from_env_then_default(tmp_path, adapters, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNESHIP_REGISTRY", raising=False)
    assert reg.registry_root(None) == Path("registry")
    add(None, adapters[0])
    assert (tmp_path / "registry" / "registry.db").is_file()
    monkeypatch.setenv("TUNESHIP_REGISTRY", str(tmp_path / "envreg"))
    assert cli_json(capsys, "registry", "add", str(adapters[1]), "--name", "e")["ref"] == "e@v1"
    assert (tmp_path / "envreg" / "registry.db").is_file()
    assert reg.registry_root(str(tmp_path / "x")) == tmp_path / "x"


def test_read_verifies_hash(root, adapters):
    ref = add(root, adapters[0])
    path = reg.resolve_ref(ref, root=root)
    target = path / "adapter_model.safetensors"
    os.chmod(target, 0o644)
    target.write_bytes(target.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(TuneshipError, match="failed its integrity check"):
        reg.resolve_ref(ref, root=root)
    with pytest.raises(TuneshipError, match="failed its integrity check"):
        reg.promote(ref, to="stable", root=root)
    assert reg.get_route("demo", root=root)["stable"] is None


# ---------------------------------------------------------------- the promotion gate


def test_promotion_gate(root, adapters, tmp_path, capsys):
    for a in adapters:
        add(root, a)
    r = str(root)
    # the first stable has nothing to regress from
    assert cli_json(capsys, "registry", "promote", "demo@v1", "--to", "stable", "--root", r)["gate"] is None
    cli_json(
        capsys, "registry", "attach-eval", "demo@v1", str(write_eval(tmp_path / "e1.json", 0.80)), "--root", r
    )
    cli_json(
        capsys, "registry", "attach-eval", "demo@v2", str(write_eval(tmp_path / "e2.json", 0.78)), "--root", r
    )
    cli_json(
        capsys, "registry", "attach-eval", "demo@v3", str(write_eval(tmp_path / "e3.json", 0.70)), "--root", r
    )

    # no eval at all (v4): a clear error, route unchanged
    rc, _, err = cli(capsys, "registry", "promote", "demo@v4", "--to", "stable", "--root", r)
    assert rc == 2 and "demo@v4 has no eval" in err and len(err.strip().splitlines()) == 1
    # eval on another data set only: no comparison possible
    reg.attach_result(
        "demo@v4", "eval", json.loads(write_eval(tmp_path / "e4.json", 0.99, DATA_B).read_text()), root=root
    )
    rc, _, err = cli(capsys, "registry", "promote", "demo@v4", "--to", "stable", "--root", r)
    assert rc == 2 and "no eval on the same eval set" in err
    # v3 regresses 12.5% > 5%
    rc, _, err = cli(capsys, "registry", "promote", "demo@v3", "--to", "stable", "--root", r)
    assert rc == 2 and "regresses exact_match from 0.8 to 0.7" in err
    # the threshold is configurable: 2.5% is too much at 1%, fine at the default 5%
    rc, _, err = cli(
        capsys, "registry", "promote", "demo@v2", "--to", "stable", "--threshold", "1%", "--root", r
    )
    assert rc == 2 and "threshold 1.0%" in err
    assert reg.get_route("demo", root=root)["stable"] == "v1"
    out = cli_json(capsys, "registry", "promote", "demo@v2", "--to", "stable", "--root", r)
    assert out["gate"]["passed"] and out["gate"]["relative_change"] == pytest.approx(-0.025)
    assert out["gate"]["data_sha256"] == DATA_A and out["route"]["stable"] == "v2"
    # the metric is configurable: v3 equals v2 on valid_json
    reg.attach_result(
        "demo@v2", "eval", json.loads(write_eval(tmp_path / "e5.json", 0.78).read_text()), root=root
    )
    assert reg.promote("demo@v3", to="stable", metric="valid_json", root=root)["gate"]["passed"]
    # --force needs a reason, and is recorded
    rc, _, err = cli(capsys, "registry", "promote", "demo@v4", "--to", "stable", "--force", "--root", r)
    assert rc == 2 and "--force needs --reason" in err
    out = cli_json(
        capsys,
        "registry",
        "promote",
        "demo@v4",
        "--to",
        "stable",
        "--force",
        "--reason",
        "hotfix",
        "--root",
        r,
    )
    assert out["route"]["stable"] == "v4" and out["gate"]["forced"] is True
    last = reg.history("demo", root=root, details=True)[-1]
    assert last["action"] == "force-promote" and last["reason"] == "hotfix" and last["from"] == "v3"


def test_gate_lower_is_better_and_env(root, adapters, tmp_path, monkeypatch):
    add(root, adapters[0])
    add(root, adapters[1])
    reg.promote("demo@v1", to="stable", root=root)
    loss = lambda v: {"value": v}  # noqa: E731
    reg.attach_result("demo@v1", "eval", {"metrics": {"loss": loss(1.0)}, "data_sha256": DATA_A}, root=root)
    reg.attach_result("demo@v2", "eval", {"metrics": {"loss": loss(1.04)}, "data_sha256": DATA_A}, root=root)
    monkeypatch.setenv("TUNESHIP_GATE_METRIC", "loss")
    monkeypatch.setenv("TUNESHIP_GATE_THRESHOLD", "0.03")
    with pytest.raises(TuneshipError, match="regresses loss"):
        reg.promote("demo@v2", to="stable", root=root)
    monkeypatch.setenv("TUNESHIP_GATE_THRESHOLD", "5%")
    assert reg.promote("demo@v2", to="stable", root=root)["gate"]["lower_is_better"] is True


# ---------------------------------------------------------------- routes, weights, rollback, history


def route(capsys, root: Path, name: str = "demo") -> dict:
    return cli_json(capsys, "registry", "route", name, "--root", str(root))


def test_route_weights_and_canary_rollback(root, adapters, capsys):
    for a in adapters[:3]:
        add(root, a)
    r = str(root)
    assert route(capsys, root) == {"name": "demo", "stable": None, "canary": None, "weights": {}}
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--root", r)
    assert rc == 2 and "nothing to roll back" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(capsys, "registry", "promote", "demo@v2", "--to", "canary", "--root", r)
    assert rc == 2 and "no stable version" in err
    reg.promote("demo@v1", to="stable", root=root)
    cli_json(capsys, "registry", "promote", "demo@v2", "--to", "canary", "--weight", "10", "--root", r)
    assert route(capsys, root) == {
        "name": "demo",
        "stable": "v1",
        "canary": "v2",
        "weights": {"v1": 90, "v2": 10},
    }

    out = cli_json(capsys, "registry", "set-weights", "demo", "v1=70", "v2=30", "--root", r)
    assert out == {"name": "demo", "stable": "v1", "canary": "v2", "weights": {"v1": 70, "v2": 30}}
    for args, msg in [
        (["v1=70", "v2=20"], "sum to 90"),
        (["v1=50", "v3=50"], "v3 is not on the route"),
        (["v1=abc"], "bad weight"),
        (["v1=101"], "bad weight"),
    ]:
        rc, _, err = cli(capsys, "registry", "set-weights", "demo", *args, "--root", r)
        assert rc == 2 and msg in err, (args, err)
    assert route(capsys, root)["weights"] == {"v1": 70, "v2": 30}
    assert reg.set_weights("demo", ["stable=100"], root=root)["weights"] == {"v1": 100, "v2": 0}
    reg.set_weights("demo", {"v1": 80, "v2": 20}, root=root)

    # a canary carries traffic: rollback ends it, stable untouched
    out = cli_json(capsys, "registry", "rollback", "demo", "--reason", "canary errors", "--root", r)
    assert out["mode"] == "canary" and out["from"] == "v2" and out["to"] == "v1"
    assert route(capsys, root) == {"name": "demo", "stable": "v1", "canary": None, "weights": {"v1": 100}}
    # repeating it: no canary, no previous stable -> clear error, route intact
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--root", r)
    assert rc == 2 and "nothing to roll back" in err
    assert route(capsys, root) == {"name": "demo", "stable": "v1", "canary": None, "weights": {"v1": 100}}

    hist = cli_json(capsys, "registry", "history", "demo", "--root", r)
    assert all(set(h) == {"at", "action", "from", "to", "reason"} for h in hist)
    assert [h["action"] for h in hist] == ["add"] * 3 + ["promote", "canary"] + ["set-weights"] * 3 + [
        "rollback"
    ]
    assert hist[-1] == {**hist[-1], "action": "rollback", "from": "v2", "to": "v1", "reason": "canary errors"}
    assert hist[5]["from"] == "v1=90,v2=10" and hist[5]["to"] == "v1=70,v2=30"


def test_rollback_previous_stable_and_to(root, adapters, capsys):
    for a in adapters[:3]:
        add(root, a)
    r = str(root)
    for v in ("v1", "v2", "v3"):
        reg.promote(f"demo@{v}", to="stable", root=root, force=True, reason="test")
    # no canary: move back along the promotions, one per rollback
    assert cli_json(capsys, "registry", "rollback", "demo", "--root", r)["mode"] == "previous-stable"
    assert route(capsys, root)["stable"] == "v2"
    assert reg.rollback("demo", root=root)["to"] == "v1"
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--root", r)
    assert rc == 2 and "no previous stable" in err
    assert route(capsys, root) == {"name": "demo", "stable": "v1", "canary": None, "weights": {"v1": 100}}

    # --to REF makes REF the stable and takes any canary off the route
    reg.promote("demo@v2", to="canary", weight=25, root=root)
    out = cli_json(
        capsys, "registry", "rollback", "demo", "--to", "demo@v3", "--reason", "known good", "--root", r
    )
    assert out["mode"] == "to" and out["route"] == {
        "name": "demo",
        "stable": "v3",
        "canary": None,
        "weights": {"v3": 100},
    }
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--to", "v3", "--root", r)
    assert rc == 2 and "already the stable" in err
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--to", "other@v1", "--root", r)
    assert rc == 2 and "version of other" in err
    rc, _, err = cli(capsys, "registry", "rollback", "demo", "--to", "v9", "--root", r)
    assert rc == 2 and "unknown ref demo@v9" in err
    # and a plain rollback undoes the --to
    assert reg.rollback("demo", root=root)["to"] == "v1"
    rc, _, err = cli(capsys, "registry", "rollback", "nope", "--root", r)
    assert rc == 2 and "unknown name 'nope'" in err


def test_python_rollback_records_evidence(root, adapters):
    add(root, adapters[0])
    add(root, adapters[1])
    reg.promote("demo@v1", to="stable", root=root)
    reg.promote("demo@v2", to="canary", weight=50, root=root)
    evidence = {"canary_error_rate": 0.2, "stable_error_rate": 0.01, "window_s": 60}
    with pytest.raises(TuneshipError, match="canary of demo is now v2, not v1"):
        reg.rollback("demo", evidence=evidence, only_canary=True, canary_version="v1", root=root)
    out = reg.rollback(
        "demo", reason="auto: error rate", evidence=evidence, actor="router", only_canary=True, canary_version="v2",
        root=root,
    )  # fmt: skip
    assert out["mode"] == "canary"
    # a watcher repeating its alarm never walks the stable back
    with pytest.raises(TuneshipError, match="no canary carrying traffic"):
        reg.rollback(
            "demo", reason="auto again", evidence=evidence, actor="router", only_canary=True, root=root
        )
    last = reg.history("demo", root=root, details=True)[-1]
    assert last["evidence"] == evidence and last["by"] == "router" and last["reason"] == "auto: error rate"
    assert reg.get_route("demo", root=root)["stable"] == "v1"


def test_promoting_the_canary_to_stable_ends_the_experiment(root, adapters):
    add(root, adapters[0])
    add(root, adapters[1])
    add(root, adapters[2])
    reg.promote("demo@v1", to="stable", root=root)
    reg.promote("demo@v2", to="canary", weight=20, root=root)
    reg.promote("demo@v2", to="stable", root=root, force=True, reason="canary looked good")
    assert reg.get_route("demo", root=root) == {
        "name": "demo",
        "stable": "v2",
        "canary": None,
        "weights": {"v2": 100},
    }
    # another canary keeps its share when a third version becomes stable
    reg.promote("demo@v3", to="canary", weight=30, root=root)
    reg.promote("demo@v1", to="stable", root=root, force=True, reason="x")
    assert reg.get_route("demo", root=root)["weights"] == {"v1": 70, "v3": 30}
    with pytest.raises(TuneshipError, match="already the stable"):
        reg.promote("demo@v1", to="canary", root=root)
    with pytest.raises(TuneshipError, match="--weight applies to --to canary"):
        reg.promote("demo@v2", to="stable", weight=5, root=root)


# ---------------------------------------------------------------- results flowing in, export-route


def test_attach_results_and_export_route(root, adapters, tmp_path, capsys):
    add(root, adapters[0])
    add(root, adapters[1])
    reg.promote("demo@v1", to="stable", root=root)
    reg.promote("demo@v2", to="canary", weight=10, root=root)
    rev0 = reg.route_revision("demo", root=root)

    # a merged checkpoint made from the registry copy: its record's parent path lies inside the registry
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"merged weights")
    (merged / "tuneship.json").write_text(
        json.dumps({"kind": "merged", "parent": {"path": str(reg.resolve_ref("demo@v2", root=root))}})
    )
    assert (
        reg.attach_result(str(merged), "merged", {"max_abs_logit_diff": 1e-3}, artifact=merged, root=root)
        == "demo@v2"
    )
    # a GGUF export made from that merged dir (outside the registry): the parent chain leads to v2
    export = tmp_path / "export"
    export.mkdir()
    (export / "demo-Q4_K_M.gguf").write_bytes(b"GGUF q4")
    (export / "Modelfile").write_text("FROM ./demo-Q4_K_M.gguf\n")
    (export / "tuneship.json").write_text(json.dumps({"kind": "gguf", "parent": {"path": str(merged)}}))
    gguf_data = {"quant": "Q4_K_M", "kl": 0.07, "top1": 0.84}
    assert reg.attach_result(str(export), "gguf", gguf_data, artifact=export, root=root) == "demo@v2"
    # a bare GGUF file, from a ref source
    f16 = tmp_path / "demo-f16.gguf"
    f16.write_bytes(b"GGUF f16")
    assert (
        reg.attach_result(
            "demo@canary", "gguf", {"quant": "F16", "kl": 9e-6, "top1": 1.0}, artifact=f16, root=root
        )
        == "demo@v2"
    )
    # the original training dir (outside the registry) is found by its hash
    eval_data = json.loads(write_eval(tmp_path / "e.json", 0.9).read_text())
    assert reg.attach_result(str(adapters[0]), "eval", eval_data, root=root) == "demo@v1"
    # unrelated inputs: None, nothing recorded
    before = len(reg.history("demo", root=root))
    assert reg.attach_result(str(tmp_path / "e.json"), "eval", eval_data, root=root) is None
    assert reg.attach_result("bundled:smollm2-135m-instruct", "eval", eval_data, root=root) is None
    assert reg.attach_result(str(adapters[0]), "eval", eval_data, root=tmp_path / "noreg") is None
    assert not (tmp_path / "noreg").exists()
    assert len(reg.history("demo", root=root)) == before

    rev1 = reg.route_revision("demo", root=root)
    assert rev1 > rev0
    data = cli_json(capsys, "registry", "export-route", "demo", "--root", str(root))
    assert set(data) == {"name", "stable", "canary", "weights", "versions", "revision"}
    assert data["revision"] == rev1 and data["weights"] == {"v1": 90, "v2": 10}
    v2 = data["versions"]["v2"]
    assert v2["ref"] == "demo@v2" and v2["lora_r"] == 8 and v2["base_model"] == BASE
    assert Path(v2["adapter_path"]) == reg.resolve_ref("demo@v2", root=root)
    assert set(v2["gguf"]) == {"Q4_K_M", "F16"}
    q4 = Path(v2["gguf"]["Q4_K_M"])
    assert (
        q4.is_relative_to(root.resolve()) and q4.read_bytes() == b"GGUF q4" and q4.name == "demo-Q4_K_M.gguf"
    )
    assert Path(v2["gguf"]["F16"]).read_bytes() == b"GGUF f16"
    assert (Path(v2["merged_path"]) / "model.safetensors").read_bytes() == b"merged weights"
    assert data["versions"]["v1"]["gguf"] == {} and data["versions"]["v1"]["merged_path"] is None

    # one GGUF per quant type: a new Q4_K_M replaces the old one on the route; the old file is kept intact
    (export / "demo-Q4_K_M.gguf").write_bytes(b"GGUF q4 again")
    reg.attach_result(str(export), "gguf", {**gguf_data, "kl": 0.06}, artifact=export, root=root)
    again = reg.export_route("demo", root=root)
    assert Path(again["versions"]["v2"]["gguf"]["Q4_K_M"]).read_bytes() == b"GGUF q4 again"
    assert again["revision"] > rev1 and q4.read_bytes() == b"GGUF q4"
    info = reg.show("demo@v2", root=root)
    assert info["gguf"]["Q4_K_M"]["data"]["kl"] == 0.06 and info["gguf"]["Q4_K_M"]["sha256"]
    assert info["merged"]["sha256"] == sha256_dir(merged)
    assert reg.show("demo@v1", root=root)["evals"][0]["data"]["data_sha256"] == DATA_A
    # the export written to a file for manifests
    cli(
        capsys, "registry", "export-route", "demo", "--out", str(tmp_path / "route.json"), "--root", str(root)
    )
    assert json.loads((tmp_path / "route.json").read_text())["revision"] == again["revision"]
    # re-attaching identical content reuses its folder; the same bytes under another name get their own
    f16_path = reg.show("demo@v2", root=root)["gguf"]["F16"]["path"]
    reg.attach_result("demo@v2", "gguf", {"quant": "F16"}, artifact=f16, root=root)
    assert reg.show("demo@v2", root=root)["gguf"]["F16"]["path"] == f16_path
    renamed = tmp_path / "renamed-f16.gguf"
    renamed.write_bytes(b"GGUF f16")
    reg.attach_result("demo@v2", "gguf", {"quant": "F16"}, artifact=renamed, root=root)
    assert (
        Path(reg.export_route("demo", root=root)["versions"]["v2"]["gguf"]["F16"]).name == "renamed-f16.gguf"
    )
    assert Path(f16_path).read_bytes() == b"GGUF f16"
    assert reg.verify(root=root)["ok"]
    with pytest.raises(TuneshipError, match="quant type"):
        reg.attach_result("demo@v1", "gguf", {"kl": 1}, artifact=f16, root=root)
    with pytest.raises(TuneshipError, match="unknown result kind"):
        reg.attach_result("demo@v1", "onnx", {}, root=root)


def test_route_revision_changes_with_the_route(root, adapters):
    add(root, adapters[0])
    add(root, adapters[1])
    seen = [reg.route_revision("demo", root=root)]
    reg.promote("demo@v1", to="stable", root=root)
    seen.append(reg.route_revision("demo", root=root))
    reg.promote("demo@v2", to="canary", root=root)
    seen.append(reg.route_revision("demo", root=root))
    reg.set_weights("demo", ["v1=50", "v2=50"], root=root)
    seen.append(reg.route_revision("demo", root=root))
    reg.rollback("demo", root=root)
    seen.append(reg.route_revision("demo", root=root))
    assert len(set(seen)) == len(seen)
    add(root, adapters[2])  # a new version is not on the route
    assert reg.route_revision("demo", root=root) == seen[-1]
    with pytest.raises(TuneshipError, match="unknown name"):
        reg.route_revision("nope", root=root)


def test_attach_eval_cli_errors(root, adapters, tmp_path, capsys):
    add(root, adapters[0])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nometrics.json").write_text(json.dumps({"n": 3}))
    for path, msg in [
        ("missing.json", "does not exist"),
        ("bad.json", "not valid JSON"),
        ("nometrics.json", "no 'metrics'"),
    ]:
        rc, _, err = cli(
            capsys, "registry", "attach-eval", "demo@v1", str(tmp_path / path), "--root", str(root)
        )
        assert rc == 2 and msg in err, err
    rc, _, err = cli(
        capsys,
        "registry",
        "attach-eval",
        "demo@v5",
        str(write_eval(tmp_path / "e.json", 1)),
        "--root",
        str(root),
    )
    assert rc == 2 and "unknown ref demo@v5" in err


# ---------------------------------------------------------------- diff, verify, push


def test_diff(root, tmp_path, capsys):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(
        tmp_path / "b", seed=2, r=16, dataset_sha256=DATA_B,
        config={"lr": 5e-4, "max_steps": 20, "lora": {"r": 16, "alpha": 32}},
    )  # fmt: skip
    add(root, a)
    add(root, b)
    reg.attach_result(
        "demo@v1", "eval", json.loads(write_eval(tmp_path / "e1.json", 0.8).read_text()), root=root
    )
    reg.attach_result(
        "demo@v2", "eval", json.loads(write_eval(tmp_path / "e2.json", 0.9).read_text()), root=root
    )
    d = cli_json(capsys, "registry", "diff", "demo@v1", "demo@latest", "--root", str(root))
    assert d["a"] == "demo@v1" and d["b"] == "demo@v2"
    assert d["data"] == {"a": DATA_A, "b": DATA_B, "changed": True}
    assert d["config"]["lr"] == {"a": 1e-3, "b": 5e-4} and d["config"]["lora.r"] == {"a": 8, "b": 16}
    assert "max_steps" not in d["config"]
    assert d["lora"]["r"] == {"a": 8, "b": 16}
    assert d["metrics"]["train"]["final_loss"]["delta"] == pytest.approx(0.01)
    assert d["metrics"]["eval"]["exact_match"]["delta"] == pytest.approx(0.1)
    rc, out, _ = cli(capsys, "registry", "diff", "demo@v1", "demo@v2", "--root", str(root))
    assert rc == 0 and "config.lr" in out and "eval.exact_match: 0.8 -> 0.9 (+0.1)" in out


def test_verify_reports_changed_artifacts(root, adapters, tmp_path, capsys):
    add(root, adapters[0])
    add(root, adapters[1])
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    reg.attach_result("demo@v2", "gguf", {"quant": "Q8_0"}, artifact=g, root=root)
    ok = cli_json(capsys, "registry", "verify", "--root", str(root))
    assert ok == {"ok": True, "checked": 3, "problems": []}

    weights = reg.resolve_ref("demo@v1", root=root) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    gguf = Path(reg.show("demo@v2", root=root)["gguf"]["Q8_0"]["path"])
    os.chmod(gguf, 0o644)
    gguf.write_bytes(b"GGUF tampered")
    (root / "versions/demo/v2/adapter/extra.txt").write_text("sneaked in")

    rc, out, err = cli(capsys, "registry", "verify", "--json", "--root", str(root))
    report = json.loads(out)
    assert rc == 2 and report["ok"] is False and "verify found 3 problem(s)" in err
    problems = {(p["ref"], p["artifact"]): p["problem"] for p in report["problems"]}
    assert "adapter_model.safetensors changed after registration" in problems[("demo@v1", "adapter")]
    assert "m.gguf changed after registration" in problems[("demo@v2", "gguf:Q8_0")]
    assert "extra.txt was added after registration" in problems[("demo@v2", "adapter")]
    rc, out, _ = cli(capsys, "registry", "verify", "--name", "other", "--root", str(root))
    assert rc == 0 and "0 artifacts intact" in out


def test_push_dry_run(root, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    add(root, adapters[0])
    reg.attach_result(
        "demo@v1", "eval", json.loads(write_eval(tmp_path / "e.json", 0.875).read_text()), root=root
    )
    rc, out, err = cli(
        capsys,
        "registry",
        "push",
        "demo@v1",
        "--repo-id",
        "me/demo-adapter",
        "--dry-run",
        "--json",
        "--root",
        str(root),
    )
    assert rc == 0, err
    assert "hf_SECRET" not in out + err
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["tag"] == "v1" and plan["repo_id"] == "me/demo-adapter"
    assert [f["path_in_repo"] for f in plan["files"]] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tuneship.json",
        "README.md",
    ]
    sizes = {f["path_in_repo"]: f["size"] for f in plan["files"]}
    assert sizes["adapter_model.safetensors"] == (adapters[0] / "adapter_model.safetensors").stat().st_size
    card = plan["model_card"]
    assert card.startswith("---\n") and "library_name: peft" in card
    for needle in (
        "demo@v1",
        DATA_A,
        "abc123",
        "final_loss: 0.5",
        "exact_match: 0.875",
        sha256_dir(adapters[0]),
    ):
        assert needle in card, needle
    # the operations are huggingface_hub's own objects
    from huggingface_hub import CommitOperationAdd

    from tuneship.registry.hub import plan_push

    _, ops = plan_push("demo@v1", "me/demo-adapter", root=root)
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert ops[-1].path_in_repo == "README.md"
    rc, _, err = cli(
        capsys, "registry", "push", "demo@v1", "--repo-id", "../evil", "--dry-run", "--root", str(root)
    )
    assert rc == 2 and "bad --repo-id" in err


def test_real_push_failure_is_one_line_without_the_token(root, adapters):
    add(root, adapters[0])
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_TOKEN": "hf_SECRETtoken123",
        "HF_HUB_OFFLINE": "0",
    }
    tuneship = Path(sys.executable).with_name("tuneship")
    args = [str(tuneship), "registry", "push", "demo@v1", "--repo-id", "me/demo", "--root", str(root)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.startswith("error: push of demo@v1 to me/demo failed")
        and len(proc.stderr.splitlines()) == 1
    )
    assert "hf_SECRET" not in proc.stderr
    assert [h["action"] for h in reg.history("demo", root=root)] == ["add"]


def test_every_command_has_help_and_json(capsys):
    names = [
        "add", "list", "show", "diff", "attach-eval", "promote", "route", "set-weights",
        "rollback", "history", "verify", "export-route", "push",
    ]  # fmt: skip
    for name in names:
        rc, out, _ = cli(capsys, "registry", name, "--help")
        assert rc == 0 and "--json" in out and "--root" in out, name


def test_files_hash_like_artifacts_sha256_dir(tmp_path):
    from tuneship.registry.store import copy_hashed

    src = tmp_path / "src"
    (src / "a-b").mkdir(parents=True)
    (src / "a").mkdir()
    (src / "a-b" / "x").write_text("1")
    (src / "a" / "x").write_text("2")
    (src / "tuneship.json").write_text("{}")
    sha, files = copy_hashed(src, tmp_path / "dst")
    assert sha == sha256_dir(src) == sha256_dir(tmp_path / "dst")
    assert files["tuneship.json"] == sha256_file(src / "tuneship.json")


def test_model_specs_accept_registry_refs(root, tmp_path):
    from tuneship.models import resolve

    add(root, make_adapter(tmp_path / "plain", record=False), name="plain")
    spec = resolve("plain@latest", registry_root=str(root))
    assert spec.kind == "adapter" and spec.registry_ref == "plain@latest"
    assert Path(spec.path) == reg.resolve_ref("plain@v1", root=root)
    assert spec.base.path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # a stage that ran on the resolved path attaches its result to the same version
    assert reg.attach_result(spec.path, "eval", {"metrics": {"exact_match": 1.0}}, root=root) == "plain@v1"
    with pytest.raises(TuneshipError, match="unknown ref plain@v2"):
        resolve("plain@v2", registry_root=str(root))
