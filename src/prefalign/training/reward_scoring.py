"""Scores of a trained reward model on a split, and its held-out report (accuracy, ranking, calibration);
scores of candidate images read from disk batch by batch (expert selection).

Under ``accelerate launch`` a split can be scored ``across_processes``: each process encodes a contiguous
block of the images and the embeddings are gathered, so every process ends with the same scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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
from prefalign.training.reward_data import DecodedImages, ImageChunk, RewardData, SplitTensors, image_batches

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


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _block(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of process ``rank``: contiguous blocks of ceil(n / world) rows."""
    size = -(-n_rows // world)
    return min(rank * size, n_rows), min((rank + 1) * size, n_rows)


def _gather_blocks(local: Tensor, n_rows: int, world: int) -> Tensor:
    """Every process's ``_block`` of rows, concatenated in rank order (blocks padded to one size to gather)."""
    import torch.distributed as dist

    size = -(-n_rows // world)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat(blocks)[:n_rows]


@torch.no_grad()
def all_embeddings(
    scorer: RewardScorer, tensors: SplitTensors, batch_size: int, *, across_processes: bool = False
) -> tuple[Tensor, Tensor]:
    """Unit text embeddings of every prompt and image embeddings of every image of the split.

    ``across_processes``: this process encodes only its block of the images, and the blocks are gathered.
    """
    device = scorer.device
    n_prompts, n_images = len(tensors.input_ids), len(tensors.images)
    with scorer.autocast():
        text = [
            scorer.text_embeddings(*tensors.prompt_rows(torch.arange(i, min(i + batch_size, n_prompts)), device))
            for i in range(0, n_prompts, batch_size)
        ]
        rank, world = _process_group() if across_processes else (0, 1)
        start, stop = _block(n_images, rank, world)
        chunks = [ImageChunk(np.arange(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
        image = [
            scorer.image_embeddings(scorer.normalise(pixels))
            for _, pixels in image_batches(tensors.images, chunks, device, tensors.num_workers)
        ]
    width = int(scorer.model.config.projection_dim)
    local = torch.cat(image) if image else torch.zeros((0, width), device=device)
    return torch.cat(text), _gather_blocks(local, n_images, world) if world > 1 else local


@torch.no_grad()
def score_tensors(
    scorer: RewardScorer, tensors: SplitTensors, batch_size: int = 512, *, across_processes: bool = False
) -> PairScores:
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        text, image = all_embeddings(scorer, tensors, batch_size, across_processes=across_processes)
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


def score_split(
    scorer: RewardScorer,
    data: RewardData,
    *,
    batch_size: int = 512,
    num_workers: int = 0,
    across_processes: bool = False,
) -> PairScores:
    """Scores of every pair (and ranking) of ``data``; each prompt and image is encoded once.

    Images decoded up front go to the device whole; otherwise ``num_workers`` DataLoader processes decode
    them batch by batch. ``across_processes``: see ``all_embeddings``.
    """
    tensors = SplitTensors.of(scorer, data, num_workers=num_workers)
    return score_tensors(scorer, tensors, batch_size, across_processes=across_processes)


@torch.no_grad()
def score_images(
    scorer: RewardScorer,
    prompts: Sequence[str],
    shas: Sequence[str],
    load_image: Callable[[str], np.ndarray],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
) -> np.ndarray:
    """Scores ``(N,)`` float32 of ``prompts[i]`` with image ``shas[i]``, images decoded batch by batch.

    Each batch of ``batch_size`` images is decoded from disk straight to the scorer's size (DataLoader
    workers, pinned memory) and scored on the scorer's device, so memory holds one batch, never the whole
    candidate pool. Same batches as ``RewardScorer.score``: on images of the scorer's size the scores agree
    bit for bit.

    Raises:
        ValueError: prompts and images differ in number, or an image cannot be decoded (naming it).
    """
    if len(prompts) != len(shas):
        raise ValueError(f"{len(prompts)} prompts but {len(shas)} images")
    images = DecodedImages(shas, load_image, scorer.preprocessing)
    chunks = [ImageChunk(np.arange(i, min(i + batch_size, len(shas)))) for i in range(0, len(shas), batch_size)]
    was_training = scorer.model.training
    scorer.model.eval()
    scores = []
    try:
        for chunk, pixels in image_batches(images, chunks, scorer.device, num_workers):
            input_ids, attention_mask = scorer.tokenize([prompts[i] for i in chunk.keys])
            with scorer.autocast():
                batch_scores = scorer.forward_scores(input_ids, attention_mask, scorer.normalise(pixels))
            scores.append(batch_scores.float().cpu())
    finally:
        scorer.model.train(was_training)
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


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


def evaluate_reward(
    scorer: RewardScorer, data: RewardData, *, num_workers: int = 0, across_processes: bool = False
) -> tuple[dict[str, Any], PairScores]:
    """Held-out metrics of a reward model (the keys of ``reports/reward.json``) and the per-pair scores.

    Build ``data`` with ``keep_ties=True`` so that ``n_ties_excluded`` counts the split's ties.
    ``num_workers``, ``across_processes``: see ``score_split``.

    Returns:
        ``(metrics, scores)``. ``metrics``: pairwise_accuracy (ties excluded; None without decided pairs),
        n_pairs (decided pairs scored), n_ties_excluded, kendall_tau and top1_accuracy (None without
        rankings), n_rankings, expected_calibration_error and calibration (``calibration_bins``).
        ``scores``: ``PairScores`` in ``data``'s pair order, e.g. for the oracle's Bayes rate.
    """
    scores = score_split(scorer, data, num_workers=num_workers, across_processes=across_processes)
    return metrics_of(scores, data), scores
