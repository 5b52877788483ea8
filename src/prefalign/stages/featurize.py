"""Stage ``featurize``: cached VAE latents and text embeddings."""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    stage_out_dir,
    stage_path,
    torch_setup,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_featurize(cfg: PipelineConfig) -> dict[str, Any]:
    """Cache VAE latents of every referenced image and text embeddings of every prompt (+ the empty one)."""
    from prefalign.training.features import compute_features

    torch_setup(cfg)
    out = fresh_dir(stage_out_dir("featurize", cfg))
    with stage_run(
        cfg, "featurize", out_dir=out, upstream=[stage_path(cfg, "preferences"), stage_path(cfg, "base_model")]
    ) as tracker:
        summary = compute_features(cfg.base_model_dir(), stage_path(cfg, "preferences"), out, cfg.featurize)
        tracker.log_metrics({"featurize/images": summary["images"], "featurize/prompts": summary["prompts"]})
    return summary
