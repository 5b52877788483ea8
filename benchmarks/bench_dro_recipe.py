"""DRO's recipe on the pipeline's run: train DRO with one override set per variant, evaluate each like
``evaluate`` (held-out prompts, keyed image seeds, oracle and strict accuracy) and compare it with the
pipeline's DPO model (oracle win rate and position difference, 95% prompt-bootstrap intervals).

Run after the pipeline, in its folder (one training seed: the pipeline's). ``bench_efficacy.py`` checks a
recipe across training seeds; this is the quick sweep that picks which recipes to check.

    python benchmarks/bench_dro_recipe.py --json OUT ["no EMA, lr 1e-3, 450 steps" ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "lr 2e-3": {"dro.lr": 2e-3},
    "450 steps": {"dro.steps": 450},
    "K 200, cap 1": {"dro.top_k": 200, "dro.per_prompt_cap": 1},
    "sync_every 4, recorded target": {"dro.sync_every": 4, "dro.policy_target": "recorded"},
    "no EMA, lr 1e-3": {"dro.ema_decay": 0.0, "dro.lr": 1e-3},
    "from base, no EMA, lr 1e-3": {"dro.init_from": "base", "dro.ema_decay": 0.0, "dro.lr": 1e-3},
    "no EMA, lr 1e-3, 450 steps": {"dro.ema_decay": 0.0, "dro.lr": 1e-3, "dro.steps": 450},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"names among: {'; '.join(VARIANTS)} (default: all)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"bench_dro_recipe: unknown variant {unknown[0]!r}; known: {'; '.join(VARIANTS)}")

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_efficacy import Evaluator, check_inputs

    from prefalign.config import load_config
    from prefalign.evaluation.metrics import mean_ci, win_rate
    from prefalign.models.diffusion import unet_with_policy
    from prefalign.runtime import emit_json
    from prefalign.training.features import load_features
    from prefalign.training.policy import merge_and_strip_lora, train_dro
    from prefalign.training.reward_stage import select_experts

    cfg = load_config(args.params)
    check_inputs(cfg)
    evaluate, dpo_dir = Evaluator(cfg), cfg.paths.resolve("dpo")
    dpo = evaluate(unet_with_policy(cfg.base_model_dir(), dpo_dir), "evaluate dpo")
    feats, pid = load_features(cfg.paths.resolve("features")), evaluate.prompt_ids
    boot = {"n_boot": cfg.eval.bootstrap, "seed": cfg.seed}

    def accuracy(result: dict) -> dict[str, float]:
        return {k: round(float(np.mean(v)), 4) for k, v in result["correct"].items()}

    report: dict[str, object] = {"dpo": {"oracle_mean": float(np.mean(dpo["oracle"])), "accuracy": accuracy(dpo)}}
    for name in args.variants or list(VARIANTS):
        variant = load_config(args.params, VARIANTS[name])
        experts = select_experts(variant)
        start = time.perf_counter()
        unet = unet_with_policy(cfg.base_model_dir(), dpo_dir if variant.dro.init_from == "dpo" else None)
        train_dro(unet, experts.image.tolist(), experts.prompt.tolist(), feats, variant.dro, seed=cfg.seed)
        merge_and_strip_lora(unet)
        seconds = round(time.perf_counter() - start, 1)
        result = evaluate(unet, f"evaluate {name}")
        position = result["correct"]["position"].astype(np.float64) - dpo["correct"]["position"]
        report[name] = {
            "overrides": VARIANTS[name],
            "train_seconds": seconds,
            "oracle_mean": float(np.mean(result["oracle"])),
            "vs_dpo": win_rate(result["oracle"], dpo["oracle"], pid, **boot),
            "position_vs_dpo": mean_ci(position, pid, **boot),
            "accuracy": accuracy(result),
        }
        print(name, json.dumps(report[name]), file=sys.stderr, flush=True)
    emit_json(report, args.json)


if __name__ == "__main__":
    main()
