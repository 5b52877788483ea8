"""One generic Prefect task that runs one pipeline stage, through ``dvc repro`` or in-process.

``mode="dvc"`` (scheduled and production runs) runs ``dvc repro --single-item <stage>``: DVC decides
whether the stage is stale, runs ``prefalign stage <stage>`` and updates ``dvc.lock``. ``mode="direct"``
(development, tests) calls ``prefalign.stages.run_stage`` in this process. Both end in the same
``run_<stage>`` function.

Concurrency: the task carries the tag ``dvc``. Tags only throttle when a limit of that name exists, so
nothing waits (and nothing can deadlock) on a fresh server; on a shared workspace create it once with
``prefect concurrency-limit create dvc 1`` so that two flow runs never run ``dvc repro`` in the same
repository at once (DVC would fail on its repo lock).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task

from prefalign import stages
from prefalign.config import load_config
from prefalign.tracking import read_run_id

_SKIPPED = "didn't change, skipping"  # what `dvc repro` prints for an up-to-date stage
_TAIL_LINES = 60


def dvc_repro(stage: str, root: Path) -> str:
    """Run ``dvc repro --single-item <stage>`` in ``root``, streaming its output to the Prefect log.

    Returns:
        The last lines of the output.

    Raises:
        RuntimeError: non-zero exit (e.g. the validation gate, exit 1); the message holds the output tail.
    """
    logger = get_run_logger()
    # The stage cmd is `prefalign stage ...`: put this environment's bin/ first so DVC finds it.
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout or ():
            logger.info(line.rstrip())
            tail.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc repro {stage}` failed (exit {proc.returncode}):\n{''.join(tail)}")
    return "".join(tail)


@task(task_run_name="stage-{stage}", tags=["dvc"])
def run_stage_task(
    stage: str, params_path: str, mode: Literal["dvc", "direct"] = "dvc", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one stage; returns ``{"stage", "mode", "run_id", "skipped", "summary"}`` (no retries: training)."""
    cfg = load_config(params_path, overrides)
    if mode == "direct":
        summary, skipped = stages.run_stage(stage, cfg), False
    elif overrides:
        sets = " ".join(f"-S {k}={v}" for k, v in overrides.items())
        raise ValueError(
            f"overrides are not applied in dvc mode (dvc.lock must tell the truth): run `dvc exp run "
            f"{sets}`, edit params.yaml, or use mode='direct'"
        )
    elif Path(params_path).resolve() != Path(cfg.paths.root).resolve() / "params.yaml":
        raise ValueError(f"dvc mode reads <repo>/params.yaml; got {params_path}")
    else:
        summary, skipped = None, _SKIPPED in dvc_repro(stage, Path(cfg.paths.root))
    return {
        "stage": stage,
        "mode": mode,
        "run_id": read_run_id(stages.stage_out_dir(stage, cfg)),
        "skipped": skipped,
        "summary": summary,
    }
