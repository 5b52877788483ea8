"""How close the reward model comes to the demo world's Bayes rate, and how close any model could come.

Run after the pipeline has built ``data/preferences`` and trained ``models/reward``. In one run, on the
same held-out test pairs, it measures side by side:

- the Bayes rate: the oracle's own expected accuracy;
- the perception ceiling (``prefalign.evaluation.reward_ceiling``): a learner given the oracle's own
  measurements of every image, trained with Bradley–Terry on the same training pairs and selected on the
  validation loss, over several seeds;
- the pipeline's reward model, scored afresh from ``models/reward``.

Each with the accuracy on the drawn labels and the expected accuracy (averaged over annotator draws,
so the gaps carry no label-sampling error). Prints JSON; ``--figure`` draws the accuracies as bars.

    OMP_NUM_THREADS=1 python benchmarks/bench_reward_ceiling.py --seeds 3 --json reports/bench_reward_ceiling.json \
        --figure reports/reward_ceiling.png
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from prefalign.config import load_config
from prefalign.evaluation.figures import accuracy_bars
from prefalign.evaluation.metrics import pairwise_accuracy
from prefalign.evaluation.reward_ceiling import perception_ceiling
from prefalign.models.reward_model import RewardScorer
from prefalign.runtime import emit_json
from prefalign.training.reward_scoring import score_split
from prefalign.training.reward_stage import oracle_metrics_of_split, reward_splits

REPO = Path(__file__).resolve().parents[1]
TARGET_POINTS = 0.015  # the reward model's expected accuracy within 1.5 points of the perception ceiling's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="ceiling learners, seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps of each ceiling learner")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--figure", type=Path, help="draw the accuracies as bars into this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config(args.params)
    if cfg.model.preset != "demo":
        raise SystemExit("the ceiling needs the demo world's oracle (model.preset: demo)")
    splits = reward_splits(cfg)
    tau = cfg.world.annotator_tau

    scorer = RewardScorer.load(cfg.paths.resolve("reward"))
    scores = score_split(scorer, splits["test"])
    accuracy, n_pairs, _ = pairwise_accuracy(scores.score_w, scores.score_l, scores.label)
    model = {"pairwise_accuracy": accuracy, **oracle_metrics_of_split(cfg, splits["test"], scores)}
    bayes = model.pop("bayes_accuracy")

    ceilings, start = [], time.perf_counter()
    for seed in range(args.seeds):
        result = perception_ceiling(
            splits["train"], splits["val"], splits["test"], tau=tau, seed=seed, steps=args.steps
        )
        ceilings.append(result)
    seconds = time.perf_counter() - start

    def summary(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}

    ceiling_expected = summary([c.expected_accuracy for c in ceilings])

    report = {
        "n_test_pairs": n_pairs,
        "n_train_pairs": splits["train"].n_pairs,
        "bayes_accuracy": bayes,
        "target": ceiling_expected["mean"] - TARGET_POINTS,
        "meets_target": bool(model["expected_accuracy"] >= ceiling_expected["mean"] - TARGET_POINTS),
        "reward_model": model,
        "perception_ceiling": {
            "seeds": args.seeds,
            "steps": args.steps,
            "seconds": round(seconds, 1),
            "expected_accuracy": ceiling_expected,
            "pairwise_accuracy": summary([c.pairwise_accuracy for c in ceilings]),
            "oracle_agreement": summary([c.oracle_agreement for c in ceilings]),
            "best_steps": [c.best_step for c in ceilings],
        },
        "gap_points": {  # expected accuracy, so no label-sampling noise in the differences
            "bayes_minus_ceiling": 100 * (bayes - ceiling_expected["mean"]),
            "ceiling_minus_reward_model": 100 * (ceiling_expected["mean"] - model["expected_accuracy"]),
        },
    }
    emit_json(report, args.json)
    if args.figure:
        accuracy_bars(
            {
                "reward model (drawn labels)": [model["pairwise_accuracy"]],
                "reward model (expected)": [model["expected_accuracy"]],
                "perception ceiling (drawn labels)": [c.pairwise_accuracy for c in ceilings],
                "perception ceiling (expected)": [c.expected_accuracy for c in ceilings],
            },
            args.figure,
            title=f"reward accuracy on {n_pairs} held-out pairs of the demo world",
            reference=bayes,
            target=ceiling_expected["mean"] - TARGET_POINTS,
        )


if __name__ == "__main__":
    main()
