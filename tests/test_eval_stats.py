"""Metrics and statistics of the eval stage: pure numpy, seeded, fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tuneship.errors import TuneshipError
from tuneship.eval.metrics import (
    ALLOWED,
    Scores,
    check_metric_names,
    default_metrics,
    exact_match,
    field_counts,
    json_valid,
    score,
    speed_scores,
    token_f1,
)
from tuneship.eval.stats import intervals, paired

REF = json.dumps({"title": "Data Engineer", "company": "Acme Corp", "location": "Berlin", "remote": False})


def mean_scores(x: np.ndarray) -> Scores:
    return Scores(np.asarray(x, dtype=float), np.ones(len(x)))


# --- metrics ---------------------------------------------------------------------------------------------------


def test_exact_match_compares_json_as_objects_and_text_after_stripping():
    reordered = '{"remote": false, "location": "Berlin", "company": "Acme Corp", "title": "Data Engineer"}'
    assert exact_match(reordered, REF) == 1.0
    assert exact_match("```json\n" + REF + "\n```", REF) == 1.0
    assert exact_match(REF.replace("false", "true"), REF) == 0.0
    assert exact_match('{"a": 1}', '{"a": true}') == 0.0  # JSON true is not the number 1
    assert exact_match('{"a": 1.0}', '{"a": 1}') == 1.0
    assert exact_match("  Paris \n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0


def test_json_valid_and_field_counts():
    assert json_valid(REF) == 1.0
    assert json_valid("The job title is Data Engineer") == 0.0
    assert json_valid('{"title": "Data Engineer",') == 0.0
    pred = json.dumps({"title": "Data Engineer", "company": "Acme", "location": "Berlin", "salary": 3})
    tp, fp, fn, correct = field_counts(pred, REF)
    assert (tp, fp, fn) == (2, 2, 2)  # company wrong and salary extra; company wrong and remote missing
    assert correct == {"title": True, "company": False, "location": True, "remote": False}
    assert field_counts("not json", REF)[:3] == (0, 0, 4)


def test_token_f1():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("dog", "the cat") == 0.0
    assert token_f1("the cat", "the cat sat on the mat") == pytest.approx(2 * 1.0 * (2 / 6) / (1 + 2 / 6))


def test_score_json_metrics_and_per_field_accuracy():
    good = REF
    half = json.dumps({"title": "Data Engineer", "company": "Acme Corp", "location": "Paris", "remote": True})
    s = score(
        [good, half, "nonsense"], [REF, REF, REF], ["exact_match", "json_valid", "field_accuracy", "json_f1"]
    )
    assert s["exact_match"].value == pytest.approx(1 / 3)
    assert s["json_valid"].value == pytest.approx(2 / 3)
    assert s["field_accuracy"].value == pytest.approx((4 + 2 + 0) / 12)
    assert s["field_accuracy.title"].value == pytest.approx(2 / 3)
    assert s["field_accuracy.location"].value == pytest.approx(1 / 3)
    # micro F1: tp 6, fp 2 (half's wrong location and remote), fn 2 + 4
    assert s["json_f1"].value == pytest.approx(2 * 6 / (2 * 6 + 2 + 6))
    assert list(s["exact_match"].per_example()) == [1.0, 0.0, 0.0]


def test_speed_scores_pool_tokens_over_seconds():
    s = speed_scores([1.0, 3.0], [10, 50])
    assert s["latency_s"].value == pytest.approx(2.0)
    assert s["tokens_per_s"].value == pytest.approx(60 / 4)


def test_default_metrics_follow_the_references():
    assert "json_valid" in default_metrics([REF, REF, "text"])
    assert default_metrics(["Paris", "Berlin"]) == ["exact_match", "token_f1"]


def test_unknown_metric_lists_the_allowed_ones():
    with pytest.raises(TuneshipError, match="unknown metric 'bleu'; allowed: exact_match, json_valid"):
        check_metric_names(["exact_match", "bleu"])
    with pytest.raises(TuneshipError, match="unknown metric 'rouge'"):
        score(["a"], ["a"], ["rouge"])
    assert check_metric_names(list(ALLOWED)) == list(ALLOWED)


# --- bootstrap CIs ---------------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_true_value_at_about_the_nominal_rate():
    rng = np.random.default_rng(2024)
    true_p, n, sims = 0.7, 120, 200
    hits = 0
    for i in range(sims):
        x = (rng.random(n) < true_p).astype(float)
        ci = intervals({"m": mean_scores(x)}, n_boot=1000, seed=i)["m"]["ci"]
        hits += ci[0] <= true_p <= ci[1]
    coverage = hits / sims
    assert 0.90 <= coverage <= 0.98, coverage


def test_bootstrap_ci_of_a_ratio_metric_covers_too():
    # micro F1-like ratio: sum(num) / sum(den) with per-example den varying
    rng = np.random.default_rng(7)
    n, sims, hits = 150, 200, 0
    true = 0.6
    for i in range(sims):
        den = rng.integers(1, 6, size=n).astype(float)
        num = rng.binomial(den.astype(int), true).astype(float)
        ci = intervals({"r": Scores(num, den)}, n_boot=800, seed=i)["r"]["ci"]
        hits += ci[0] <= true <= ci[1]
    assert 0.90 <= hits / sims <= 0.98


def test_bootstrap_ci_narrows_as_n_grows():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (50, 200, 800):
        w = []
        for i in range(30):
            x = (rng.random(n) < 0.5).astype(float)
            lo, hi = intervals({"m": mean_scores(x)}, n_boot=800, seed=i)["m"]["ci"]
            w.append(hi - lo)
        widths[n] = float(np.mean(w))
    assert widths[50] > widths[200] > widths[800]
    assert widths[800] < widths[50] / 3  # ~1/sqrt(n): 1/4 in theory


def test_bootstrap_is_seeded_and_contains_the_point_value():
    x = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    a = intervals({"m": mean_scores(x)}, n_boot=500, seed=3)
    b = intervals({"m": mean_scores(x)}, n_boot=500, seed=3)
    assert a == b
    assert a["m"]["value"] == pytest.approx(0.7)
    assert a["m"]["ci"][0] <= 0.7 <= a["m"]["ci"][1]
    assert intervals({"m": mean_scores(x)}, n_boot=500, seed=4) != a


# --- paired comparison -----------------------------------------------------------------------------------------


def test_paired_comparison_detects_a_known_difference():
    rng = np.random.default_rng(11)
    n = 300
    u = rng.random(n)
    a = (u < 0.8).astype(float)  # candidate right 80 % of the time
    b = (u < 0.6).astype(float)  # baseline right 60 %, on a subset of the same examples
    d = paired({"m": mean_scores(a)}, {"m": mean_scores(b)}, n_boot=2000, seed=0)["m"]
    assert d["value"] == pytest.approx(a.mean() - b.mean())
    assert d["p_value"] < 0.01
    assert d["ci"][0] > 0.1 and d["ci"][0] <= 0.2 <= d["ci"][1]


def test_paired_comparison_reports_no_difference_for_identical_predictions():
    rng = np.random.default_rng(5)
    a = (rng.random(100) < 0.5).astype(float)
    d = paired({"m": mean_scores(a)}, {"m": mean_scores(a.copy())}, n_boot=1000, seed=0)["m"]
    assert d["value"] == 0.0
    assert d["p_value"] > 0.05
    assert d["ci"][0] <= 0.0 <= d["ci"][1]


def test_paired_p_value_keeps_its_false_positive_rate_under_the_null():
    # Two different models of equal skill: p < 0.05 should happen about 5 % of the time.
    rng = np.random.default_rng(99)
    rejections = 0
    sims = 200
    for i in range(sims):
        a = (rng.random(80) < 0.6).astype(float)
        b = (rng.random(80) < 0.6).astype(float)
        rejections += (
            paired({"m": mean_scores(a)}, {"m": mean_scores(b)}, n_boot=400, seed=i)["m"]["p_value"] < 0.05
        )
    assert rejections / sims <= 0.10


def test_paired_works_for_ratio_metrics():
    a = Scores(np.array([2.0, 4, 0, 6]), np.array([2.0, 4, 4, 6]))
    b = Scores(np.array([0.0, 0, 0, 0]), np.array([4.0, 6, 4, 8]))
    d = paired({"f1": a}, {"f1": b}, n_boot=500, seed=0)["f1"]
    assert d["value"] == pytest.approx(12 / 16)
    assert d["ci"][0] > 0
