"""What the two policy stages (``train_dpo``, ``train_dro``) share: ranks, pairs and the finishing report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig
from prefalign.stages._common import fresh_dir, is_main_process, log_figure, stage_out_dir, stage_path
from prefalign.tracking import NullTracker, Tracker, stage_run


@contextlib.contextmanager
def policy_stage_run(cfg: PipelineConfig, stage: str, upstream: Sequence[Path]) -> Iterator[tuple[Path, Tracker]]:
    """The output folder and tracker of a training stage that may run in several processes.

    Under ``accelerate launch`` every rank trains (the trainer splits each global batch between them),
    but only rank 0 empties and writes the output folder and records the MLflow run; the other ranks get
    a ``NullTracker`` and the folder's path, and must write nothing into it.
    """
    out = stage_out_dir(stage, cfg)
    if not is_main_process():
        yield out, NullTracker()
        return
    with stage_run(cfg, stage, out_dir=fresh_dir(out), upstream=upstream) as tracker:
        yield out, tracker


def load_pairs(cfg: PipelineConfig, split: str) -> pd.DataFrame:
    """The preference pairs of one split, in stored order."""
    pairs = pd.read_parquet(stage_path(cfg, "preferences") / "pairs.parquet")
    return pairs[pairs.split == split].reset_index(drop=True)


def finish_policy(cfg: PipelineConfig, tracker: Tracker, out: Path, history: Any, name: str) -> dict[str, Any]:
    """Write the training history and loss curve beside the weights; return the final means."""
    from prefalign.evaluation.figures import loss_curve
    from prefalign.training.policy import save_history

    save_history(history, out / "history.json")
    curves = {k: history.metrics[k] for k in ("loss", "implicit_acc", "active") if k in history.metrics}
    log_figure(tracker, loss_curve(curves, out / "loss_curve.png", title=f"{name} training"))
    final = {k: float(np.mean(v[-20:])) for k, v in history.metrics.items()}
    tracker.log_metrics({f"{name}/final_{k}": v for k, v in final.items()})
    return {"steps": history.steps, **{f"final_{k}": v for k, v in final.items()}}
