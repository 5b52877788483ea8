"""The evaluation report: base and candidates on held-out prompts, same seeds, win rates with intervals."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig

log = logging.getLogger(__name__)

COMPARISONS = (("dpo", "base"), ("dro", "base"), ("dro", "dpo"))


def test_prompts(cfg: PipelineConfig) -> list[str]:
    """Held-out prompts: the world's test split on the demo, else the test split of the pairs."""
    world = cfg.paths.resolve("world") / "prompts.parquet"
    table = pd.read_parquet(world) if cfg.model.preset == "demo" else pd.read_parquet(
        cfg.paths.resolve("preferences") / "pairs.parquet")
    prompts = sorted(set(table.prompt[table.split == "test"]))
    if not prompts:
        raise ValueError(f"no held-out (test split) prompts in {world}")
    return prompts[: cfg.eval.n_prompts]


def policy_dirs(cfg: PipelineConfig) -> dict[str, Path | None]:
    return {"base": None, "dpo": cfg.paths.resolve("dpo"), "dro": cfg.paths.resolve("dro")}


def score_models(cfg: PipelineConfig, prompts: list[str]) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, dict]:
    """Generate with every model on the same (prompt, seed) grid; oracle (demo) and reward scores."""
    from prefalign.evaluation.generate import eval_grid, generate
    from prefalign.models.diffusion import load_policy_pipeline
    from prefalign.models.reward_model import RewardScorer

    flat, seeds, prompt_ids = eval_grid(prompts, cfg.eval.images_per_prompt, cfg.seed)
    scorer = RewardScorer.load(cfg.paths.resolve("reward"))
    scores: dict[str, dict[str, np.ndarray]] = {}
    images: dict[str, np.ndarray] = {}
    for name, policy_dir in policy_dirs(cfg).items():
        pipe = load_policy_pipeline(cfg.base_model_dir(), policy_dir)
        images[name] = generate(pipe, flat, seeds, steps=cfg.eval.sample_steps, guidance=cfg.eval.guidance,
                                resolution=cfg.model.resolution, desc=f"evaluate {name}")
        scores[name] = {"reward": scorer.score(flat, images[name])}
        if cfg.model.preset == "demo":
            from prefalign.world.oracle import oracle_scores

            scores[name]["oracle"] = oracle_scores(flat, images[name])
    return scores, prompt_ids, images


def evaluate_policies(cfg: PipelineConfig, out: Path, tracker) -> dict[str, Any]:
    """Write figures into ``out`` and return the ``reports/eval.json`` payload (DESIGN.md, "Reports")."""
    from prefalign.evaluation.figures import image_grid, win_rate_bars
    from prefalign.evaluation.metrics import mean_ci, win_rate

    prompts = test_prompts(cfg)
    scores, prompt_ids, images = score_models(cfg, prompts)
    metrics = list(scores["base"])
    boot = {"n_boot": cfg.eval.bootstrap, "seed": cfg.seed}
    models = {name: {f"{m}_{k}": v for m in metrics for k, v in mean_ci(s[m], prompt_ids, **boot).items()}
              for name, s in scores.items()}
    win_rates = {f"{a}_vs_{b}": {m: win_rate(scores[a][m], scores[b][m], prompt_ids, **boot) for m in metrics}
                 for a, b in COMPARISONS}
    primary = cfg.eval.metric_primary if cfg.eval.metric_primary in metrics else "reward"
    for name, values in models.items():
        tracker.log_metrics({f"eval/{name}_{k}": v for k, v in values.items()})
    for key, result in win_rates.items():
        tracker.log_metrics({f"eval/{key}_{m}_rate": r["rate"] for m, r in result.items()})
    first = np.arange(min(8, len(prompts))) * cfg.eval.images_per_prompt
    grid = np.concatenate([images[name][first] for name in scores])
    figures = [image_grid(grid, list(scores), len(first), out / "samples.png", title="held-out prompts, seed 0"),
               win_rate_bars({f"{k} ({m})": r for k, v in win_rates.items() for m, r in v.items()},
                             out / "win_rates.png", title="win rate (95% bootstrap CI over prompts)")]
    (out / "samples_prompts.txt").write_text("\n".join(prompts[: len(first)]) + "\n")
    for path in figures:
        tracker.log_artifact(path, "figures")
    return {
        "metric_primary": primary,
        "models": models,
        "win_rates": win_rates,
        "n_prompts": len(prompts),
        "images_per_prompt": cfg.eval.images_per_prompt,
        "seeds": f"image_seed(seed={cfg.seed}, prompt, i) for i < {cfg.eval.images_per_prompt}",
        "sampler": {"scheduler": "dpmsolver++", "steps": cfg.eval.sample_steps, "guidance": cfg.eval.guidance},
        "notes": "The reward model selected DRO's expert demonstrations, so its score is not an independent judge "
                 "of DRO; on the demo world the oracle is.",
    }
