"""Stage ``ingest``: the canonical preference dataset, from the demo pool or an importer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    stage_out_dir,
    stage_path,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_ingest(cfg: PipelineConfig) -> dict[str, Any]:
    """Build the canonical preference dataset.

    demo: renderings and base samples judged by simulated annotators. pickapic | hpd | jsonl: everything
    under ``paths.source`` imported afresh; the import is deterministic and de-duplicates by id, so
    re-importing all shards gives what an incremental import would, and DVC keeps every earlier version.
    """
    out = fresh_dir(stage_out_dir("ingest", cfg))
    source = stage_path(cfg, "base_model") if cfg.data.source == "demo" else stage_path(cfg, "source")
    with stage_run(cfg, "ingest", out_dir=out, upstream=[source]) as tracker:
        if cfg.data.source == "demo":
            from prefalign.data.demo_pool import build_demo_pool

            summary = build_demo_pool(cfg, out)
        else:
            from prefalign.data.importers import import_preferences

            result = import_preferences(
                cfg.data.source, _import_input(cfg), out, data=cfg.data, validation=cfg.validation
            )
            summary = {**result.to_dict(), **{f"imported_{table}": n for table, n in result.imported.items()}}
        tracker.log_metrics({f"ingest/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _import_input(cfg: PipelineConfig) -> Path:
    """The file or folder the importer reads: ``paths.source``, or its one data file for single-file formats."""
    source = stage_path(cfg, "source")
    if cfg.data.source == "pickapic" or source.is_file():
        return source  # a folder of shards is Pick-a-Pic's native layout
    suffix = {"hpd": ".json", "jsonl": ".jsonl"}[cfg.data.source]
    found = sorted(source.glob(f"*{suffix}"))
    if len(found) != 1:
        raise ValueError(
            f"{source}: data.source={cfg.data.source!r} needs exactly one *{suffix} file here, found {len(found)}"
        )
    return found[0]
