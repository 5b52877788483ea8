"""The alignment pipeline as a Prefect flow: stages in order, the validation gate, registry and promotion.

Run it from the repo root: ``prefalign run`` (which calls ``python -m flows.pipeline``), a deployment of
``flows/pipeline.py:alignment_pipeline`` (prefect.yaml), or ``alignment_pipeline(mode="direct")`` in tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from prefalign.config import load_config, parse_override
from prefalign.stages import STAGES
from prefalign.tracking import pipeline_run, tracking_uri
from tasks.registry import (
    eval_key_figures,
    promote_champion,
    publish_reports,
    publish_validation,
    push_data,
    record_runs,
    register_candidates,
    register_reward_model,
)
from tasks.stages import run_stage_task


@flow(name="alignment-pipeline", log_prints=True)
def alignment_pipeline(
    params_path: str = "params.yaml",
    mode: Literal["dvc", "direct"] = "dvc",
    overrides: dict[str, Any] | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Every stage in order under one MLflow parent run, then registration, promotion and reports.

    A failed validation publishes the ``validation-report`` artifact and fails the run: nothing after the
    gate runs, and every output before it stays where it was written. Data is pushed to the DVC remote in
    ``dvc`` mode only (direct runs do not update dvc.lock, so there is nothing truthful to push).
    """
    cfg = load_config(params_path, overrides)
    reports = str(cfg.paths.resolve("reports"))
    results: dict[str, dict[str, Any]] = {}
    with pipeline_run(cfg, flow_run_id=flow_run.id) as parent_run_id:
        for stage in STAGES:
            try:
                results[stage] = run_stage_task(stage, params_path, mode, overrides)
            except Exception:
                if stage == "validate":
                    publish_validation(reports)
                raise
            if stage == "train_reward":
                register_reward_model(params_path, overrides)
        candidates = register_candidates(params_path, overrides)
        decision = promote_champion(params_path, overrides, candidates) if promote else None
        if mode == "dvc":
            push_data(str(cfg.paths.root))
        publish_reports(reports, decision)
        if parent_run_id:
            record_runs(params_path, overrides, parent_run_id, {s: r["run_id"] for s, r in results.items()})
    summary = {
        "parent_run_id": parent_run_id,
        "champion": decision["champion"] if decision else None,
        "promoted": bool(decision and decision["promoted"]),
        "eval": eval_key_figures(reports),
        "tracking_uri": tracking_uri(cfg),
        "ui": "make ui-mlflow (MLflow), make ui-prefect (Prefect)",
        "candidates": {m: c.as_dict() for m, c in candidates.items()},
    }
    print(json.dumps(summary, indent=2, default=str))
    return summary


def main() -> None:
    """``python -m flows.pipeline --params params.yaml --mode dvc [--set key=value ...] [--no-promote]``."""
    from prefalign.runtime import apply_offline_defaults, configure_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mode", choices=["dvc", "direct"], default="dvc")
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], help="dotted key=value")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args()
    apply_offline_defaults()
    configure_logging()
    overrides = dict(parse_override(o) for o in args.overrides) or None
    alignment_pipeline(str(Path(args.params)), args.mode, overrides, promote=not args.no_promote)


if __name__ == "__main__":
    main()
