"""Image generation with fixed per-image seeds, through the stock diffusers pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from prefalign.seeding import image_seed


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    resolution: int,
    batch_size: int = 128,
    desc: str = "generate",
) -> np.ndarray:
    """uint8 (N, H, W, 3) images, image i from ``prompts[i]`` with its own generator seeded ``seeds[i]``.

    One generator per image makes image i the same whatever the batch it falls in, so two models are
    compared on identical initial noise.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in tqdm(
        range(0, len(prompts), batch_size), desc=desc, mininterval=5, disable=len(prompts) <= batch_size
    ):
        chunk = slice(start, start + batch_size)
        images = pipe(
            prompt=list(prompts[chunk]),
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[chunk]],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            output_type="np",
        ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)


def eval_grid(prompts: Sequence[str], images_per_prompt: int, seed: int) -> tuple[list[str], list[int], np.ndarray]:
    """The (prompt, seed) pairs of an evaluation: every prompt ``images_per_prompt`` times, keyed seeds."""
    flat_prompts, seeds, prompt_ids = [], [], []
    for pid, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            flat_prompts.append(prompt)
            seeds.append(image_seed(seed, prompt, i) % 2**63)
            prompt_ids.append(pid)
    return flat_prompts, seeds, np.asarray(prompt_ids)
