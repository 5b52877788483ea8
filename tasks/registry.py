"""Prefect tasks after evaluation: register candidates, promote, push data, publish reports as artifacts.

Registration and pushes retry (I/O; registration is idempotent because versions are keyed by the
weights' content hash). Artifact keys use lowercase letters, digits and dashes only (Prefect rejects
anything else).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from prefalign import registry
from prefalign.config import PipelineConfig, load_config
from prefalign.registry import ModelVersionInfo
from prefalign.tracking import read_run_id, record_stage_runs
from prefalign.versioning import dvc_push

POLICY_METHODS = ("dpo", "dro")
_MAX_INLINE_IMAGE = 512 * 1024  # larger PNGs are linked (file://) instead of inlined as data URIs


def _report(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    return json.loads((cfg.paths.resolve("reports") / name).read_text())


def _floats(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@task(retries=2, retry_delay_seconds=5)
def register_reward_model(params_path: str, overrides: dict[str, Any] | None = None) -> ModelVersionInfo:
    """Register the reward model as soon as it is trained, so the stages that use it can record its version."""
    cfg = load_config(params_path, overrides)
    path = cfg.paths.resolve("reward")
    return registry.register_reward(
        cfg, model_dir=path, run_id=read_run_id(path), metrics=_floats(_report(cfg, "reward.json"))
    )


@task(retries=2, retry_delay_seconds=5)
def register_candidates(params_path: str, overrides: dict[str, Any] | None = None) -> dict[str, ModelVersionInfo]:
    """Register the DPO and DRO policies; existing weights are not registered twice."""
    cfg = load_config(params_path, overrides)
    models, path = _report(cfg, "eval.json")["models"], cfg.paths.resolve
    return {
        m: registry.register_policy(
            cfg,
            method=m,
            policy_dir=path(m),
            base_dir=cfg.base_model_dir(),
            run_id=read_run_id(path(m)),
            metrics=_floats(models[m]),
        )
        for m in POLICY_METHODS
    }


@task
def promote_champion(
    params_path: str, overrides: dict[str, Any] | None, candidates: dict[str, ModelVersionInfo]
) -> dict[str, Any]:
    """Move ``champion`` to the best qualifying candidate if it beats the current one; returns the decision."""
    cfg = load_config(params_path, overrides)
    return registry.promote(cfg, candidates, _report(cfg, "eval.json"))


@task(retries=2, retry_delay_seconds=10)
def push_data(root: str) -> str:
    """``dvc push``: data and checkpoints of this run to the default DVC remote."""
    return dvc_push(Path(root))


@task
def record_runs(
    params_path: str, overrides: dict[str, Any] | None, parent_run_id: str, runs: dict[str, str | None]
) -> None:
    """Tag the pipeline run with every stage's run id (reused ones included, when DVC skipped a stage)."""
    record_stage_runs(parent_run_id, runs, load_config(params_path, overrides))


# ------------------------------------------------------------------------------------------------ reports
def validation_markdown(report: dict[str, Any]) -> str:
    """The GX report as markdown: verdict, statistics, one row per failed expectation."""
    stats = report.get("statistics", {})
    lines = [
        f"# Data validation: {'PASSED' if report.get('success') else 'FAILED'}",
        "",
        (
            f"{stats.get('successful_expectations', '?')} of {stats.get('evaluated_expectations', '?')} "
            f"expectations passed; rows {stats.get('rows', {})}; tie fraction {stats.get('tie_fraction')}; "
            f"quarantine fraction {stats.get('quarantine_fraction')}."
        ),
        "",
    ]
    failed = [r for r in report.get("results", []) if not r.get("success")]
    if failed:
        lines += ["| file | expectation | columns | unexpected | observed |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.get('file')} | {r.get('expectation')} | {', '.join(r.get('columns') or [])} | "
            f"{r.get('unexpected_count')} | {str(r.get('observed_value'))[:60]} |"
            for r in failed
        ]
    if report.get("docs_index"):
        lines += ["", f"Data Docs: {report['docs_index']}"]
    return "\n".join(lines)


def eval_key_figures(reports_dir: str) -> dict[str, Any]:
    """The flow summary's numbers from ``eval.json``: the deciding judge's mean per model and each win rate on it."""
    report = json.loads((Path(reports_dir) / "eval.json").read_text())
    metric = report["judge"]
    return {
        "metric": metric,
        "means": {name: values.get(f"{metric}_mean") for name, values in report["models"].items()},
        "win_rates": {
            key: {k: v[metric][k] for k in ("rate", "ci_low", "ci_high")}
            for key, v in report["win_rates"].items()
            if metric in v
        },
        "figures": sorted(str(p) for p in (Path(reports_dir) / "eval").glob("*.png")),
    }


def _figures_markdown(paths: list[Path]) -> str:
    parts = ["# Evaluation figures"]
    for path in paths:
        data = path.read_bytes()
        url = (
            f"data:image/png;base64,{base64.b64encode(data).decode()}"
            if len(data) <= _MAX_INLINE_IMAGE
            else path.resolve().as_uri()
        )
        parts += ["", f"## {path.stem}", f"![{path.stem}]({url})"]
    return "\n".join(parts)


@task
def publish_validation(reports_dir: str) -> bool:
    """Markdown artifact ``validation-report`` from ``<reports>/validation.json``; False when there is none."""
    path = Path(reports_dir) / "validation.json"
    if not path.is_file():
        return False
    create_markdown_artifact(
        validation_markdown(json.loads(path.read_text())),
        key="validation-report",
        description="Great Expectations gate on data/preferences",
    )
    return True


@task
def publish_reports(reports_dir: str, decision: dict[str, Any] | None = None) -> list[str]:
    """Artifacts: validation report, eval win rates, promotion decision, figures; returns the keys made."""
    reports = Path(reports_dir)
    keys = ["validation-report"] if publish_validation.fn(reports_dir) else []
    report = json.loads((reports / "eval.json").read_text())
    win_rates = report["win_rates"]
    accuracy = [
        {"model": name, "attribute": attr, **r}
        for name, values in report["models"].items()
        for attr, r in values.get("accuracy", {}).items()
    ]
    if accuracy:
        create_table_artifact(
            accuracy,
            key="eval-accuracy",
            description="Strict per-attribute accuracy with 95% bootstrap CI over prompts",
        )
        keys.append("eval-accuracy")
    create_table_artifact(
        [
            {"comparison": key, "metric": m, **r, "beats": r["ci_low"] > 0.5}
            for key, per_metric in win_rates.items()
            for m, r in per_metric.items()
        ],
        key="eval-win-rates",
        description="Win rates with 95% bootstrap CI (beats: ci_low > 0.5)",
    )
    keys.append("eval-win-rates")
    if decision is not None:
        create_table_artifact(decision["candidates"], key="promotion-decision", description=decision["reason"])
        keys.append("promotion-decision")
    figures = sorted([*(reports / "eval").glob("*.png"), *(reports / "figures").glob("*.png")])
    if figures:
        create_markdown_artifact(_figures_markdown(figures), key="eval-figures", description="reports/ figures")
        keys.append("eval-figures")
    return keys
