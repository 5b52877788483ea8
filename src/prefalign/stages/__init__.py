"""One module per pipeline stage, each with its ``run_<stage>(cfg)``: the only code that reads and writes files.

``dvc repro`` runs them through ``prefalign stage <name>``; the Prefect tasks run them the same way or
in-process (``mode="direct"``). Each returns a small JSON-able summary and records an MLflow run (or
nothing, with tracking disabled) whose id lands in ``<out>/run.json``.

A stage module is imported only when its stage runs, so each stage's code is its module's import closure:
``tests/unit/test_dvc_deps.py`` derives it and checks that ``dvc.yaml`` lists every file of it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    STAGE_OUTPUTS,
    DataValidationError,
    checkpoint_dir,
    is_main_process,
    stage_out_dir,
)

__all__ = [
    "STAGES",
    "STAGE_OUTPUTS",
    "DataValidationError",
    "checkpoint_dir",
    "is_main_process",
    "run_stage",
    "stage_out_dir",
]

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "world",
    "pretrain_base",
    "ingest",
    "validate",
    "featurize",
    "train_reward",
    "train_dpo",
    "train_dro",
    "evaluate",
)


def run_stage(name: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Run one stage by name (the names of dvc.yaml, the CLI and the flow)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    log.info("stage %s", name)
    runner = getattr(importlib.import_module(f"prefalign.stages.{name}"), f"run_{name}")
    return runner(cfg)
