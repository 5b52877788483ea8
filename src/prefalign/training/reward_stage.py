"""The reward stage's glue: data from the canonical tables, training, the report, expert selection."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig

log = logging.getLogger(__name__)


def _tables(cfg: PipelineConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    prefs = cfg.paths.resolve("preferences")
    rankings_path = prefs / "rankings.parquet"
    rankings = pd.read_parquet(rankings_path) if rankings_path.is_file() else None
    return pd.read_parquet(prefs / "pairs.parquet"), rankings


def reward_splits(cfg: PipelineConfig) -> dict[str, Any]:
    """The train, val and test ``RewardData`` of the canonical tables: train keeps ties as configured, val and
    test keep them so that the report counts them."""
    from prefalign.data.schema import ImageStore
    from prefalign.training.reward_data import RewardData

    pairs, rankings = _tables(cfg)
    load = ImageStore(cfg.paths.resolve("preferences")).load_array
    size = cfg.model.resolution
    return {
        s: RewardData.from_tables(pairs, rankings, load, keep_ties=keep, split=s, resize_to=size)
        for s, keep in (("train", cfg.reward.keep_ties), ("val", True), ("test", True))
    }


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
    return load_backbone(
        cfg.reward.backbone,
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


def train_and_evaluate_reward(
    cfg: PipelineConfig, out: Path, tracker, *, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """Train on train, early-stop on val, report on test; the model is saved to ``out`` (CLIPModel format).

    ``checkpoint_dir``: resumable training state (see ``train_reward_model``); the caller removes it once done.
    """
    from prefalign.evaluation.figures import calibration_plot, loss_curve
    from prefalign.training.reward import train_reward_model
    from prefalign.training.reward_scoring import evaluate_reward

    splits = reward_splits(cfg)
    scorer = _scorer(cfg)
    figures = (
        [_pretrain_backbone(cfg, scorer, out, tracker)]
        if cfg.reward.backbone == "tiny" and cfg.reward.pretrain_steps
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
    scorer.save(out)
    metrics, scores = evaluate_reward(scorer, splits["test"])
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


def select_experts(cfg: PipelineConfig) -> pd.DataFrame:
    """Diffusion-DRO's expert demonstrations: the top-K train images by the reward model, capped per prompt.

    Returns:
        DataFrame with columns image (sha), prompt, reward, best first.

    Raises:
        ValueError: K is larger than the pool of candidate images.
    """
    from prefalign.data.schema import ImageStore
    from prefalign.models.reward_model import RewardScorer

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
    store = ImageStore(cfg.paths.resolve("preferences"))
    images = np.stack([store.load_array(sha) for sha in candidates.image])
    candidates["reward"] = RewardScorer.load(cfg.paths.resolve("reward")).score(candidates.prompt.tolist(), images)
    ranked = candidates.sort_values("reward", ascending=False, kind="stable")
    capped = ranked[ranked.groupby("prompt").cumcount() < cfg.dro.per_prompt_cap]
    return capped.head(cfg.dro.top_k).reset_index(drop=True)
