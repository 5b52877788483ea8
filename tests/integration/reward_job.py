"""Subprocess entry of the reward trainer's process tests: the tiny CLIP reward model on the synthetic demo
pairs of ``test_reward_training``, final weights written to ``--out`` (safetensors) by process 0.

Run plainly (one process; the SIGKILL test) or under ``accelerate launch`` (the two-process test). With
``--experts-params``, every process then takes DRO's experts from ``shared_experts`` and writes the list it
received to ``<out>.experts.rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step and process")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--on-demand", action="store_true", help="decode images batch by batch (budget 0)")
    parser.add_argument("--experts-params", type=Path, default=None)
    parser.add_argument("--expect-processes", type=int, default=1)
    args = parser.parse_args()

    from test_reward_training import _build_demo_pairs

    from prefalign.config import RewardConfig, load_config
    from prefalign.models.reward_model import load_backbone
    from prefalign.models.text import build_tokenizer
    from prefalign.training.reward import train_reward_model
    from prefalign.training.reward_data import RewardData
    from prefalign.training.reward_stage import shared_experts
    from prefalign.world.grammar import vocabulary_words

    logging.basicConfig(level=logging.INFO)  # the resume and expert-selection lines are what the tests read
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    demo = _build_demo_pairs()
    budget = {"resize_to": 16, "preload_max_bytes": 0} if args.on_demand else {}

    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name, **budget)

    cfg = RewardConfig(
        steps=args.steps, batch_size=args.batch_size, lr=5e-4, eval_every=args.eval_every, patience=10, ema_decay=0.9
    )
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)

    def slow(metrics: dict, step: int) -> None:
        time.sleep(args.step_delay)  # widens the window between checkpoints for the SIGKILL; no effect on maths

    train_reward_model(
        scorer,
        cfg,
        split("train"),
        split("val"),
        seed=0,
        progress=False,
        log_metrics=slow,
        checkpoint_dir=args.checkpoints,
    )
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    assert world == args.expect_processes, f"{world} processes, expected {args.expect_processes}"
    if rank == 0:
        save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(args.out))
    if args.experts_params is not None:
        experts = shared_experts(load_config(args.experts_params))
        received = {"image": experts.image.tolist(), "prompt": experts.prompt.tolist()}
        Path(f"{args.out}.experts.rank{rank}.json").write_text(json.dumps(received))


if __name__ == "__main__":
    main()
