"""Pair ids, prompt-hash splits, ties and de-duplication: pure and deterministic."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from prefalign.data.prepare import assign_split, dedupe_pairs, drop_ties, pair_id, split_counts

A, B = "a" * 64, "b" * 64


def _frame(ids: list[str], labels: list[float] | None = None) -> pd.DataFrame:
    labels = labels or [1.0] * len(ids)
    return pd.DataFrame({"pair_id": ids, "prompt": [f"p-{i}" for i in ids], "label": labels})


def test_pair_id_is_a_deterministic_sha256():
    first = pair_id("a red circle", A, B, tie=False)
    assert first == pair_id("a red circle", A, B, tie=False)
    assert len(first) == 64 and int(first, 16) >= 0


def test_pair_id_order_matters_for_preferences_not_for_ties():
    assert pair_id("p", A, B, tie=False) != pair_id("p", B, A, tie=False)
    assert pair_id("p", A, B, tie=True) == pair_id("p", B, A, tie=True)
    assert pair_id("p", A, B, tie=True) == pair_id("p", A, B, tie=False)  # sorted order is the canonical one


def test_pair_id_separates_fields_unambiguously():
    assert pair_id("p", "ab", "c", tie=False) != pair_id("p", "a", "bc", tie=False)
    assert pair_id("q", A, B, tie=False) != pair_id("p", A, B, tie=False)
    assert len(pair_id("猫 🐱 «chat»", A, B, tie=False)) == 64


def _bucket(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 100


def test_assign_split_follows_the_hash_buckets():
    for i in range(500):
        prompt = f"prompt {i}"
        bucket = _bucket(prompt)
        expected = "train" if bucket < 80 else "val" if bucket < 90 else "test"
        assert assign_split(prompt, train=0.8, val=0.1) == expected


def test_assign_split_proportions_and_edges():
    prompts = [f"prompt number {i}" for i in range(20_000)]
    counts = pd.Series([assign_split(p, train=0.8, val=0.1) for p in prompts]).value_counts(normalize=True)
    assert abs(counts["train"] - 0.8) < 0.02 and abs(counts["val"] - 0.1) < 0.02 and abs(counts["test"] - 0.1) < 0.02
    # 0.29 * 100 == 28.999...: bucket 28 must still be train.
    bucket_28 = next(p for p in prompts if _bucket(p) == 28)
    assert assign_split(bucket_28, train=0.29, val=0.1) == "train"
    assert {assign_split(p, train=1.0, val=0.0) for p in prompts[:200]} == {"train"}
    with pytest.raises(ValueError):
        assign_split("p", train=0.8, val=0.3)


def test_split_counts_always_has_the_three_splits():
    assert split_counts(pd.DataFrame({"split": ["train", "train", "test"]})) == {"train": 2, "val": 0, "test": 1}
    assert split_counts(pd.DataFrame({"split": ["val", "oops"]})) == {"train": 0, "val": 1, "test": 0, "oops": 1}


def test_drop_ties_counts_and_reindexes():
    kept, dropped = drop_ties(_frame(["x", "y", "z", "w"], [1.0, 0.5, 1.0, 0.5]))
    assert dropped == 2 and kept.pair_id.tolist() == ["x", "z"] and kept.index.tolist() == [0, 1]
    kept, dropped = drop_ties(_frame(["x"]))
    assert dropped == 0 and len(kept) == 1


def test_dedupe_pairs_appends_only_new_ids():
    existing = _frame(["a", "b"])
    new = _frame(["b", "c", "c", "d"])
    merged = dedupe_pairs(existing, new)
    assert merged.pair_id.tolist() == ["a", "b", "c", "d"]
    assert merged.iloc[:2].equals(existing)  # existing rows untouched, in order
    assert dedupe_pairs(merged, new).pair_id.tolist() == ["a", "b", "c", "d"]  # re-import adds nothing
    assert dedupe_pairs(pd.DataFrame(), new).pair_id.tolist() == ["b", "c", "d"]


@pytest.mark.parametrize(
    ("prompt", "mirrored"),
    [
        (
            "a small red circle at the top left on a blue background",
            "a small red circle at the top right on a blue background",
        ),
        ("Left of the leftover RIGHT tree, bright", "Right of the leftover LEFT tree, bright"),
        ("a dog at the center", "a dog at the center"),
    ],
)
def test_mirror_prompt_swaps_whole_words_left_and_right(prompt, mirrored):
    from prefalign.data.prepare import mirror_prompt

    assert mirror_prompt(prompt) == mirrored
    assert mirror_prompt(mirrored) == prompt
