"""Win rates and means with prompt-cluster bootstrap intervals."""

import json
import time

import numpy as np
import pytest

from prefalign.evaluation.metrics import beats, mean_ci, win_rate

IDS = np.repeat(np.arange(16), 4)  # 16 prompts x 4 seeds


def test_all_wins():
    result = win_rate(np.ones(64), np.zeros(64), IDS, n_boot=200)
    assert result == {"rate": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 64}
    assert beats(result)
    json.dumps(result)  # JSON-serialisable as reports/eval.json needs


def test_ties_count_half():
    a = np.r_[np.ones(32), np.full(32, 0.5)]
    b = np.r_[np.zeros(32), np.full(32, 0.5 + 1e-12)]  # within tie_tol
    assert win_rate(a, b, IDS, n_boot=200)["rate"] == pytest.approx(0.75)
    half_ties = win_rate(
        np.r_[np.ones(16), np.zeros(16), np.full(32, 0.3)],
        np.r_[np.zeros(16), np.ones(16), np.full(32, 0.3)],
        IDS,
        n_boot=200,
    )
    assert half_ties["rate"] == pytest.approx(0.5)
    assert not beats(half_ties)
    all_ties = win_rate(np.full(64, 0.4), np.full(64, 0.4), IDS, n_boot=200)
    assert all_ties["rate"] == all_ties["ci_low"] == all_ties["ci_high"] == 0.5


def test_interval_contains_the_rate_and_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.random(64), rng.random(64)
    first = win_rate(a, b, IDS, n_boot=500, seed=7)
    assert first["ci_low"] <= first["rate"] <= first["ci_high"]
    assert win_rate(a, b, IDS, n_boot=500, seed=7) == first
    assert win_rate(a, b, IDS, n_boot=500, seed=8) != first


def test_cluster_bootstrap_is_wider_than_iid_on_correlated_data():
    rng = np.random.default_rng(1)
    prompt_effect = rng.random(32) < 0.6  # each prompt: A wins on every seed or loses on every seed
    ids = np.repeat(np.arange(32), 8)
    a = np.repeat(prompt_effect, 8).astype(float)
    b = np.full_like(a, 0.5)
    clustered = win_rate(a, b, ids, n_boot=2000)
    iid = win_rate(a, b, np.arange(len(a)), n_boot=2000)
    assert clustered["rate"] == iid["rate"]
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    assert width(clustered) > 2 * width(iid)


def test_prompt_ids_can_be_strings_and_any_order():
    rng = np.random.default_rng(2)
    a, b = rng.random(64), rng.random(64)
    perm = rng.permutation(64)
    names = np.array([f"prompt {i}" for i in IDS])
    by_int = win_rate(a, b, IDS, n_boot=300)
    by_name = win_rate(a[perm], b[perm], names[perm], n_boot=300)
    assert by_int["rate"] == by_name["rate"]
    assert abs(by_int["ci_low"] - by_name["ci_low"]) < 0.06


def test_mean_ci():
    values = np.r_[np.zeros(32), np.ones(32)]
    result = mean_ci(values, IDS, n_boot=500, seed=0)
    assert set(result) == {"mean", "ci_low", "ci_high"}
    assert result["mean"] == 0.5
    assert result["ci_low"] < 0.5 < result["ci_high"]
    constant = mean_ci(np.full(64, 0.25), IDS, n_boot=100)
    assert constant == {"mean": 0.25, "ci_low": 0.25, "ci_high": 0.25}


def test_input_validation():
    with pytest.raises(ValueError):
        win_rate(np.ones(3), np.ones(4), np.arange(3))
    with pytest.raises(ValueError):
        win_rate(np.ones(3), np.ones(3), np.arange(4))
    with pytest.raises(ValueError):
        win_rate([], [], [])
    with pytest.raises(ValueError):
        mean_ci(np.ones(3), np.arange(3), n_boot=0)


def test_bootstrap_is_vectorised_and_fast():
    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(64), 8)
    a, b = rng.random(512), rng.random(512)
    win_rate(a, b, ids, n_boot=10)
    start = time.perf_counter()
    win_rate(a, b, ids, n_boot=2000)
    assert time.perf_counter() - start < 0.5
