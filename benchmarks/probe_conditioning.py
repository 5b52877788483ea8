"""Does a base model read each attribute word of the demo prompts? JSON figures for docs/alignment_notes.md.

For a base pipeline folder it measures, on the held-out prompts of the demo world:
  * strict per-attribute accuracy of its samples (``prefalign.world.attributes``), test prompts x seeds;
  * the position confusion (named position vs nearest measured position);
  * same seed, only the position word changed (5 variants of each of 20 prompts): how far the measured
    centroid moves (pixels, std over the 5 variants) and how many variants land where named;
  * the relative change of the UNet's ε output when one word of the prompt changes, per attribute, at
    t = 900, 600, 300 from pure noise: ``||ε(c') − ε(c)|| / ||ε(c)||``.

    python benchmarks/probe_conditioning.py --base models/base --json OUT
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prefalign.config import PipelineConfig, load_config
from prefalign.evaluation.report import sample_accuracy
from prefalign.models.diffusion import load_policy_pipeline, make_scheduler
from prefalign.models.sampling import generate
from prefalign.runtime import emit_json
from prefalign.world.attributes import attribute_correctness
from prefalign.world.grammar import DOMAINS, POSITIONS, parse_prompt, prompt_of
from prefalign.world.oracle import measure
from prefalign.world.render import POSITION_XY

ROOT = Path(__file__).resolve().parents[1]


def position_confusion(images: np.ndarray, prompts: list[str]) -> list[list[int]]:
    centres = np.array(list(POSITION_XY.values()))
    named = [POSITIONS.index(parse_prompt(p).position) for p in prompts]
    measured = np.linalg.norm(measure(images).centroid[:, None] - centres[None], axis=-1).argmin(1)
    table = np.zeros((len(POSITIONS), len(POSITIONS)), int)
    np.add.at(table, (named, measured), 1)
    return table.tolist()


def position_word_swap(pipe, prompts: list[str], cfg: PipelineConfig) -> dict[str, float]:
    variants = [prompt_of(replace(parse_prompt(p), position=pos)) for p in prompts for pos in POSITIONS]
    seeds = [1000 + i // len(POSITIONS) for i in range(len(variants))]
    images = generate(
        pipe, variants, seeds, steps=cfg.eval.sample_steps, guidance=cfg.eval.guidance, resolution=cfg.model.resolution
    )
    centroids = measure(images).centroid.reshape(len(prompts), len(POSITIONS), 2)
    return {
        "centroid_std_px": round(float(centroids.std(1).mean() * 16), 3),
        "position_accuracy": round(float(attribute_correctness(variants, images)["position"].mean()), 4),
    }


@torch.no_grad()
def eps_sensitivity(pipe, prompts: list[str]) -> dict[str, dict[str, float]]:
    tok, text_encoder = pipe.tokenizer, pipe.text_encoder

    def embed(texts):
        ids = tok(
            texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids)[0]

    attrs = [parse_prompt(p) for p in prompts]
    noise = torch.randn(len(attrs), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = make_scheduler("ddpm")
    cond = embed([prompt_of(a) for a in attrs])
    out = {}
    for t in (900, 600, 300):
        tt = torch.full((len(attrs),), t)
        x_t = scheduler.add_noise(torch.zeros_like(noise), noise, tt)
        eps = pipe.unet(x_t, tt, encoder_hidden_states=cond).sample
        row = {}
        for name, values in DOMAINS.items():
            other = [replace(a, **{name: next(v for v in values if v != getattr(a, name))}) for a in attrs]
            changed = pipe.unet(x_t, tt, encoder_hidden_states=embed([prompt_of(o) for o in other])).sample
            row[name] = round(float((changed - eps).norm() / eps.norm()), 4)
        out[f"t{t}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="sampler settings (eval.*)")
    parser.add_argument("--base", type=Path, default=ROOT / "models/base", help="base pipeline folder")
    parser.add_argument("--policy", type=Path, default=None, help="LoRA or unet/ folder applied to the base")
    parser.add_argument("--world", type=Path, default=ROOT / "data/world", help="demo world folder (prompt splits)")
    parser.add_argument("--seeds", type=int, default=4, help="samples per test prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    table = pd.read_parquet(args.world / "prompts.parquet")
    prompts = sorted(table.prompt[table.split == "test"])
    pipe = load_policy_pipeline(args.base, args.policy)
    cfg = load_config(args.params)
    acc, images, flat = sample_accuracy(
        pipe,
        prompts,
        args.seeds,
        args.seed,
        steps=cfg.eval.sample_steps,
        guidance=cfg.eval.guidance,
        resolution=cfg.model.resolution,
    )
    result = {
        "base": str(args.base),
        "policy": str(args.policy) if args.policy else None,
        "n_prompts": len(prompts),
        "seeds_per_prompt": args.seeds,
        "accuracy": acc,
        "position_confusion": {"order": list(POSITIONS), "rows_named_cols_measured": position_confusion(images, flat)},
        "position_word_swap": position_word_swap(pipe, prompts[:20], cfg),
        "eps_relative_change": eps_sensitivity(pipe, prompts[:20]),
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
