"""Simulated Bradley-Terry annotators, the Bayes accuracy and annotator pseudonymisation."""

import hashlib
import hmac
import logging

import numpy as np
import pytest

from prefalign.data import pseudonym
from prefalign.data.pseudonym import pseudonymise
from prefalign.world.annotators import (
    annotate,
    bayes_accuracy,
    expected_accuracy,
    preference_probability,
)


def test_preference_probability_values_and_symmetry():
    p = preference_probability(np.array([0.5, 0.9, 0.1]), np.array([0.5, 0.1, 0.9]), 0.1)
    np.testing.assert_allclose(p, [0.5, 1 / (1 + np.exp(-8.0)), 1 / (1 + np.exp(8.0))])
    np.testing.assert_allclose(preference_probability(0.3, 0.7, 0.2) + preference_probability(0.7, 0.3, 0.2), 1.0)


def test_preference_probability_is_stable_for_huge_gaps():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = preference_probability(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1e-6)
    np.testing.assert_array_equal(p, [1.0, 0.0])
    with pytest.raises(ValueError):
        preference_probability(0.1, 0.2, 0.0)


def test_annotate_matches_the_probability_and_is_reproducible():
    n = 20000
    a, b = np.full(n, 0.6), np.full(n, 0.5)
    votes = annotate(a, b, tau=0.1, rng=np.random.default_rng(0))
    assert votes.dtype == bool and votes.shape == (n,)
    assert abs(votes.mean() - preference_probability(0.6, 0.5, 0.1)) < 0.015
    np.testing.assert_array_equal(votes, annotate(a, b, tau=0.1, rng=np.random.default_rng(0)))


def test_bayes_accuracy_is_the_expected_oracle_accuracy():
    rng = np.random.default_rng(1)
    s1, s2 = rng.random(5000), rng.random(5000)
    first_wins = annotate(s1, s2, tau=0.08, rng=rng)
    w, lo = np.where(first_wins, s1, s2), np.where(first_wins, s2, s1)
    bayes = bayes_accuracy(w, lo, tau=0.08)
    oracle_hits = np.mean(w > lo)  # the oracle picks the higher score
    assert abs(bayes - oracle_hits) < 0.02
    assert bayes_accuracy([0.5], [0.5], tau=0.1) == pytest.approx(0.5)
    assert bayes_accuracy([0.2], [0.9], tau=0.1) == bayes_accuracy([0.9], [0.2], tau=0.1)  # label-free
    assert np.isnan(bayes_accuracy([], [], tau=0.1))


def test_expected_accuracy_by_hand():
    s1 = 1 / (1 + np.exp(-1.0))  # sigma(0.08 / 0.08) = 0.7311
    # Pairs: model agrees (gap 0.08), disagrees (gap 0.08), ties its scores, oracle sees no difference.
    oracle_w, oracle_l = [0.58, 0.58, 0.58, 0.5], [0.5, 0.5, 0.5, 0.5]
    model_w, model_l = [2.0, -1.0, 0.3, 5.0], [1.0, 1.0, 0.3, 0.0]
    assert expected_accuracy(model_w[:1], model_l[:1], oracle_w[:1], oracle_l[:1], tau=0.08) == pytest.approx(s1)
    assert expected_accuracy(model_w[1:2], model_l[1:2], oracle_w[1:2], oracle_l[1:2], tau=0.08) == pytest.approx(
        1 - s1
    )
    assert expected_accuracy(model_w, model_l, oracle_w, oracle_l, tau=0.08) == pytest.approx(
        (s1 + (1 - s1) + 0.5 + 0.5) / 4
    )
    assert np.isnan(expected_accuracy([], [], [], [], tau=0.08))


def test_expected_accuracy_of_the_oracle_is_the_bayes_rate_and_matches_fresh_labels():
    rng = np.random.default_rng(2)
    oracle_w, oracle_l = rng.random(4000), rng.random(4000)
    assert expected_accuracy(oracle_w, oracle_l, oracle_w, oracle_l, tau=0.08) == pytest.approx(
        bayes_accuracy(oracle_w, oracle_l, tau=0.08)
    )
    # A noisy model, scored against many fresh annotator draws: the mean hit rate converges to it.
    model_w, model_l = oracle_w + rng.normal(0, 0.1, 4000), oracle_l + rng.normal(0, 0.1, 4000)
    hits = [np.mean((model_w > model_l) == annotate(oracle_w, oracle_l, tau=0.08, rng=rng)) for _ in range(50)]
    expected = expected_accuracy(model_w, model_l, oracle_w, oracle_l, tau=0.08)
    assert bayes_accuracy(oracle_w, oracle_l, tau=0.08) - expected > 0.02  # the noise costs accuracy
    assert abs(np.mean(hits) - expected) < 0.003


def test_pseudonymise_is_a_keyed_hmac():
    expected = hmac.new(b"k1", b"alice", hashlib.sha256).hexdigest()[:16]
    assert pseudonymise("alice", key="k1") == expected
    assert len(expected) == 16 and pseudonymise("alice", key="k2") != expected
    assert pseudonymise("bob", key="k1") != expected


def test_pseudonymise_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFALIGN_ANNOTATOR_KEY", "env-secret-123")
    assert pseudonymise("alice") == pseudonymise("alice", key="env-secret-123")


def test_missing_key_falls_back_to_the_demo_key_and_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("PREFALIGN_ANNOTATOR_KEY", raising=False)
    monkeypatch.setattr(pseudonym, "_warned_demo_key", False)
    with caplog.at_level(logging.WARNING, logger="prefalign.data.pseudonym"):
        first = pseudonymise("alice")
        pseudonymise("bob")
    assert first == pseudonymise("alice", key=pseudonym.DEMO_KEY)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert pseudonym.DEMO_KEY not in caplog.text  # the key itself is never logged
