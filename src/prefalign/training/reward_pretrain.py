"""CLIP-style contrastive pretraining of the tiny reward backbone on captioned renderings."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from prefalign.losses.reward import clip_contrastive_loss
from prefalign.models.reward_model import MAX_LOGIT_SCALE, RewardScorer
from prefalign.training.reward import LOG_EVERY, MetricsFn, optimizer_for
from prefalign.training.reward_data import keyed_batches, mirror_flips, model_inputs
from prefalign.training.reward_steps import MAX_GRAD_NORM

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ backbone pretraining
def pretrain_contrastive(
    scorer: RewardScorer,
    images: np.ndarray,
    captions: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_metrics: MetricsFn | None = None,
    progress: bool = True,
    mirror: bool = False,
) -> list[float]:
    """CLIP-pretrain a backbone from scratch on captioned images (``clip_contrastive_loss``).

    Real reward models start from a CLIP that web-scale captions taught what colours, objects and
    positions look like (PickScore from CLIP-H, HPS v2 from OpenCLIP); the demo world's tiny CLIP gets
    the same start from the base model's captioned, partly mis-captioned pretraining renderings, before
    preference data teaches it what people prefer.

    Args:
        scorer: the model to train in place (all parameters).
        images: uint8 ``(N, H, W, 3)``.
        captions: N captions.
        steps, batch_size, lr: AdamW steps of ``batch_size`` random pairs, linear warmup then cosine.
        seed: keys the batch order.
        log_metrics: ``(metrics, step)`` callback (``pretrain/loss`` every 10 steps).
        progress: show a tqdm bar.
        mirror: each image is flipped, with its caption mirrored (``mirror_prompt``), with probability ½.

    Returns:
        The loss of every step.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scorer.model.to("cuda" if torch.cuda.is_available() else "cpu")
    n_images = len(captions)
    # Row i + N: image i flipped with its caption mirrored (a "center" caption stays the same).
    captions, input_ids, attention_mask, pixels = model_inputs(scorer, captions, images, mirrored=mirror)
    caption_ids = torch.from_numpy(pd.factorize(pd.Series(captions))[0]).to(pixels.device)
    optimizer, schedule = optimizer_for(scorer.model, lr=lr, steps=steps)
    scorer.model.train()
    losses: list[float] = []
    rows_of = keyed_batches(n_images, batch_size, seed=seed, purpose="reward-pretrain")
    for step in tqdm(range(steps), desc="pretrain reward backbone", disable=not progress, mininterval=2):
        picked = next(rows_of)
        flips = mirror_flips((seed, step), picked, "pretrain") if mirror else None
        if flips is not None:
            picked = picked + flips * n_images
        rows = torch.from_numpy(picked).to(pixels.device)
        text = scorer.text_embeddings(input_ids[rows], attention_mask[rows])
        image = scorer.image_embeddings(scorer.normalise(pixels[rows]))
        logits = scorer.logit_scale() * image @ text.T
        same = caption_ids[rows][:, None] == caption_ids[rows][None, :]
        loss = clip_contrastive_loss(logits, same).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            scorer.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if log_metrics and step % LOG_EVERY == 0:
            log_metrics({"pretrain/loss": losses[-1]}, step)
    log.info("reward backbone pretrained: %d steps, final loss %.4f", steps, float(np.mean(losses[-20:])))
    return losses
