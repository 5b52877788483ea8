"""Does DRO earn its place? Base, DPO, SFT on DRO's experts, DRO from base and DRO from DPO, over training seeds.

Run after the pipeline (it reads the world, the features, the preference pairs, the base and the reward
model as they are: only the *training* seed changes). For every training seed it trains, with the
budgets of ``params.yaml``:

- ``dpo``: offline Diffusion-DPO from the base (``dpo`` section);
- ``sft_experts``: the DRO paper's "w/ SFT" control: the same top-K experts, adapter, steps, learning
  rate, prompt dropout and EMA as DRO, with the plain denoising loss, from ``dro.init_from``;
- ``dro_base`` and ``dro_dpo``: hybrid Diffusion-DRO from the base and from the DPO model of the same seed;
- ``kto`` (only when asked for, ``--variants ...,kto``): Diffusion-KTO from the base on the pool's binary
  feedback (``kto`` section), the thumbs-up/down counterpart of DPO;

then evaluates every model as the pipeline's evaluation does (held-out prompts, the same keyed image
seeds, the oracle and the strict per-attribute reading) and writes oracle means, accuracies and win rates
with 95% prompt-bootstrap intervals per seed, their spread across seeds, and whether each claim holds for
every seed. The base is trained by no seed: it is evaluated once.

    python benchmarks/bench_efficacy.py --seeds 0,1,2 --json benchmarks/results/bench_efficacy_demo.json \
        --figure benchmarks/results/bench_efficacy_demo.png
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "dpo", "sft_experts", "dro_base", "dro_dpo", "kto")
DEFAULT_VARIANTS = VARIANTS[:5]  # kto on request: it adds a DPO-sized training per seed to the 40 minutes
# (a, b): "a beats b" is a claim tested on every training seed, a and b trained with the same seed.
CLAIMS = (
    ("dpo", "base"),
    ("sft_experts", "base"),
    ("dro_base", "base"),
    ("dro_dpo", "base"),
    ("dro_dpo", "dpo"),
    ("dro_dpo", "sft_experts"),
    ("dro_base", "sft_experts"),
    ("dro_dpo", "dro_base"),
    ("kto", "base"),
    ("dpo", "kto"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value for this run, as `prefalign stage -S`",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--figure", type=Path, help="draw oracle means and accuracies into this PNG")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        fail(f"unknown variant {unknown[0]!r} in --variants; known: {','.join(VARIANTS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        fail("--seeds names no seed")
    return args


def fail(message: str) -> None:
    """One line on stderr and exit status 2, before anything is trained."""
    print(f"bench_efficacy: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_inputs(cfg) -> None:
    """Fail before any training when an input of the pipeline is missing, naming it."""
    needed = {
        "base model": cfg.base_model_dir() / "model_index.json",
        "features": cfg.paths.resolve("features"),
        "preference pairs": cfg.paths.resolve("preferences") / "pairs.parquet",
        "binary feedback": cfg.paths.resolve("preferences") / "feedback.parquet",
        "reward model": cfg.paths.resolve("reward"),
        "world prompts": cfg.paths.resolve("world") / "prompts.parquet",
    }
    missing = [f"{name} ({path})" for name, path in needed.items() if not path.exists()]
    if missing:
        fail(f"run the pipeline first; missing {', '.join(missing)}")
    if cfg.model.preset != "demo":
        fail(f"the oracle exists only on the demo world (model.preset is {cfg.model.preset!r})")


class Evaluator:
    """Every model on the evaluation's (prompt, seed) grid: oracle score and strict correctness per image."""

    def __init__(self, cfg) -> None:
        from prefalign.evaluation.report import test_prompts
        from prefalign.models.sampling import eval_grid

        self.cfg = cfg
        self.flat, self.image_seeds, self.prompt_ids = eval_grid(
            test_prompts(cfg), cfg.eval.images_per_prompt, cfg.seed
        )

    def __call__(self, unet, desc: str) -> dict[str, Any]:
        from prefalign.models.diffusion import load_base_pipeline
        from prefalign.models.sampling import generate
        from prefalign.world.attributes import attribute_correctness
        from prefalign.world.oracle import oracle_scores

        pipe = load_base_pipeline(self.cfg.base_model_dir())
        if unet is not None:
            pipe.unet = unet
        images = generate(
            pipe,
            self.flat,
            self.image_seeds,
            steps=self.cfg.eval.sample_steps,
            guidance=self.cfg.eval.guidance,
            resolution=self.cfg.model.resolution,
            desc=desc,
        )
        return {
            "oracle": oracle_scores(self.flat, images),
            "correct": attribute_correctness(self.flat, images, image_size=self.cfg.model.resolution),
        }


def train_variants(cfg, variants: list[str], seed: int, evaluate: Evaluator, seconds: dict) -> dict[str, Any]:
    """Train and evaluate the variants of one training seed; DPO is trained when a variant starts from it."""
    import pandas as pd
    import torch

    from prefalign.data.prepare import drop_ties
    from prefalign.models.diffusion import load_base_unet
    from prefalign.stages._policy import load_pairs
    from prefalign.training.features import load_features
    from prefalign.training.policy import merge_and_strip_lora, train_dpo, train_dro, train_kto, train_sft
    from prefalign.training.reward_stage import select_experts

    base_dir, feats = cfg.base_model_dir(), load_features(cfg.paths.resolve("features"))
    experts = select_experts(cfg)
    shas, prompts = experts.image.tolist(), experts.prompt.tolist()
    out: dict[str, Any] = {}
    needs_dpo = (
        "dpo" in variants or "dro_dpo" in variants or ("sft_experts" in variants and cfg.dro.init_from == "dpo")
    )

    def timed(name: str, train) -> torch.nn.Module:
        start = time.perf_counter()
        unet = train()
        merge_and_strip_lora(unet)
        seconds.setdefault(name, []).append(round(time.perf_counter() - start, 1))
        return unet

    dpo_unet = None
    if needs_dpo:
        pairs, _ = drop_ties(load_pairs(cfg, "train"))

        def dpo():
            unet = load_base_unet(base_dir)
            train_dpo(
                unet, pairs.image_w.tolist(), pairs.image_l.tolist(), pairs.prompt.tolist(), feats, cfg.dpo, seed=seed
            )
            return unet

        dpo_unet = timed("dpo", dpo)
        if "dpo" in variants:
            out["dpo"] = evaluate(dpo_unet, f"evaluate dpo seed {seed}")
    if "kto" in variants:
        feedback = pd.read_parquet(cfg.paths.resolve("preferences") / "feedback.parquet")
        feedback = feedback[feedback.split == "train"]

        def kto():
            unet = load_base_unet(base_dir)
            judged = (feedback.image.tolist(), feedback.prompt.tolist(), feedback.desirable.tolist())
            train_kto(unet, *judged, feats, cfg.kto, seed=seed)
            return unet

        out["kto"] = evaluate(timed("kto", kto), f"evaluate kto seed {seed}")
    start_of = {"dpo": lambda: copy.deepcopy(dpo_unet), "base": lambda: load_base_unet(base_dir)}
    recipes = {
        "sft_experts": (train_sft, cfg.dro.init_from),
        "dro_base": (train_dro, "base"),
        "dro_dpo": (train_dro, "dpo"),
    }
    for name, (trainer, init) in recipes.items():
        if name not in variants:
            continue

        def train(trainer=trainer, init=init):
            unet = start_of[init]()
            trainer(unet, shas, prompts, feats, cfg.dro, seed=seed)
            return unet

        out[name] = evaluate(timed(name, train), f"evaluate {name} seed {seed}")
    return out


def summarize(results: dict[str, dict[int, dict]], prompt_ids: np.ndarray, cfg) -> dict[str, Any]:
    """Per-seed oracle means, accuracies and win rates with intervals, spread across seeds, and verdicts."""
    from prefalign.evaluation.metrics import mean_ci, win_rate

    boot = {"n_boot": cfg.eval.bootstrap, "seed": cfg.seed}
    models: dict[str, Any] = {}
    for name, by_seed in results.items():
        per_seed = {
            str(s): {
                "oracle_mean": mean_ci(r["oracle"], prompt_ids, **boot),
                "accuracy": {k: round(float(np.mean(v)), 4) for k, v in r["correct"].items()},
            }
            for s, r in by_seed.items()
        }
        means = np.array([p["oracle_mean"]["mean"] for p in per_seed.values()])
        attrs = next(iter(per_seed.values()))["accuracy"]
        models[name] = {
            "per_seed": per_seed,
            "oracle_mean": {
                "mean": float(means.mean()),
                "std_over_seeds": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                "min": float(means.min()),
                "max": float(means.max()),
            },
            "accuracy": {
                k: {
                    "mean": float(np.mean([p["accuracy"][k] for p in per_seed.values()])),
                    "min": float(np.min([p["accuracy"][k] for p in per_seed.values()])),
                    "max": float(np.max([p["accuracy"][k] for p in per_seed.values()])),
                }
                for k in attrs
            },
        }
    claims: dict[str, Any] = {}
    for a, b in CLAIMS:
        if a not in results or b not in results:
            continue
        seeds = sorted(results[a])
        # The base has one evaluation; a trained model is paired with the b of its own training seed.
        other = {s: results[b][s if b != "base" else next(iter(results[b]))] for s in seeds}
        per_seed = {str(s): win_rate(results[a][s]["oracle"], other[s]["oracle"], prompt_ids, **boot) for s in seeds}
        position = {
            str(s): mean_ci(
                results[a][s]["correct"]["position"].astype(np.float64) - other[s]["correct"]["position"],
                prompt_ids,
                **boot,
            )
            for s in seeds
        }
        claims[f"{a}_vs_{b}"] = {
            "oracle_win_rate": per_seed,
            "position_delta": position,
            "holds_every_seed": all(r["ci_low"] > 0.5 for r in per_seed.values()),
            "fails_every_seed": all(r["ci_high"] < 0.5 for r in per_seed.values()),
            "rate_mean": float(np.mean([r["rate"] for r in per_seed.values()])),
            "rate_min": float(np.min([r["rate"] for r in per_seed.values()])),
            "rate_max": float(np.max([r["rate"] for r in per_seed.values()])),
        }
    return {"models": models, "claims": claims}


def draw(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Oracle mean per variant with each seed as a dot, and per-attribute accuracy (mean, seed range)."""
    from prefalign.evaluation.figures import _figure, _save

    names = list(summary["models"])
    attrs = ["color", "background", "position", "size", "shape", "all"]
    fig = _figure(13, 4.2)
    left, right = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, (2, 3))
    for i, name in enumerate(names):
        seeds = summary["models"][name]["per_seed"]
        values = [p["oracle_mean"]["mean"] for p in seeds.values()]
        left.bar(i, np.mean(values), color=f"C{i}", alpha=0.5)
        left.scatter([i] * len(values), values, color=f"C{i}", zorder=3, s=18)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    lows = [min(p["oracle_mean"]["mean"] for p in summary["models"][n]["per_seed"].values()) for n in names]
    left.set_ylim(min(lows) - 0.03, None)
    left.set_ylabel("oracle mean (dots: training seeds)")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        acc = summary["models"][name]["accuracy"]
        means = np.array([acc[a]["mean"] for a in attrs])
        err = np.array(
            [[acc[a]["mean"] - acc[a]["min"] for a in attrs], [acc[a]["max"] - acc[a]["mean"] for a in attrs]]
        )
        right.bar(
            np.arange(len(attrs)) + (i - (len(names) - 1) / 2) * width,
            means,
            width,
            yerr=err,
            capsize=2,
            color=f"C{i}",
            label=name,
        )
    right.set_xticks(range(len(attrs)), attrs)
    right.set_ylim(0, 1.2)  # room above the 1.0 bars for the legend
    right.set_ylabel("strict accuracy (bars: min-max over seeds)")
    right.legend(ncol=len(names), fontsize=8, loc="upper center")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from prefalign.config import ConfigError, load_config, parse_override
    from prefalign.runtime import emit_json

    try:
        cfg = load_config(args.params, dict(parse_override(o) for o in args.set))
    except ConfigError as err:
        fail(str(err))
    check_inputs(cfg)
    evaluate = Evaluator(cfg)
    start, seconds = time.perf_counter(), {}
    results: dict[str, dict[int, dict]] = {}
    if "base" in args.variants:
        t0 = time.perf_counter()
        results["base"] = {cfg.seed: evaluate(None, "evaluate base")}
        seconds["evaluate_base"] = [round(time.perf_counter() - t0, 1)]
    for seed in args.seeds:
        for name, result in train_variants(cfg, args.variants, seed, evaluate, seconds).items():
            results.setdefault(name, {})[seed] = result
    summary = summarize(results, evaluate.prompt_ids, cfg)
    payload = {
        "training_seeds": args.seeds,
        "evaluation": {
            "prompts": int(evaluate.prompt_ids.max() + 1),
            "images_per_prompt": cfg.eval.images_per_prompt,
            "sample_steps": cfg.eval.sample_steps,
            "guidance": cfg.eval.guidance,
        },
        "budgets": {
            "dpo": {"steps": cfg.dpo.steps, "batch_size": cfg.dpo.batch_size, "lr": cfg.dpo.lr, "beta": cfg.dpo.beta},
            "dro": {
                "steps": cfg.dro.steps,
                "batch_size": cfg.dro.batch_size,
                "lr": cfg.dro.lr,
                "top_k": cfg.dro.top_k,
                "per_prompt_cap": cfg.dro.per_prompt_cap,
            },
            "sft_experts": {"init_from": cfg.dro.init_from, "same_as": "dro"},
            "kto": {"steps": cfg.kto.steps, "batch_size": cfg.kto.batch_size, "lr": cfg.kto.lr, "beta": cfg.kto.beta},
        },
        **summary,
        "train_seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    if args.figure:
        draw(
            summary,
            args.figure,
            f"demo world, {len(args.seeds)} training seeds, "
            f"{payload['evaluation']['prompts']} held-out prompts x {cfg.eval.images_per_prompt} images",
        )
    emit_json(payload, args.json)


if __name__ == "__main__":
    main()
