"""`tuneship data prepare`: exact counts on a crafted messy file, every input format, bad rows, splits, audit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tuneship.artifacts import read_record
from tuneship.cli import main
from tuneship.data.clean import answer_key, find_near_duplicates, shingle_hashes, signatures
from tuneship.data.hashing import dataset_dir_sha256, dataset_sha256
from tuneship.data.pii import luhn_ok, scan
from tuneship.data.prepare import BadRowsError, PrepareConfig, prepare_data
from tuneship.data.split import assign_splits
from tuneship.errors import TuneshipError

DATA = Path(__file__).parent / "data"
MESSY = DATA / "messy.jsonl"
SPLIT_NAMES = ("train", "valid", "test")


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{"model": "none", **kw})


def read_splits(out: Path) -> dict[str, list[dict]]:
    return {
        s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in SPLIT_NAMES
    }


def splits_of(rows_by_split: dict[str, list[dict]], pred) -> set[str]:
    return {s for s, rows in rows_by_split.items() for r in rows if pred(r)}


@pytest.fixture(scope="session")
def tok_model(request) -> str:
    """Path of the bundled SmolLM2 HF checkpoint (the lead's shared fixture when present)."""
    try:
        return str(request.getfixturevalue("bundled_dir"))
    except pytest.FixtureLookupError:
        from tuneship.models import DEFAULT_MODEL, resolve

        return resolve(DEFAULT_MODEL).path


@pytest.fixture(scope="module")
def messy_out(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("prep") / "messy"
    summary = prepare_data([MESSY], out, cfg(on_error="skip", group_key="user", pii=True))
    return summary, out


def test_messy_file_exact_counts(messy_out):
    summary, out = messy_out
    assert summary["rows_in"] == 46
    assert summary["removed"] == {"invalid": 7, "exact_duplicate": 3, "near_duplicate": 2, "contradiction": 3}
    assert summary["rows_out"] == 31 == summary["rows_in"] - sum(summary["removed"].values())
    assert sum(summary["splits"].values()) == 31
    rows = read_splits(out)
    assert {s: len(r) for s, r in rows.items()} == summary["splits"]
    ids = sorted(r["meta"]["id"] for rs in rows.values() for r in rs)
    assert ids == list(range(1, 21)) + [38, 39, 47] + list(range(100, 108))


def test_messy_file_no_group_leaks(messy_out):
    _, out = messy_out
    rows = read_splits(out)
    assert len(splits_of(rows, lambda r: r["meta"]["user"] == "g-leak")) == 1
    per_user: dict[str, set] = {}
    for s, rs in rows.items():
        for r in rs:
            per_user.setdefault(r["meta"]["user"], set()).add(s)
    assert all(len(v) == 1 for v in per_user.values())
    audit = json.loads((out / "audit.json").read_text())
    assert audit["groups"] == {"key": "user", "groups": 24, "rows_without_key": 0, "leaking_groups": 0}


def test_the_group_would_leak_without_group_key(tmp_path):
    def g_leak_splits(seed: int, key: str | None) -> int:
        out = tmp_path / f"o{seed}{key}"
        prepare_data([MESSY], out, cfg(on_error="skip", seed=seed, group_key=key))
        return len(splits_of(read_splits(out), lambda r: r["meta"]["user"] == "g-leak"))

    assert any(g_leak_splits(seed, None) > 1 for seed in range(5))
    assert all(g_leak_splits(seed, "user") == 1 for seed in range(5))


def test_messy_audit_lists_every_finding(messy_out):
    _, out = messy_out
    audit = json.loads((out / "audit.json").read_text())
    lines = [r["line"] for r in audit["invalid"]]
    assert lines == [40, 41, 42, 43, 44, 45, 46]
    reasons = {r["line"]: r["reason"] for r in audit["invalid"]}
    assert "not valid JSON" in reasons[40]
    assert "missing field 'output'" in reasons[41]
    assert "'prompt' is empty" in reasons[42]
    assert "first non-system message must be from the user" in reasons[43]
    assert "must be a string" in reasons[44]
    assert "unrecognized row shape" in reasons[45]
    assert "must be a JSON object" in reasons[46]
    assert all(r["file"] == str(MESSY) for r in audit["invalid"])

    ex = audit["exact_duplicates"]
    assert [(e["where"].rsplit(":", 1)[1], e["duplicate_of"].rsplit(":", 1)[1]) for e in ex["examples"]] == [
        ("30", "1"),
        ("31", "2"),
        ("32", "3"),
    ]
    flagged = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in audit["flagged_rows"]}
    assert flagged == {
        "30": "exact_duplicate",
        "31": "exact_duplicate",
        "32": "exact_duplicate",
        "33": "near_duplicate",
        "34": "near_duplicate",
        "35": "contradiction",
        "36": "contradiction",
        "37": "contradiction",
    }
    nd = audit["near_duplicates"]
    assert nd["clusters"] == 1 and nd["count"] == 2
    cluster = nd["examples"][0]
    assert cluster["kept"]["where"].endswith(":4")
    jac = {m["where"].rsplit(":", 1)[1]: m["jaccard"] for m in cluster["members"]}
    assert jac["33"] == 1.0 and 0.9 <= jac["34"] < 0.95
    co = audit["contradictions"]
    assert co["groups"] == 1 and co["count"] == 3
    assert {a["answer"] for a in co["examples"][0]["answers"]} == {"Blue.", "Green.", "It is blue."}
    assert audit["pii"]["counts"] == {"email": 1, "phone": 1, "card": 1}
    assert audit["pii"]["rows"] == 1
    assert "ana.silva@example.com" not in json.dumps(audit["pii"])  # masked
    fields = audit["json_fields"]
    assert fields["json_objects"] == 2 and fields["fields"]["name"] == {
        "present": 2,
        "presence": 1.0,
        "distinct": 1,
    }
    md = (out / "audit.md").read_text()
    for needle in (
        "messy.jsonl:40",
        "messy.jsonl:46",
        "Exact duplicates (3)",
        "Contradictions (3 rows",
        "PII scan",
    ):
        assert needle in md


def test_output_schema_record_and_sha(messy_out):
    summary, out = messy_out
    rows = read_splits(out)
    for r in (r for rs in rows.values() for r in rs):
        assert set(r) == {"messages", "meta"}
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
        assert "user" in r["meta"] and "id" in r["meta"]
    files = [out / f"{s}.jsonl" for s in SPLIT_NAMES]
    rec = read_record(out, kind="dataset")
    assert rec["sha256"] == summary["sha256"] == dataset_sha256(files) == dataset_dir_sha256(out)
    assert rec["splits"] == summary["splits"] and rec["removed"] == summary["removed"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.jsonl", "valid.jsonl", "test.jsonl", "audit.json", "audit.md", "tuneship.json"]
    )  # no lengths.png with --model none


def test_dataset_sha256_changes_when_a_row_moves_between_splits(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n{"x": 2}\n')
    b.write_text('{"x": 3}\n')
    before = dataset_sha256([a, b])
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 2}\n{"x": 3}\n')
    assert dataset_sha256([a, b]) != before
    with pytest.raises(TuneshipError, match="does not exist"):
        dataset_sha256([a, tmp_path / "missing.jsonl"])


def test_keep_flagged_keeps_clusters_in_one_split(tmp_path):
    s = prepare_data([MESSY], tmp_path / "o", cfg(on_error="skip", keep_flagged=True))
    assert s["rows_out"] == 39
    assert s["removed"] == {"invalid": 7, "exact_duplicate": 0, "near_duplicate": 0, "contradiction": 0}
    assert s["flagged"] == {"exact_duplicate": 3, "near_duplicate": 2, "contradiction": 3}
    rows = read_splits(tmp_path / "o")
    flagged = [r for rs in rows.values() for r in rs if "tuneship_flags" in r["meta"]]
    assert (
        sorted(r["meta"]["tuneship_flags"][0] for r in flagged)
        == ["contradiction"] * 3 + ["exact_duplicate"] * 3 + ["near_duplicate"] * 2
    )
    # each duplicate stays with its original, each cluster and contradiction group in one split
    for ids in ([1], [2], [3], [4, 33, 34], [35, 36, 37]):
        assert len(splits_of(rows, lambda r, ids=ids: r["meta"].get("id") in ids)) == 1


def test_near_dup_threshold_is_respected(tmp_path):
    s = prepare_data([MESSY], tmp_path / "o", cfg(on_error="skip", near_dup_threshold=0.95))
    assert s["removed"]["near_duplicate"] == 1  # the 0.924 row stays, the 1.0 row goes
    s = prepare_data([MESSY], tmp_path / "c", cfg(on_error="skip", shingle="char"))
    assert s["removed"]["near_duplicate"] == 2


def test_on_error_fail_reports_every_bad_row_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(BadRowsError) as e:
        prepare_data([MESSY], out, cfg())
    assert [b["line"] for b in e.value.bad_rows] == [40, 41, 42, 43, 44, 45, 46]
    assert "7 bad row(s)" in str(e.value) and "--on-error skip" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_json_summary_shape(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(
        ["data", "prepare", str(MESSY), "--out", str(out), "--model", "none", "--on-error", "skip", "--json"]
    )
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert {"rows_in", "rows_out", "removed", "splits", "sha256"} <= set(s)
    assert set(s["removed"]) == {"invalid", "exact_duplicate", "near_duplicate", "contradiction"}
    assert set(s["splits"]) == {"train", "valid", "test"}
    assert s["sha256"] == read_record(out)["sha256"]
    # an existing output is refused without --overwrite, replaced with it
    assert (
        main(["data", "prepare", str(MESSY), "--out", str(out), "--model", "none", "--on-error", "skip"]) == 2
    )
    assert "already exists" in capsys.readouterr().err
    rc = main(
        [
            "data",
            "prepare",
            str(MESSY),
            "--out",
            str(out),
            "--model",
            "none",
            "--on-error",
            "skip",
            "--overwrite",
            "--splits",
            "0.5,0.25,0.25",
            "--seed",
            "3",
        ]
    )
    assert rc == 0 and read_record(out)["config"]["splits"] == [0.5, 0.25, 0.25]


def test_cli_fail_lists_bad_rows_on_stderr(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["data", "prepare", str(MESSY), "--out", str(out), "--model", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    for line in range(40, 47):
        assert f"messy.jsonl:{line}:" in err
    assert err.strip().splitlines()[-1].startswith("error: 7 bad row(s)")


def test_cli_help_and_bad_settings(capsys):
    assert main(["data", "prepare", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in (
        "--near-dup-threshold",
        "--group-key",
        "--on-error",
        "--keep-flagged",
        "--pii",
        "--max-length",
    ):
        assert opt in text
    assert (
        main(["data", "prepare", str(MESSY), "--out", "/tmp/never-written", "--splits", "0.5,0.5,0.5"]) == 2
    )
    assert "splits" in capsys.readouterr().err
    assert main(["data", "prepare", str(MESSY), "--out", "/tmp/never-written", "--on-error", "maybe"]) != 0
    assert not Path("/tmp/never-written").exists()


def test_json_array_and_csv_inputs_report_lines(tmp_path):
    with pytest.raises(BadRowsError) as e:
        prepare_data([DATA / "rows.json", DATA / "rows.csv"], tmp_path / "o", cfg())
    where = [b["where"].rsplit("/", 1)[1] for b in e.value.bad_rows]
    assert where == ["rows.json:11", "rows.csv:5", "rows.csv:6"]
    s = prepare_data(
        [DATA / "rows.json", DATA / "rows.csv"], tmp_path / "o", cfg(on_error="skip", system="Be kind.")
    )
    assert s["rows_in"] == 5 + 5 and s["rows_out"] == 7 and s["removed"]["invalid"] == 3
    rows = [r for rs in read_splits(tmp_path / "o").values() for r in rs]
    by_topic = {r["meta"]["topic"]: r for r in rows}
    assert by_topic["art"]["messages"][0] == {"role": "system", "content": "Be brief."}  # its own system kept
    assert by_topic["geo"]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert by_topic["lang"]["messages"][1]["content"] == "Translate to English.\n\nhola"
    assert json.loads(by_topic["json"]["messages"][-1]["content"]) == {
        "name": "Ana",
        "company": "Acme",
        "city": "Lisbon",
    }
    assert by_topic["misc"]["messages"][1]["content"] == "A question\nspanning two lines"
    assert by_topic["math"]["messages"][-1]["content"] == "4"


def test_parquet_and_datasets_dir_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [
        {"prompt": f"Question number {i} about tides?", "completion": f"Answer {i}.", "src": "pq"}
        for i in range(6)
    ]
    rows[2]["completion"] = None  # a null cell is a missing field
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"Hello {i}"},
                {"role": "assistant", "content": f"Hi {i}"},
            ],
            "src": "ds",
        }
        for i in range(5)
    ]
    DatasetDict({"train": Dataset.from_list(chat[:3]), "test": Dataset.from_list(chat[3:])}).save_to_disk(
        tmp_path / "ds"
    )

    with pytest.raises(BadRowsError) as e:
        prepare_data([tmp_path / "d.parquet", tmp_path / "ds"], tmp_path / "o", cfg())
    assert [(b["where"].rsplit("/", 1)[1], b.get("row")) for b in e.value.bad_rows] == [
        ("d.parquet:row 3", 3)
    ]
    assert "missing field 'completion'" in e.value.bad_rows[0]["reason"]
    s = prepare_data([tmp_path / "d.parquet", tmp_path / "ds"], tmp_path / "o", cfg(on_error="skip"))
    assert s["rows_in"] == 11 and s["rows_out"] == 10
    audit = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert [(i["kind"], i["rows"]) for i in audit["inputs"]] == [("parquet", 6), ("datasets_dir", 5)]
    srcs = sorted(r["meta"]["src"] for rs in read_splits(tmp_path / "o").values() for r in rs)
    assert srcs == ["ds"] * 5 + ["pq"] * 5


def test_unreachable_hub_id_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(TuneshipError, match="no-such-org/no-such-dataset"):
        prepare_data(["no-such-org/no-such-dataset"], tmp_path / "o", cfg())
    with pytest.raises(TuneshipError, match="does not exist"):
        prepare_data([tmp_path / "missing.jsonl"], tmp_path / "o", cfg())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TuneshipError, match="no valid rows"):
        prepare_data([tmp_path / "empty.jsonl"], tmp_path / "o", cfg())
    assert not (tmp_path / "o").exists()


def test_token_lengths_use_the_chat_template(tmp_path, tok_model):
    from tuneship.models import load_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    path = tmp_path / "t.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"input": f"{i} " + " ".join(rng.choices(words, k=5 + i)), "output": "ok"}) + "\n"
            )
    s = prepare_data(
        [path], tmp_path / "o", PrepareConfig(model=tok_model, max_length=40, system="Be brief.")
    )
    tok = load_tokenizer(tok_model)
    rows = [r for rs in read_splits(tmp_path / "o").values() for r in rs]
    lengths = sorted(
        len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
    )
    assert s["tokens"]["max"] == lengths[-1]
    assert s["tokens"]["p50"] == int(np.percentile(lengths, 50, method="lower"))
    assert s["tokens"]["over_max_length"] == sum(n > 40 for n in lengths) > 0
    png = (tmp_path / "o" / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rec = read_record(tmp_path / "o")
    assert rec["chat_template_sha256"] and rec["metrics"]["max"] == lengths[-1]
    # an adapter directory measures with its base model's tokenizer
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": tok_model, "peft_type": "LORA"})
    )
    s2 = prepare_data(
        [path], tmp_path / "o2", PrepareConfig(model=str(adapter), max_length=40, system="Be brief.")
    )
    assert s2["tokens"] == s["tokens"]
    # with sampling, percentiles come from the sample; rows that could pass max_length are still all measured
    prepare_data(
        [path],
        tmp_path / "o3",
        PrepareConfig(model=tok_model, length_sample=20, max_length=40, system="Be brief."),
    )
    tokens = json.loads((tmp_path / "o3" / "audit.json").read_text())["tokens"]
    assert tokens["sampled"] and tokens["measured"] == 20 and "sample" in tokens["note"]
    assert tokens["max"] == lengths[-1] and tokens["over_max_length"] == s["tokens"]["over_max_length"]


def test_signatures_match_datasketch():
    from datasketch import MinHash

    texts = ["the quick brown fox jumps over the lazy dog", "hi", "", "Über Straße ñ 日本語 text, again"]
    for mode in ("word", "char"):
        hashes, offsets = shingle_hashes(texts, mode, 3)
        sigs = signatures(hashes, offsets, num_perm=32, seed=5)
        for i in range(len(texts)):
            m = MinHash(num_perm=32, seed=5, hashfunc=int)
            m.update_batch(hashes[offsets[i] : offsets[i + 1]].tolist())
            assert np.array_equal(m.hashvalues, sigs[i])


def test_near_duplicates_cluster_transitively():
    base = " ".join(f"w{i}" for i in range(100))
    a = base.replace("w10", "x10")
    b = a.replace("w90", "x90")  # b is near a, and near base through a
    other = " ".join(f"v{i}" for i in range(100))
    res = find_near_duplicates([base, other, a, b], [0, 1, 2, 3], threshold=0.9)
    assert res.clusters == [[0, 2, 3]]
    assert all(0.9 <= jac <= 1 for _, jac in res.matched.values())


def test_assign_splits_exact_seeded_and_grouped():
    comps = [[i] for i in range(1000)]
    a = assign_splits(comps, (0.8, 0.1, 0.1), seed=0)
    assert [len(a[s]) for s in SPLIT_NAMES] == [800, 100, 100]
    assert a == assign_splits(comps, (0.8, 0.1, 0.1), seed=0)
    assert a != assign_splits(comps, (0.8, 0.1, 0.1), seed=1)
    groups = [list(range(i, i + 10)) for i in range(0, 1000, 10)]
    g = assign_splits(groups, (0.8, 0.1, 0.1), seed=0)
    assert [len(g[s]) for s in SPLIT_NAMES] == [800, 100, 100]
    for grp in groups:
        assert sum(set(grp) <= set(g[s]) for s in SPLIT_NAMES) == 1
    z = assign_splits(comps[:10], (1.0, 0.0, 0.0), seed=0)
    assert len(z["train"]) == 10 and z["valid"] == z["test"] == []


def test_pii_and_answer_keys():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    found = scan("mail bob@corp.io, call (030) 1234-5678, pay 5500 0000 0000 0004, on 2024-01-15")
    assert found == [("email", "bob@corp.io"), ("phone", "(030) 1234-5678"), ("card", "5500 0000 0000 0004")]
    assert scan("order 4111 1111 1111 1112 shipped on 2024-01-15, v1.2.3") == []  # not Luhn-valid; a date
    assert answer_key('{"a": 1, "b": 2}') == answer_key('{"b":2,"a":1}')
    assert answer_key("Blue.") == answer_key("  blue. ") != answer_key("Green.")


def test_unknown_model_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(TuneshipError, match="no-model"):
        prepare_data(
            [MESSY], tmp_path / "o", PrepareConfig(model=str(tmp_path / "no-model"), on_error="skip")
        )
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_files(tmp_path):
    a = prepare_data([MESSY], tmp_path / "a", cfg(on_error="skip", group_key="user"))
    b = prepare_data([MESSY], tmp_path / "b", cfg(on_error="skip", group_key="user"))
    c = prepare_data([MESSY], tmp_path / "c", cfg(on_error="skip", group_key="user", seed=1))
    assert a["sha256"] == b["sha256"] != c["sha256"]
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
