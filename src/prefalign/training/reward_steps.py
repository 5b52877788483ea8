"""One step of the reward trainer and one validation: batch losses (BT on pairs, PL on rankings).

The one augmentation is the mirror (``reward.mirror_augment``): both images of a pair flipped
horizontally and "left"/"right" swapped in the prompt, which leaves every judgement unchanged (the demo
oracle is exactly mirror-symmetric) and doubles the distinct examples. Crops or colour jitter would not:
on the demo world colour and position *are* the preference signal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from prefalign.evaluation.metrics import pairwise_accuracy
from prefalign.losses.reward import bradley_terry_loss, plackett_luce_loss
from prefalign.models.reward_model import MAX_LOGIT_SCALE, RewardScorer
from prefalign.training.reward_data import (
    WIN,
    SplitTensors,
    embed_image_rows,
    embed_text_rows,
    mirror_flips,
    mirror_rows,
)
from prefalign.training.reward_scoring import score_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator

MAX_GRAD_NORM = 1.0


def pair_batch_loss(
    scorer: RewardScorer, tensors: SplitTensors, rows: np.ndarray, flip: np.ndarray | None = None
) -> tuple[Tensor, float]:
    """Weighted mean BT loss of pair ``rows`` (ties with the soft label) and the batch's accuracy.

    ``flip``: per pair, train on the mirrored pair (both images flipped, the prompt mirrored).
    """
    data, device = tensors.data, tensors.pixels.device
    prompt_rows, image_rows = mirror_rows(
        tensors, data.pair_prompt[rows], np.stack([data.pair_w[rows], data.pair_l[rows]], axis=1), flip
    )
    text = embed_text_rows(scorer, tensors, prompt_rows)
    image_w, image_l = embed_image_rows(scorer, tensors, image_rows.T)
    scale = scorer.logit_scale()
    score_w, score_l = scale * (text * image_w).sum(-1), scale * (text * image_l).sum(-1)
    label = torch.from_numpy(data.pair_label[rows]).to(device)
    weight = torch.from_numpy(data.pair_weight[rows]).to(device)
    loss = (bradley_terry_loss(score_w, score_l, label=label) * weight).mean()
    decided = label == WIN
    accuracy = float((score_w > score_l)[decided].float().mean()) if bool(decided.any()) else math.nan
    return loss, accuracy


def ranking_batch_loss(
    scorer: RewardScorer, tensors: SplitTensors, rows: np.ndarray, flip: np.ndarray | None = None
) -> Tensor:
    """Weighted mean Plackett–Luce loss of ranking ``rows`` (``flip``: per ranking, its mirrored copy)."""
    data, device = tensors.data, tensors.pixels.device
    # checked by the caller (``_loss_parts``): a ranking loss runs only on a split with rankings
    assert data.ranking_prompt is not None and data.ranking_images is not None
    assert data.ranking_mask is not None and data.ranking_weight is not None
    prompt_rows, image_rows = mirror_rows(tensors, data.ranking_prompt[rows], data.ranking_images[rows], flip)
    text = embed_text_rows(scorer, tensors, prompt_rows)
    images = embed_image_rows(scorer, tensors, image_rows)
    scores = scorer.logit_scale() * (text[:, None, :] * images).sum(-1)
    mask = torch.from_numpy(data.ranking_mask[rows]).to(device)
    weight = torch.from_numpy(data.ranking_weight[rows]).to(device)
    return (plackett_luce_loss(scores, mask=mask) * weight).mean()


def validate(scorer: RewardScorer, tensors: SplitTensors) -> tuple[float, float]:
    """Validation pairwise accuracy (NaN without decided pairs) and weighted BT loss (ties soft)."""
    scores = score_tensors(scorer, tensors)
    accuracy, _, _ = pairwise_accuracy(scores.score_w, scores.score_l, scores.label)
    losses = bradley_terry_loss(
        torch.from_numpy(scores.score_w), torch.from_numpy(scores.score_l), label=torch.from_numpy(scores.label)
    )
    loss = float((losses * torch.from_numpy(tensors.data.pair_weight)).mean())
    return (math.nan if accuracy is None else accuracy), loss


def train_step(
    scorer: RewardScorer,
    tensors: SplitTensors,
    pair_rows: np.ndarray | None,
    ranking_rows: np.ndarray | None,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    accelerator: Accelerator,
    mirror: tuple[int, int] | None = None,
) -> dict[str, float]:
    """One optimizer step on the mean of the active losses ("mixed" = mean of BT and PL).

    ``mirror``: ``(seed, step)`` when each example is mirrored with probability ½ (``reward.mirror_augment``).
    """
    losses, metrics = [], {}
    if pair_rows is not None:
        loss_bt, metrics["accuracy"] = pair_batch_loss(
            scorer, tensors, pair_rows, mirror_flips(mirror, pair_rows, "pairs")
        )
        losses.append(loss_bt)
        metrics["loss_bt"] = loss_bt.item()
    if ranking_rows is not None:
        loss_pl = ranking_batch_loss(scorer, tensors, ranking_rows, mirror_flips(mirror, ranking_rows, "rankings"))
        losses.append(loss_pl)
        metrics["loss_pl"] = loss_pl.item()
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    metrics["grad_norm"] = float(accelerator.clip_grad_norm_(params, MAX_GRAD_NORM))
    metrics["lr"] = schedule.get_last_lr()[0]
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        scorer.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    metrics["loss"] = loss.item()
    metrics["logit_scale"] = scorer.logit_scale().item()
    return metrics
