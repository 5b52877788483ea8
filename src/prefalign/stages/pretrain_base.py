"""Stage ``pretrain_base``: train the demo model, or record an sd15 folder in place."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    log_figure,
    stage_out_dir,
    stage_path,
    torch_setup,
    write_json,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_pretrain_base(cfg: PipelineConfig) -> dict[str, Any]:
    """Train the tiny Stable Diffusion of the demo world and save it as a stock pipeline folder."""
    if cfg.model.preset == "sd15":
        return _record_local_base(cfg)
    if cfg.model.preset != "demo":
        raise ValueError(
            f"pretrain_base trains the demo model or records an sd15 folder; preset {cfg.model.preset!r} "
            "builds random weights for benchmarks/bench_align.py only"
        )
    from prefalign.evaluation.figures import image_grid, loss_curve
    from prefalign.models.sampling import eval_grid, generate
    from prefalign.training.pretrain import pretrain_base
    from prefalign.world.grammar import vocabulary_words

    torch_setup(cfg)
    out = fresh_dir(stage_out_dir("pretrain_base", cfg))
    world = np.load(stage_path(cfg, "world") / "pretrain.npz")
    with stage_run(cfg, "pretrain_base", out_dir=out, upstream=[stage_path(cfg, "world")]) as tracker:
        result = pretrain_base(
            world["images"],
            list(world["captions"]),
            vocabulary_words(),
            cfg.model,
            cfg.pretrain,
            seed=cfg.seed,
            log_metrics=tracker.log_metrics,
        )
        result.pipeline.save_pretrained(str(out), safe_serialization=True)
        every = pd.read_parquet(stage_path(cfg, "world") / "prompts.parquet").prompt.tolist()
        prompts = every[:: max(1, len(every) // 8)][:8]
        flat, seeds, _ = eval_grid(prompts, 8, cfg.seed)
        samples = generate(
            result.pipeline,
            flat,
            seeds,
            steps=cfg.eval.sample_steps,
            guidance=cfg.eval.guidance,
            resolution=cfg.model.resolution,
        )
        # Figures sit beside the pipeline files: stock from_pretrained ignores them.
        log_figure(tracker, image_grid(samples, prompts, 8, out / "base_samples.png", title="base model samples"))
        log_figure(tracker, loss_curve(result.history, out / "pretrain_loss.png", title="pretraining loss"))
        final = {k: float(np.mean(v[-50:])) for k, v in result.history.items() if v}
        tracker.log_metrics({f"pretrain/final_{k}": v for k, v in final.items()})
    return {"final_losses": final}


BASE_POINTER_FILE = "base_model.json"


def _record_local_base(cfg: PipelineConfig) -> dict[str, Any]:
    """sd15: check ``model.pretrained_path`` and record its fingerprint in ``paths.base_model``, no copy.

    The checks read json only (model_index.json, unet/ and vae/ configs): a wrong folder or a
    ``model.resolution`` the base was not trained at fails here, before featurize or a trainer loads weights.

    The pointer is this stage's DVC output, so replacing the weights in the folder changes the fingerprint
    and reruns everything downstream; the MLflow run carries it as lineage.
    """
    from prefalign.models.diffusion import check_base_resolution, check_pipeline_folder, folder_fingerprint

    folder = check_pipeline_folder(cfg.base_model_dir())
    found = check_base_resolution(cfg.model, folder)
    out = fresh_dir(stage_out_dir("pretrain_base", cfg))
    with stage_run(cfg, "pretrain_base", out_dir=out) as tracker:
        pointer: dict[str, Any] = {"source": str(folder), **folder_fingerprint(folder)}
        write_json(out / BASE_POINTER_FILE, pointer)
        tracker.log_params({"base_model/source": pointer["source"], "base_model/sha256": pointer["sha256"]})
    log.info(
        "pretrain_base: preset sd15 uses %s in place (sha256 %s, %d files; trained at %d px, training at %d px)",
        folder,
        pointer["sha256"][:12],
        pointer["files"],
        found.trained,
        cfg.model.resolution,
    )
    return pointer
