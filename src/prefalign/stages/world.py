"""Stage ``world``: the demo world's prompt table and its captioned pretraining renderings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig
from prefalign.stages._common import (
    fresh_dir,
    stage_out_dir,
)
from prefalign.tracking import stage_run

log = logging.getLogger(__name__)


def run_world(cfg: PipelineConfig) -> dict[str, Any]:
    """Demo world: the prompt table with splits, and partly mis-captioned noisy renderings for pretraining."""
    from prefalign.data.prepare import assign_split
    from prefalign.seeding import numpy_rng
    from prefalign.world.grammar import all_attributes, corrupt, prompt_of
    from prefalign.world.render import render

    out = fresh_dir(stage_out_dir("world", cfg))
    with stage_run(cfg, "world", out_dir=out) as tracker:
        attrs = all_attributes()
        table = pd.DataFrame([{**vars(a), "prompt": prompt_of(a)} for a in attrs])
        table["split"] = [assign_split(p, train=cfg.data.split_train, val=cfg.data.split_val) for p in table.prompt]
        table.to_parquet(out / "prompts.parquet", index=False)
        rng = numpy_rng(cfg.seed, "world-pretrain")
        picks = rng.integers(0, len(attrs), cfg.world.n_pretrain_images)
        images, captions, wrong = [], [], 0
        for k in picks:
            true = attrs[k]
            caption_attrs = corrupt(true, rng) if rng.random() < cfg.world.caption_error_rate else true
            wrong += caption_attrs != true
            sigma = rng.uniform(0, cfg.world.pixel_noise_max)
            images.append(render(true, cfg.world.image_size, noise_sigma=sigma, rng=rng))
            captions.append(prompt_of(caption_attrs))
        np.savez_compressed(out / "pretrain.npz", images=np.stack(images), captions=np.array(captions))
        summary = {
            "prompts": len(table),
            "splits": table.split.value_counts().to_dict(),
            "pretrain_images": len(images),
            "wrong_captions": int(wrong),
        }
        tracker.log_metrics({"world/pretrain_images": len(images), "world/wrong_captions": int(wrong)})
    return summary
