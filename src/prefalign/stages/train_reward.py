"""Stage ``train_reward``: the reward model and its held-out report."""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    checkpoint_dir,
    drop_checkpoints,
    fresh_dir,
    is_main_process,
    stage_out_dir,
    stage_path,
    torch_setup,
    write_json,
)
from prefalign.tracking import NullTracker, stage_run

log = logging.getLogger(__name__)


def run_train_reward(cfg: PipelineConfig) -> dict[str, Any]:
    """Train the reward model (BT / PL) and report held-out accuracy next to the Bayes rate.

    Runs in one process or under ``accelerate launch``, as the policy stages do: every process trains its
    share of each batch and scores its share of the test split; only process 0 empties and writes the
    output folder, the report and the MLflow run.
    """
    from prefalign.training.reward_stage import train_and_evaluate_reward

    torch_setup(cfg)
    out = stage_out_dir("train_reward", cfg)
    checkpoints = checkpoint_dir("train_reward", cfg)
    if not is_main_process():
        report = train_and_evaluate_reward(cfg, out, NullTracker(), checkpoint_dir=checkpoints)
        return {k: v for k, v in report.items() if not isinstance(v, dict | list)}
    upstream = [stage_path(cfg, "preferences"), stage_path(cfg, "world")]
    with stage_run(cfg, "train_reward", out_dir=fresh_dir(out), upstream=upstream) as tracker:
        report = train_and_evaluate_reward(cfg, out, tracker, checkpoint_dir=checkpoints)
        write_json(stage_path(cfg, "reports") / "reward.json", report)
        tracker.log_metrics({f"reward/{k}": float(v) for k, v in report.items() if isinstance(v, int | float)})
    drop_checkpoints("train_reward", cfg)
    return {k: v for k, v in report.items() if not isinstance(v, dict | list)}
