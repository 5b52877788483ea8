"""Stage ``train_dpo``: offline Diffusion-DPO."""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    checkpoint_dir,
    drop_checkpoints,
    is_main_process,
    rank,
    stage_path,
    torch_setup,
    write_json,
)
from prefalign.stages._policy import finish_policy, load_pairs, policy_stage_run

log = logging.getLogger(__name__)


def run_train_dpo(cfg: PipelineConfig) -> dict[str, Any]:
    """Offline Diffusion-DPO from the base model on the train pairs; ties dropped and counted.

    Ties (label 0.5) are always dropped: the published loss has no tie form and a tie kept in source
    order would be trained as a win. Their count is logged, tracked (``dpo.ties_dropped``) and in the summary.
    Resumes from ``<paths.checkpoints>/train_dpo`` when an interrupted run of the same config left one.
    """
    from prefalign.data.prepare import drop_ties
    from prefalign.models.diffusion import check_base_resolution, load_base_unet, save_lora
    from prefalign.training.features import load_features
    from prefalign.training.policy import train_dpo

    torch_setup(cfg)
    check_base_resolution(cfg.model, cfg.base_model_dir())  # a json read: fails before any weights load
    with policy_stage_run(cfg, "train_dpo", [stage_path(cfg, "features"), stage_path(cfg, "base_model")]) as (
        out,
        tracker,
    ):
        pairs, ties = drop_ties(load_pairs(cfg, "train"))
        log.info("train_dpo: %d strict pairs, %d ties dropped", len(pairs), ties)
        tracker.log_params({"dpo.ties_dropped": ties, "dpo.train_pairs": len(pairs)})
        unet = load_base_unet(cfg.base_model_dir())
        history = train_dpo(
            unet,
            pairs.image_w.tolist(),
            pairs.image_l.tolist(),
            pairs.prompt.tolist(),
            load_features(stage_path(cfg, "features")),
            cfg.dpo,
            seed=cfg.seed,
            log_metrics=tracker.log_metrics,
            checkpoint_dir=checkpoint_dir("train_dpo", cfg),
        )
        if not is_main_process():  # the trainer waited for every rank; rank 0 exports
            return {"rank": rank(), "steps": history.steps}
        save_lora(unet, out)
        summary = {"train_pairs": len(pairs), "ties_dropped": ties, **finish_policy(cfg, tracker, out, history, "dpo")}
        write_json(out / "summary.json", summary)
    drop_checkpoints("train_dpo", cfg)
    return summary
