"""Stage ``train_dro``: hybrid Diffusion-DRO."""

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
from prefalign.stages._policy import finish_policy, policy_stage_run

log = logging.getLogger(__name__)


def run_train_dro(cfg: PipelineConfig) -> dict[str, Any]:
    """Hybrid Diffusion-DRO: reward-selected experts + online negatives; exported as a full UNet.

    The export is a full ``unet/`` folder, not a LoRA file: DRO's adapter is trained on top of the DPO
    adapter merged into the base (``dro.init_from: dpo``), so it is no adapter of the base model. With
    ``dro.ema_decay`` > 0 the EMA of the adapter is what gets merged. Resumes from
    ``<paths.checkpoints>/train_dro`` when an interrupted run of the same config left one.
    """
    from prefalign.models.diffusion import check_base_resolution, unet_with_policy
    from prefalign.registry import reward_tags
    from prefalign.training.features import load_features
    from prefalign.training.policy import merge_and_strip_lora, train_dro
    from prefalign.training.reward_stage import shared_experts

    torch_setup(cfg)
    check_base_resolution(cfg.model, cfg.base_model_dir())  # a json read: fails before any weights load
    init_dir = stage_path(cfg, "dpo") if cfg.dro.init_from == "dpo" else None
    upstream = [stage_path(cfg, "features"), stage_path(cfg, "reward")] + ([init_dir] if init_dir else [])
    with policy_stage_run(cfg, "train_dro", upstream) as (out, tracker):
        experts = shared_experts(cfg)  # scored on process 0 only, its choice broadcast to the others
        if is_main_process():
            tracker.set_tags(reward_tags(cfg, stage_path(cfg, "reward")))
            write_json(out / "experts.json", {"shas": experts.image.tolist(), "prompts": experts.prompt.tolist()})
            tracker.log_artifact(out / "experts.json")
        # The DPO adapter is merged into the weights, which become DRO's reference; a new adapter trains on top.
        unet = unet_with_policy(cfg.base_model_dir(), init_dir)
        history = train_dro(
            unet,
            experts.image.tolist(),
            experts.prompt.tolist(),
            load_features(stage_path(cfg, "features")),
            cfg.dro,
            seed=cfg.seed,
            log_metrics=tracker.log_metrics,
            checkpoint_dir=checkpoint_dir("train_dro", cfg),
        )
        if not is_main_process():
            return {"rank": rank(), "steps": history.steps}
        merge_and_strip_lora(unet)
        unet.save_pretrained(str(out / "unet"), safe_serialization=True)
        summary = {
            "experts": len(experts),
            "init_from": cfg.dro.init_from,
            **finish_policy(cfg, tracker, out, history, "dro"),
        }
        write_json(out / "summary.json", summary)
    drop_checkpoints("train_dro", cfg)
    return summary
