"""Scores of a trained reward model on a split, and its held-out report (accuracy, ranking, calibration)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prefalign.evaluation.metrics import (
    calibration_bins,
    expected_calibration_error,
    pairwise_accuracy,
    ranking_metrics,
)
from prefalign.models.reward_model import RewardScorer
from prefalign.training.reward_data import RewardData, SplitTensors

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class PairScores:
    """Scores of every example of a split, in the split's order (for the Bayes rate, plots, audits).

    Attributes:
        score_w, score_l: ``(P,)`` scores of each pair's preferred (first, for ties) and other image.
        label: ``(P,)`` 1.0 or 0.5, as in the data.
        ranking_scores: ``(R, K)`` scores of the ranked images (padding entries are meaningless), or None.
    """

    score_w: np.ndarray
    score_l: np.ndarray
    label: np.ndarray
    ranking_scores: np.ndarray | None = None


@torch.no_grad()
def all_embeddings(scorer: RewardScorer, tensors: SplitTensors, batch_size: int) -> tuple[Tensor, Tensor]:
    """Unit text embeddings of every prompt and image embeddings of every image of the split."""
    n_prompts, n_images = len(tensors.input_ids), len(tensors.pixels)
    text = [
        scorer.text_embeddings(tensors.input_ids[i : i + batch_size], tensors.attention_mask[i : i + batch_size])
        for i in range(0, n_prompts, batch_size)
    ]
    image = [
        scorer.image_embeddings(scorer.normalise(tensors.pixels[i : i + batch_size]))
        for i in range(0, n_images, batch_size)
    ]
    return torch.cat(text), torch.cat(image)


@torch.no_grad()
def score_tensors(scorer: RewardScorer, tensors: SplitTensors, batch_size: int = 512) -> PairScores:
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        text, image = all_embeddings(scorer, tensors, batch_size)
        scale = scorer.logit_scale()
    finally:
        scorer.model.train(was_training)
    data, device = tensors.data, text.device

    def rows(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array).to(device)

    prompt_text = text[rows(data.pair_prompt)]
    score_w = scale * (prompt_text * image[rows(data.pair_w)]).sum(-1)
    score_l = scale * (prompt_text * image[rows(data.pair_l)]).sum(-1)
    ranking_scores = None
    if data.ranking_prompt is not None and data.ranking_images is not None:
        ranked = image[rows(data.ranking_images)]
        ranking_scores = (scale * (text[rows(data.ranking_prompt)][:, None, :] * ranked).sum(-1)).cpu().numpy()
    return PairScores(score_w.cpu().numpy(), score_l.cpu().numpy(), data.pair_label.copy(), ranking_scores)


def score_split(scorer: RewardScorer, data: RewardData, *, batch_size: int = 512) -> PairScores:
    """Scores of every pair (and ranking) of ``data``; each prompt and image is encoded once."""
    return score_tensors(scorer, SplitTensors.of(scorer, data), batch_size)


def metrics_of(scores: PairScores, data: RewardData) -> dict[str, Any]:
    accuracy, n_pairs, n_ties = pairwise_accuracy(scores.score_w, scores.score_l, scores.label)
    kendall_tau = top1 = None
    if scores.ranking_scores is not None and data.ranking_mask is not None:
        kendall_tau, top1 = ranking_metrics(scores.ranking_scores, data.ranking_mask)
    table = calibration_bins(scores.score_w, scores.score_l, scores.label)
    return {
        "pairwise_accuracy": accuracy,
        "n_pairs": n_pairs,
        "n_ties_excluded": n_ties,
        "kendall_tau": kendall_tau,
        "top1_accuracy": top1,
        "n_rankings": data.n_rankings,
        "expected_calibration_error": expected_calibration_error(table),
        "calibration": table,
    }


def evaluate_reward(scorer: RewardScorer, data: RewardData) -> tuple[dict[str, Any], PairScores]:
    """Held-out metrics of a reward model (the keys of ``reports/reward.json``) and the per-pair scores.

    Build ``data`` with ``keep_ties=True`` so that ``n_ties_excluded`` counts the split's ties.

    Returns:
        ``(metrics, scores)``. ``metrics``: pairwise_accuracy (ties excluded; None without decided pairs),
        n_pairs (decided pairs scored), n_ties_excluded, kendall_tau and top1_accuracy (None without
        rankings), n_rankings, expected_calibration_error and calibration (``calibration_bins``).
        ``scores``: ``PairScores`` in ``data``'s pair order, e.g. for the oracle's Bayes rate.
    """
    scores = score_split(scorer, data)
    return metrics_of(scores, data), scores
