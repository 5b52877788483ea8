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
from prefalign.training.reward_data import WIN, ImageBatch, SplitTensors, StepPlan, embed_image_keys, embed_text_keys
from prefalign.training.reward_scoring import score_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator

MAX_GRAD_NORM = 1.0
# Gradients are averaged across processes in flat buckets of this many elements (DDP's 25 MB, in floats):
# one collective per bucket instead of one per tensor, without a second full copy of the gradients.
GRAD_BUCKET_ELEMENTS = 2**23


def pair_batch_loss(
    scorer: RewardScorer,
    tensors: SplitTensors,
    batch: ImageBatch,
    rows: np.ndarray,
    prompt_keys: np.ndarray,
    image_keys: np.ndarray,
) -> tuple[Tensor, float]:
    """Weighted mean BT loss of pair ``rows`` (ties with the soft label) and the batch's accuracy.

    ``prompt_keys`` ``(B,)`` and ``image_keys`` ``(B, 2)`` (preferred, other) name each pair's prompt and images,
    mirrored copies included (``StepPlan``); ``batch`` holds the images.
    """
    data, device = tensors.data, batch.pixels.device
    text = embed_text_keys(scorer, tensors, prompt_keys)
    image_w, image_l = embed_image_keys(scorer, batch, image_keys.T)
    scale = scorer.logit_scale()
    score_w, score_l = scale * (text * image_w).sum(-1), scale * (text * image_l).sum(-1)
    label = torch.from_numpy(data.pair_label[rows]).to(device)
    weight = torch.from_numpy(data.pair_weight[rows]).to(device)
    loss = (bradley_terry_loss(score_w, score_l, label=label) * weight).mean()
    decided = label == WIN
    accuracy = float((score_w > score_l)[decided].float().mean()) if bool(decided.any()) else math.nan
    return loss, accuracy


def ranking_batch_loss(
    scorer: RewardScorer,
    tensors: SplitTensors,
    batch: ImageBatch,
    rows: np.ndarray,
    prompt_keys: np.ndarray,
    image_keys: np.ndarray,
) -> Tensor:
    """Weighted mean Plackett–Luce loss of ranking ``rows`` (keys as in ``pair_batch_loss``, images ``(R, K)``)."""
    data, device = tensors.data, batch.pixels.device
    # checked by the caller (``_loss_parts``): a ranking loss runs only on a split with rankings
    assert data.ranking_mask is not None and data.ranking_weight is not None
    text = embed_text_keys(scorer, tensors, prompt_keys)
    images = embed_image_keys(scorer, batch, image_keys)
    scores = scorer.logit_scale() * (text[:, None, :] * images).sum(-1)
    mask = torch.from_numpy(data.ranking_mask[rows]).to(device)
    weight = torch.from_numpy(data.ranking_weight[rows]).to(device)
    return (plackett_luce_loss(scores, mask=mask) * weight).mean()


def validate(scorer: RewardScorer, tensors: SplitTensors, *, across_processes: bool = False) -> tuple[float, float]:
    """Validation pairwise accuracy (NaN without decided pairs) and weighted BT loss (ties soft).

    ``across_processes``: every process encodes its share of the images, and all return process 0's
    numbers, so that early stopping decides the same everywhere even if a kernel's rounding differed.
    """
    scores = score_tensors(scorer, tensors, across_processes=across_processes)
    accuracy, _, _ = pairwise_accuracy(scores.score_w, scores.score_l, scores.label)
    losses = bradley_terry_loss(
        torch.from_numpy(scores.score_w), torch.from_numpy(scores.score_l), label=torch.from_numpy(scores.label)
    )
    loss = float((losses * torch.from_numpy(tensors.data.pair_weight)).mean())
    accuracy = math.nan if accuracy is None else accuracy
    if across_processes:
        accuracy, loss = _from_process_zero([accuracy, loss], scorer.device)
    return accuracy, loss


def _from_process_zero(values: list[float], device: torch.device) -> list[float]:
    """``values`` as process 0 has them (unchanged without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return shared.tolist()


def average_gradients(params: list[Tensor], num_processes: int) -> None:
    """Replace each gradient by its mean over the processes (what DDP does inside its backward).

    The trainer calls the CLIP towers directly (text and image features of distinct prompts and images,
    apart from a model ``forward``), which a DDP wrapper would not see; the processes' batches are equal
    shares of one global batch, so the mean gradient is the global batch's. A missing gradient counts as zero.
    """
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, GRAD_BUCKET_ELEMENTS):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat)
        flat /= num_processes
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _buckets(tensors: list[Tensor], max_elements: int) -> list[list[Tensor]]:
    """Consecutive groups of ``tensors`` of the same dtype and device, each up to ``max_elements`` (or one tensor)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for tensor in tensors:
        last = buckets[-1] if buckets else None
        if (
            last is None
            or size + tensor.numel() > max_elements
            or (last[0].dtype, last[0].device) != (tensor.dtype, tensor.device)
        ):
            buckets.append([tensor])
            size = tensor.numel()
        else:
            last.append(tensor)
            size += tensor.numel()
    return buckets


def train_step(
    scorer: RewardScorer,
    tensors: SplitTensors,
    plan: StepPlan,
    pixels: Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    accelerator: Accelerator,
) -> dict[str, float]:
    """One optimizer step on the mean of the active losses ("mixed" = mean of BT and PL).

    ``plan``: this process's rows and keys of the step; ``pixels``: uint8 images of ``plan.keys`` on the device.
    Forwards run under the scorer's autocast (bf16 on CUDA when configured); with several processes the
    gradients are averaged before clipping, so every process takes the same update.
    """
    batch = ImageBatch(plan.keys, pixels)
    losses, metrics = [], {}
    with scorer.autocast():
        if plan.pair_rows is not None:
            assert plan.pair_prompt_keys is not None and plan.pair_image_keys is not None
            loss_bt, metrics["accuracy"] = pair_batch_loss(
                scorer, tensors, batch, plan.pair_rows, plan.pair_prompt_keys, plan.pair_image_keys
            )
            losses.append(loss_bt)
            metrics["loss_bt"] = loss_bt.item()
        if plan.ranking_rows is not None:
            assert plan.ranking_prompt_keys is not None and plan.ranking_image_keys is not None
            loss_pl = ranking_batch_loss(
                scorer, tensors, batch, plan.ranking_rows, plan.ranking_prompt_keys, plan.ranking_image_keys
            )
            losses.append(loss_pl)
            metrics["loss_pl"] = loss_pl.item()
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if accelerator.num_processes > 1:
        average_gradients(params, accelerator.num_processes)
    metrics["grad_norm"] = float(accelerator.clip_grad_norm_(params, MAX_GRAD_NORM))
    metrics["lr"] = schedule.get_last_lr()[0]
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        scorer.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    metrics["loss"] = loss.item()
    metrics["logit_scale"] = scorer.logit_scale().item()
    return metrics
