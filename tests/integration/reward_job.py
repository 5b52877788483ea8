"""Subprocess entry of the reward trainer's SIGKILL test: the tiny CLIP reward model on the synthetic demo
pairs of ``test_reward_training``, final weights written to ``--out`` (safetensors)."""

from __future__ import annotations

import argparse
import logging
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
    args = parser.parse_args()

    from test_reward_training import _build_demo_pairs

    from prefalign.config import RewardConfig
    from prefalign.models.reward_model import load_backbone
    from prefalign.models.text import build_tokenizer
    from prefalign.training.reward import train_reward_model
    from prefalign.training.reward_data import RewardData
    from prefalign.world.grammar import vocabulary_words

    logging.basicConfig(level=logging.INFO)  # the resume line is what the test reads
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    demo = _build_demo_pairs()

    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name)

    cfg = RewardConfig(steps=60, batch_size=32, lr=5e-4, eval_every=20, patience=10, ema_decay=0.9)
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
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(args.out))


if __name__ == "__main__":
    main()
