"""Stage ``evaluate``: base and candidates on held-out prompts."""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    stage_out_dir,
    stage_path,
    torch_setup,
    write_json,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    """Base, DPO and DRO on held-out prompts with fixed seeds: oracle, reward, win rates with intervals."""
    from prefalign.evaluation.report import evaluate_policies
    from prefalign.registry import reward_tags

    torch_setup(cfg)
    out = fresh_dir(stage_out_dir("evaluate", cfg))
    upstream = [stage_path(cfg, "dpo"), stage_path(cfg, "dro"), stage_path(cfg, "reward")]
    with stage_run(cfg, "evaluate", out_dir=out, upstream=upstream) as tracker:
        tracker.set_tags(reward_tags(cfg, stage_path(cfg, "reward")))
        report = evaluate_policies(cfg, out, tracker)
        write_json(stage_path(cfg, "reports") / "eval.json", report)
        tracker.log_artifact(stage_path(cfg, "reports") / "eval.json")
    return {"win_rates": report["win_rates"], "models": report["models"]}
