"""Stage ``validate``: the Great Expectations gate."""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    DataValidationError,
    fresh_dir,
    stage_out_dir,
    stage_path,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_validate(cfg: PipelineConfig) -> dict[str, Any]:
    """The Great Expectations gate: raises ``DataValidationError`` when the data is invalid."""
    from prefalign.data.validation import validate_preferences

    out = fresh_dir(stage_out_dir("validate", cfg))
    report_path = stage_path(cfg, "reports") / "validation.json"
    with stage_run(cfg, "validate", out_dir=out, upstream=[stage_path(cfg, "preferences")]) as tracker:
        report = validate_preferences(
            stage_path(cfg, "preferences"),
            cfg.validation,
            report_path=report_path,
            docs_dir=out / "data_docs",
            data=cfg.data,
        )
        tracker.log_artifact(report_path)
        tracker.log_metrics(
            {"validate/success": float(report.success), "validate/failed_expectations": float(len(report.failures()))}
        )
    if not report.success:
        raise DataValidationError(
            f"{stage_path(cfg, 'preferences')} failed validation ({report_path}):\n  " + "\n  ".join(report.failures())
        )
    return {"success": True, "report": str(report_path)}
