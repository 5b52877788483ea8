"""The reward stage's glue: data from the canonical tables, training, the report, expert selection.

Under ``accelerate launch`` every process trains and scores its share; only process 0 writes files, and
only process 0 scores DRO's expert candidates (``shared_experts``), which the others receive.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig

if TYPE_CHECKING:
    from prefalign.models.reward_model import ImagePreprocessing

log = logging.getLogger(__name__)
# Candidate images per forward of expert selection: RewardScorer.score's batch, so the scores (and the
# experts chosen) are the ones it would give.
EXPERT_SCORE_BATCH = 256


def _tables(cfg: PipelineConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    prefs = cfg.paths.resolve("preferences")
    rankings_path = prefs / "rankings.parquet"
    rankings = pd.read_parquet(rankings_path) if rankings_path.is_file() else None
    return pd.read_parquet(prefs / "pairs.parquet"), rankings


def reward_splits(cfg: PipelineConfig, preprocessing: ImagePreprocessing | None = None) -> dict[str, Any]:
    """The train, val and test ``RewardData`` of the canonical tables: train keeps ties as configured, val and
    test keep them so that the report counts them.

    Images are decoded to ``preprocessing`` (the scorer's; default: CLIP's bicubic resize to
    ``model.resolution``), up front for splits under ``reward.preload_max_bytes``, else on demand; the files
    of an on-demand split are header-checked here, before any training.

    Raises:
        ValueError: an image cannot be decoded (one line naming the split, the image and its file).
    """
    from prefalign.models.reward_model import ImagePreprocessing
    from prefalign.training.reward_data import RewardData, StoreImages, check_images

    pairs, rankings = _tables(cfg)
    images = StoreImages(cfg.paths.resolve("preferences"))
    size = cfg.model.resolution
    resize_to = preprocessing or ImagePreprocessing(size, size)
    splits = {
        s: RewardData.from_tables(
            pairs,
            rankings,
            images,
            keep_ties=keep,
            split=s,
            resize_to=resize_to,
            preload_max_bytes=cfg.reward.preload_max_bytes,
        )
        for s, keep in (("train", cfg.reward.keep_ties), ("val", True), ("test", True))
    }
    world = int(os.environ.get("WORLD_SIZE", "1"))
    part = (int(os.environ.get("RANK", "0")) % world, world)  # under accelerate launch, each process its share
    for data in splits.values():
        if data.images is None:
            check_images(data, images, part=part)
    return splits


def _scorer(cfg: PipelineConfig):
    from prefalign.models.reward_model import load_backbone

    tokenizer = None
    if cfg.reward.backbone == "tiny":
        from prefalign.models.text import build_tokenizer
        from prefalign.world.grammar import vocabulary_words

        tokenizer = build_tokenizer(vocabulary_words())
    tiny: dict[str, Any] = {
        "width": cfg.reward.tiny_width,
        "vision_layers": cfg.reward.tiny_vision_layers,
        "patch_size": cfg.reward.tiny_patch_size,
    }
    # A folder is relative to the params file's folder, as model.pretrained_path and the judges' paths are.
    backbone = "tiny" if cfg.reward.backbone == "tiny" else Path(cfg.paths.root) / cfg.reward.backbone
    return load_backbone(
        backbone,
        tokenizer=tokenizer,
        image_size=cfg.model.resolution,
        tiny=tiny,
        embed_dim=cfg.reward.embed_dim,
        seed=cfg.seed,
    )


def oracle_metrics_of_split(cfg: PipelineConfig, data, scores) -> Mapping[str, float | None]:
    """``reward_ceiling.oracle_metrics`` of the scores on the demo world; all None on real data (no oracle)."""
    if cfg.model.preset != "demo":
        return {"bayes_accuracy": None, "expected_accuracy": None, "oracle_agreement": None}
    from prefalign.evaluation.reward_ceiling import oracle_metrics
    from prefalign.training.reward_data import decode_image

    if data.images is None:  # streamed (reward.preload_max_bytes); the oracle measures the world's small images
        decoded = [decode_image(data.load_image, sha, None) for sha in data.image_shas]
        data = dataclasses.replace(data, images=np.stack(decoded))
    return oracle_metrics(data, scores.score_w, scores.score_l, tau=cfg.world.annotator_tau)


def freeze_for_fine_tuning(cfg: PipelineConfig, scorer) -> None:
    """``reward.train_last_layers``: freeze all but the top of the backbone, after any CLIP pretraining."""
    from prefalign.models.reward_model import freeze_all_but_last_layers

    if cfg.reward.train_last_layers is not None:
        freeze_all_but_last_layers(scorer.model, cfg.reward.train_last_layers)
        trainable = sum(p.numel() for p in scorer.model.parameters() if p.requires_grad)
        log.info(
            "reward: training the last %d layer(s) of each tower and the projections, %d parameters",
            cfg.reward.train_last_layers,
            trainable,
        )


def _pretrain_backbone(cfg: PipelineConfig, scorer, out: Path, tracker) -> Path:
    """CLIP-pretrain the tiny backbone on the world's captioned renderings; returns the loss-curve PNG."""
    from prefalign.evaluation.figures import loss_curve
    from prefalign.training.reward_pretrain import pretrain_contrastive

    world = np.load(cfg.paths.resolve("world") / "pretrain.npz")
    losses = pretrain_contrastive(
        scorer,
        world["images"],
        [str(c) for c in world["captions"]],
        steps=cfg.reward.pretrain_steps,
        batch_size=cfg.reward.pretrain_batch_size,
        lr=cfg.reward.pretrain_lr,
        seed=cfg.seed,
        log_metrics=tracker.log_metrics,
        mirror=cfg.reward.mirror_augment,
    )
    return loss_curve(
        {"contrastive loss": losses},
        out / "reward_pretraining.png",
        title="reward backbone: CLIP pretraining on captioned renderings",
    )


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of ``accelerate launch`` / ``torchrun`` (which set ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def train_and_evaluate_reward(
    cfg: PipelineConfig, out: Path, tracker, *, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """Train on train, early-stop on val, report on test; the model is saved to ``out`` (CLIPModel format).

    ``checkpoint_dir``: resumable training state (see ``train_reward_model``); the caller removes it once done.
    Under ``accelerate launch`` every process trains and scores the test split with the others; only process
    0 pretrains the tiny backbone (the trainer starts every process from its weights) and writes ``out``.
    """
    from prefalign.evaluation.figures import calibration_plot, loss_curve
    from prefalign.training.reward import train_reward_model
    from prefalign.training.reward_scoring import evaluate_reward

    main = _is_main_process()
    scorer = _scorer(cfg)
    splits = reward_splits(cfg, scorer.preprocessing)
    figures = (
        [_pretrain_backbone(cfg, scorer, out, tracker)]
        if cfg.reward.backbone == "tiny" and cfg.reward.pretrain_steps and main
        else []
    )
    freeze_for_fine_tuning(cfg, scorer)
    result = train_reward_model(
        scorer,
        cfg.reward,
        splits["train"],
        splits["val"],
        seed=cfg.seed,
        log_metrics=tracker.log_metrics,
        checkpoint_dir=checkpoint_dir,
    )
    if main:
        scorer.save(out)
    metrics, scores = evaluate_reward(
        scorer, splits["test"], num_workers=cfg.reward.num_workers, across_processes=True
    )
    report = {
        **metrics,
        **oracle_metrics_of_split(cfg, splits["test"], scores),
        "best_val_accuracy": result.best_val_accuracy,
        "best_step": result.best_step,
        "steps_run": result.steps_run,
        "select_on": cfg.reward.select_on,
        "loss": cfg.reward.loss,
        "backbone_pretrain_steps": cfg.reward.pretrain_steps if cfg.reward.backbone == "tiny" else 0,
    }
    if not main:
        return report
    calibration = metrics["calibration"]
    figures += [
        calibration_plot(
            np.asarray(calibration["pred"], dtype=float),
            np.asarray(calibration["observed"], dtype=float),
            out / "calibration.png",
        ),
        loss_curve(
            {k: result.history[k] for k in ("loss", "val_loss", "val_accuracy") if result.history.get(k)},
            out / "reward_training.png",
            title="reward model training",
            steps={k: result.history.get("eval_step", []) for k in ("val_loss", "val_accuracy")},
        ),
    ]
    for path in figures:
        tracker.log_artifact(path, "figures")
    log.info(
        "reward: held-out accuracy %s on %d pairs (expected %s), Bayes rate %s",
        report["pairwise_accuracy"],
        report["n_pairs"],
        report["expected_accuracy"],
        report["bayes_accuracy"],
    )
    return report


def _expert_candidates(cfg: PipelineConfig) -> pd.DataFrame:
    """Every distinct (prompt, image) of the train split's pairs and rankings, in table order.

    Raises:
        ValueError: ``dro.top_k`` is larger than the pool (at most ``dro.per_prompt_cap`` per prompt).
    """
    pairs, rankings = _tables(cfg)
    train = pairs[pairs.split == "train"]
    candidates = pd.concat(
        [
            train[["prompt", "image_w"]].rename(columns={"image_w": "image"}),
            train[["prompt", "image_l"]].rename(columns={"image_l": "image"}),
        ]
    )
    if rankings is not None:
        ranked = rankings[rankings.split == "train"].explode("images").rename(columns={"images": "image"})
        candidates = pd.concat([candidates, ranked[["prompt", "image"]]])
    candidates = candidates.drop_duplicates().reset_index(drop=True)
    capped_pool = int(candidates.groupby("prompt").size().clip(upper=cfg.dro.per_prompt_cap).sum())
    if cfg.dro.top_k > capped_pool:
        raise ValueError(
            f"dro.top_k={cfg.dro.top_k} is larger than the pool of {capped_pool} candidate images "
            f"(train split, at most dro.per_prompt_cap={cfg.dro.per_prompt_cap} per prompt)"
        )
    return candidates


def select_experts(cfg: PipelineConfig) -> pd.DataFrame:
    """Diffusion-DRO's expert demonstrations: the top-K train images by the reward model, capped per prompt.

    Candidates are scored in batches on the accelerator (``reward.mixed_precision`` autocast on CUDA), each
    batch decoded from the image store at the scorer's size by ``reward.num_workers`` DataLoader processes;
    the reward model is released before returning, so the policy trainer gets the device back.

    Returns:
        DataFrame with columns image (sha), prompt, reward, best first.

    Raises:
        ValueError: K is larger than the pool of candidate images, or a candidate cannot be decoded (named).
    """
    import torch

    from prefalign.models.reward_model import RewardScorer
    from prefalign.training.reward_data import StoreImages
    from prefalign.training.reward_scoring import score_images

    candidates = _expert_candidates(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    scorer = RewardScorer.load(cfg.paths.resolve("reward"))
    scorer.model.to(device)
    scorer.mixed_precision = cfg.reward.mixed_precision
    log.info(
        "expert selection: process %d scores %d candidate images on %s",
        int(os.environ.get("RANK", "0")),
        len(candidates),
        device,
    )
    candidates["reward"] = score_images(
        scorer,
        candidates.prompt.tolist(),
        candidates.image.tolist(),
        StoreImages(cfg.paths.resolve("preferences")),
        batch_size=EXPERT_SCORE_BATCH,
        num_workers=cfg.reward.num_workers,
    )
    del scorer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ranked = candidates.sort_values("reward", ascending=False, kind="stable")
    capped = ranked[ranked.groupby("prompt").cumcount() < cfg.dro.per_prompt_cap]
    return capped.head(cfg.dro.top_k).reset_index(drop=True)


def shared_experts(cfg: PipelineConfig) -> pd.DataFrame:
    """``select_experts`` on process 0 only; the other processes of an ``accelerate launch`` receive its table.

    The choice is broadcast (``accelerate.utils.broadcast_object_list``) rather than passed through a file:
    it needs no filesystem shared between machines, and no process can read a stale file of an earlier run.
    If process 0 fails, every process raises with its message instead of waiting.

    Raises:
        ValueError: as ``select_experts`` (on process 0), or RuntimeError naming process 0's error (others).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return select_experts(cfg)
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())  # the process group the trainers will use
    payload: list[Any] = [None]
    if state.is_main_process:
        try:
            experts = select_experts(cfg)
        except Exception as err:
            broadcast_object_list([{"error": f"{type(err).__name__}: {err}"}], from_process=0)
            raise
        payload = [{"table": experts.to_dict(orient="list")}]
    broadcast_object_list(payload, from_process=0)
    received = payload[0]
    if "error" in received:
        raise RuntimeError(f"expert selection failed on process 0: {received['error']}")
    return pd.DataFrame(received["table"])
