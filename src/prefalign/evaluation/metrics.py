"""Evaluation metrics: paired win rates and means with prompt-cluster bootstrap intervals.

Images of one prompt are correlated (a model that cannot draw "purple" loses on every seed of a purple
prompt), so the intervals resample prompts, not images: an i.i.d. bootstrap over images would be too
narrow and "A beats B" (``ci_low > 0.5``) would be claimed too often.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

CALIBRATION_BINS = 10


def _cluster_sums(values: np.ndarray, prompt_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt sums of ``values`` and per-prompt image counts."""
    ids = np.asarray(prompt_ids)
    if ids.shape != values.shape:
        raise ValueError(f"prompt_ids has shape {ids.shape}, values have shape {values.shape}")
    _, cluster = np.unique(ids, return_inverse=True)
    cluster = cluster.ravel()
    return np.bincount(cluster, weights=values), np.bincount(cluster).astype(np.float64)


def _bootstrap_interval(sums: np.ndarray, counts: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the pooled mean when whole prompts are drawn with replacement.

    All resamples are drawn at once as an (n_boot, n_prompts) index matrix; each resample's mean is
    its drawn prompts' summed values over their summed image counts.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    # Chunks keep the index matrix near 4M entries whatever the number of prompts.
    chunk = max(1, 4_000_000 // len(sums))
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        draws = rng.integers(0, len(sums), size=(min(chunk, n_boot - start), len(sums)))
        means[start : start + len(draws)] = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mean_ci(values: ArrayLike, prompt_ids: ArrayLike, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean over images with a 95% prompt-cluster bootstrap interval.

    Args:
        values: One value per image.
        prompt_ids: The prompt of each image (any hashable labels); images of a prompt are resampled together.
        n_boot: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        {"mean", "ci_low", "ci_high"} as floats.

    Raises:
        ValueError: For no values, mismatched shapes or ``n_boot < 1``.
    """
    vals = np.asarray(values, np.float64).ravel()
    if vals.size == 0:
        raise ValueError("mean_ci needs at least one value")
    sums, counts = _cluster_sums(vals, np.asarray(prompt_ids).ravel())
    low, high = _bootstrap_interval(sums, counts, n_boot=n_boot, seed=seed)
    return {"mean": float(vals.mean()), "ci_low": low, "ci_high": high}


def win_rate(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    prompt_ids: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    tie_tol: float = 1e-9,
) -> dict[str, Any]:
    """How often model A beats model B image by image on the same (prompt, seed) pairs.

    Args:
        scores_a: Score of A's image i (oracle or reward).
        scores_b: Score of B's image i, made from the same prompt and initial noise.
        prompt_ids: Prompt of image i; the interval resamples prompts (cluster bootstrap).
        n_boot: Bootstrap resamples.
        seed: Seed of the resampling.
        tie_tol: Score gaps up to this count as ties (half a win).

    Returns:
        {"rate", "ci_low", "ci_high", "n"}: the win rate, its 95% interval and the number of images.

    Raises:
        ValueError: For no images or mismatched shapes.
    """
    a = np.asarray(scores_a, np.float64).ravel()
    b = np.asarray(scores_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"scores_a has {a.size} values, scores_b has {b.size}")
    if a.size == 0:
        raise ValueError("win_rate needs at least one image")
    diff = a - b
    outcome = np.where(np.abs(diff) <= tie_tol, 0.5, (diff > 0).astype(np.float64))
    sums, counts = _cluster_sums(outcome, np.asarray(prompt_ids).ravel())
    low, high = _bootstrap_interval(sums, counts, n_boot=n_boot, seed=seed)
    return {"rate": float(outcome.mean()), "ci_low": low, "ci_high": high, "n": int(a.size)}


def beats(result: dict[str, Any]) -> bool:
    """Whether a win-rate result says A beats B: the whole 95% interval lies above one half.

    Args:
        result: A :func:`win_rate` result.

    Returns:
        ``result["ci_low"] > 0.5``.
    """
    return bool(result["ci_low"] > 0.5)


def pairwise_accuracy(score_w: np.ndarray, score_l: np.ndarray, label: np.ndarray) -> tuple[float | None, int, int]:
    """Share of decided pairs (label 1.0) ranked right, equal scores counting half; ties are excluded.

    Returns:
        ``(accuracy or None when no pair is decided, decided pairs, ties excluded)``.
    """
    decided = label == 1.0  # ties (0.5) are excluded
    n_pairs, n_ties = int(decided.sum()), int((~decided).sum())
    if n_pairs == 0:
        return None, 0, n_ties
    gap = score_w[decided] - score_l[decided]
    return float(((gap > 0) + 0.5 * (gap == 0)).mean()), n_pairs, n_ties


# ------------------------------------------------------------------------------------------- metrics
def ranking_metrics(ranking_scores: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
    """Mean Kendall τ (τ-a, score ties count 0) between scores and the true order, and top-1 accuracy."""
    taus, top1 = [], []
    for scores, valid in zip(ranking_scores, mask, strict=True):
        scores = scores[valid]
        if len(scores) < 2:
            continue
        # True order is the column order (best first): a pair i < j is concordant when s_i > s_j.
        upper = np.triu(np.sign(scores[:, None] - scores[None, :]), k=1)
        taus.append(upper.sum() / (len(scores) * (len(scores) - 1) / 2))
        top1.append(float(np.argmax(scores) == 0))
    if not taus:
        return None, None
    return float(np.mean(taus)), float(np.mean(top1))


def calibration_bins(
    score_w: np.ndarray, score_l: np.ndarray, label: np.ndarray, *, bins: int = CALIBRATION_BINS
) -> dict[str, list[float | None] | list[int]]:
    """Reliability table of the predicted P(w ≻ l) = σ(s_w − s_l) on decided pairs.

    Each pair enters in both orientations, (σ(Δ), won) and (σ(−Δ), lost), so the table is symmetric about
    ½ and does not depend on which image the data happens to list first. Empty bins give None.

    Returns:
        ``{"pred": mean prediction per bin, "observed": share of wins per bin, "count": points per bin}``.
    """
    decided = label == 1.0  # decided pairs only; ties (0.5) have no side to be right about
    gap = (score_w[decided] - score_l[decided]).astype(np.float64)
    predicted = np.concatenate([1 / (1 + np.exp(-gap)), 1 / (1 + np.exp(gap))])
    outcome = np.concatenate([np.ones_like(gap), np.zeros_like(gap)])
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    table: dict[str, list[Any]] = {"pred": [], "observed": [], "count": []}
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        table["count"].append(count)
        table["pred"].append(float(predicted[members].mean()) if count else None)
        table["observed"].append(float(outcome[members].mean()) if count else None)
    return table


def expected_calibration_error(table: dict[str, list[Any]]) -> float | None:
    """Count-weighted mean |pred − observed| over the non-empty bins of ``calibration_bins``."""
    total = sum(table["count"])
    if total == 0:
        return None
    return float(
        sum(c * abs(p - o) for p, o, c in zip(table["pred"], table["observed"], table["count"], strict=True) if c)
        / total
    )
