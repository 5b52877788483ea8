"""Stage ``featurize``: cached VAE latents and text embeddings."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    stage_out_dir,
    stage_path,
    torch_setup,
)
from prefalign.tracking import NullTracker, stage_run

log = logging.getLogger(__name__)


def run_featurize(cfg: PipelineConfig) -> dict[str, Any]:
    """Cache VAE latents of every referenced image and text embeddings of every prompt (+ the empty one).

    Runs in one process or under ``accelerate launch``: rank 0 empties the output folder and records the
    MLflow run; every process then encodes its own latent shards into the folder.
    """
    import torch
    from accelerate import PartialState

    from prefalign.models.diffusion import check_base_resolution
    from prefalign.training.features import compute_features

    torch_setup(cfg)
    check_base_resolution(cfg.model, cfg.base_model_dir())  # a json read: fails before any weights load
    state = PartialState(cpu=not torch.cuda.is_available())
    out = stage_out_dir("featurize", cfg)
    upstream = [stage_path(cfg, "preferences"), stage_path(cfg, "base_model")]
    run = (
        stage_run(cfg, "featurize", out_dir=fresh_dir(out), upstream=upstream)
        if state.is_main_process
        else contextlib.nullcontext(NullTracker())
    )
    with run as tracker:
        state.wait_for_everyone()  # the folder is empty before any process writes a shard into it
        summary = compute_features(
            cfg.base_model_dir(), stage_path(cfg, "preferences"), out, cfg.featurize, resolution=cfg.model.resolution
        )
        tracker.log_metrics({"featurize/images": summary["images"], "featurize/prompts": summary["prompts"]})
    return summary
