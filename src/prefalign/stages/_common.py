"""What every stage shares: where outputs land, fresh output folders, JSON writes, ranks and checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.tracking import Tracker

# Where each stage's run.json lands: (paths entry, subfolder). The one copy; tasks and tests read it here.
STAGE_OUTPUTS: dict[str, tuple[str, str]] = {
    "world": ("world", ""),
    "pretrain_base": ("base_model", ""),
    "ingest": ("preferences", ""),
    "validate": ("reports", "validation"),
    "featurize": ("features", ""),
    "train_reward": ("reward", ""),
    "train_dpo": ("dpo", ""),
    "train_dro": ("dro", ""),
    "evaluate": ("reports", "eval"),
}


class DataValidationError(RuntimeError):
    """The validation gate rejected the data; the report says why."""


def stage_path(cfg: PipelineConfig, name: str) -> Path:
    """``paths.<name>`` resolved against the params file's folder."""
    return cfg.paths.resolve(name)


def stage_out_dir(stage: str, cfg: PipelineConfig) -> Path:
    """The folder holding ``stage``'s outputs and run.json."""
    name, sub = STAGE_OUTPUTS[stage]
    return cfg.paths.resolve(name) / sub


def checkpoint_dir(stage: str, cfg: PipelineConfig) -> Path:
    """``<paths.checkpoints>/<stage>``: resumable state, outside the stage's DVC output (DVC deletes those)."""
    return stage_path(cfg, "checkpoints") / stage


def fresh_dir(path: Path) -> Path:
    """An empty output folder: a stale file from an earlier run must never pass as this run's output."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def log_figure(tracker: Tracker, path: Path) -> None:
    tracker.log_artifact(path, "figures")


def torch_setup(cfg: PipelineConfig) -> None:
    """Seed every generator a stage may touch (torch, numpy, random) from ``cfg.seed``."""
    from prefalign.seeding import seed_everything

    seed_everything(cfg.seed)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of ``accelerate launch`` / ``torchrun`` (which set ``RANK``)."""
    return rank() == 0


def drop_checkpoints(stage: str, cfg: PipelineConfig) -> None:
    # The outputs are written: the checkpoints served their purpose (resuming this run). Keeping them would
    # make the next run with another config or data stop at the fingerprint check.
    shutil.rmtree(checkpoint_dir(stage, cfg), ignore_errors=True)
