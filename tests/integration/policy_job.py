"""Subprocess entry of the resume and multi-process tests: policy training on the tiny config, no data files.

Builds the tiny UNet of ``model`` and synthetic cached features from keyed seeds (no network, no DVC,
no pipeline folders), trains DPO or DRO with the trainer, and writes the final trainable weights of the
main process to ``--out``. Run as a plain script or under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from prefalign.config import load_config, parse_override
from prefalign.runtime import apply_offline_defaults, configure_logging

REPO = Path(__file__).resolve().parents[2]
LATENT_SIZE = 8  # 16 px through the tiny VAE's one downsampling
TEXT_TOKENS = 8


def synthetic_features(n_images: int, n_prompts: int, text_hidden: int, seed: int):
    """Random latents and text embeddings in the trainer's ``Features`` layout (last text row: empty prompt)."""
    from prefalign.training.features import Features

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n_images, 4, LATENT_SIZE, LATENT_SIZE, generator=gen)
    text = torch.randn(n_prompts + 1, TEXT_TOKENS, text_hidden, generator=gen)
    shas = [f"img{i}" for i in range(n_images)]
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    return (
        Features(latents, {s: i for i, s in enumerate(shas)}, text, {p: i for i, p in enumerate(prompts)}, n_prompts),
        shas,
        prompts,
    )


def tiny_unet(cfg):
    from prefalign.models.diffusion import build_tiny_unet

    torch.manual_seed(cfg.seed)
    return build_tiny_unet(cfg.model, LATENT_SIZE)


def train(method: str, cfg, checkpoints: Path | None, step_delay: float):
    from prefalign.training.policy import train_dpo, train_dro

    feats, shas, prompts = synthetic_features(10, 5, cfg.model.text_hidden, cfg.seed)
    unet = tiny_unet(cfg)

    def slow_metrics(metrics: dict[str, float], step: int) -> None:
        # Widens the window between checkpoints so that the test's SIGKILL lands mid-run; no effect on maths.
        time.sleep(step_delay)

    kwargs = {"seed": cfg.seed, "checkpoint_dir": checkpoints, "log_metrics": slow_metrics, "log_every": 1}
    if method == "dpo":
        winners = [shas[i % 10] for i in range(12)]
        losers = [shas[(3 * i + 1) % 10] for i in range(12)]
        train_dpo(unet, winners, losers, [prompts[i % 5] for i in range(12)], feats, cfg.dpo, **kwargs)
    else:
        train_dro(unet, shas[:8], [prompts[i % 5] for i in range(8)], feats, cfg.dro, **kwargs)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["dpo", "dro"], default="dpo")
    parser.add_argument("--out", type=Path, required=True, help="safetensors file of the final trainable weights")
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--expect-processes", type=int, default=1)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], help="dotted override, e.g. dpo.steps=8")
    args = parser.parse_args()

    apply_offline_defaults()
    configure_logging(logging.INFO)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    # `accelerate launch --cpu --num_processes 2` silently runs one process: check what we really got.
    assert state.num_processes == args.expect_processes, (
        f"{state.num_processes} processes, expected {args.expect_processes}"
    )
    cfg = load_config(REPO / "params.yaml", dict(parse_override(item) for item in args.set))
    unet = train(args.method, cfg, args.checkpoints, args.step_delay)
    if state.is_main_process:
        from safetensors.torch import save_file

        trainable = {n: p.detach().contiguous() for n, p in unet.named_parameters() if "lora_" in n}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(trainable, str(args.out))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
