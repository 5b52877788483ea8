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
    """Base, DPO and DRO on held-out prompts with fixed seeds, scored by every judge, win rates with intervals."""
    from prefalign.evaluation.judges import load_judges
    from prefalign.evaluation.report import evaluate_policies
    from prefalign.models.diffusion import check_base_resolution
    from prefalign.registry import reward_tags

    torch_setup(cfg)
    check_base_resolution(cfg.model, cfg.base_model_dir())  # a json read: fails before any weights load
    # Judges first: a judge folder in the wrong format fails here, before the previous report is cleared,
    # a tracking run is opened or any image is generated.
    judges = load_judges(cfg)
    out = fresh_dir(stage_out_dir("evaluate", cfg))
    upstream = [stage_path(cfg, "dpo"), stage_path(cfg, "dro"), stage_path(cfg, "reward")]
    with stage_run(cfg, "evaluate", out_dir=out, upstream=upstream) as tracker:
        tracker.set_tags(reward_tags(cfg, stage_path(cfg, "reward")))
        tracker.set_tags({"prefalign.judge": cfg.eval.judge})
        report = evaluate_policies(cfg, out, tracker, judges=judges)
        write_json(stage_path(cfg, "reports") / "eval.json", report)
        tracker.log_artifact(stage_path(cfg, "reports") / "eval.json")
    return {"win_rates": report["win_rates"], "models": report["models"]}
