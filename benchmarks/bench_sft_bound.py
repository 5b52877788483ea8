"""Upper bound of what the DPO adapter can learn: supervised fine-tuning on clean renderings.

The same LoRA (``dpo.lora``), the same budget (``dpo.steps`` x ``dpo.batch_size``, ``dpo.lr``) trained with
the plain ε-prediction loss on clean renderings of the *train* prompts (every attribute right), then the
strict per-attribute accuracy on the held-out prompts. If this cannot move an attribute, no preference
method with the same adapter and budget will. (SFT on the pool's top images is the DRO paper's control,
in bench_efficacy.py; this is a bound, not a control.)

    python benchmarks/bench_sft_bound.py [--params params.yaml] [--full] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prefalign.config import PipelineConfig, load_config
from prefalign.evaluation.report import sample_accuracy
from prefalign.models.diffusion import add_lora, load_base_pipeline, make_scheduler, to_model_range
from prefalign.runtime import emit_json
from prefalign.seeding import keyed_generator
from prefalign.world.grammar import parse_prompt
from prefalign.world.render import render

ROOT = Path(__file__).resolve().parents[1]


def held_out_accuracy(pipe, prompts: list[str], seeds: int, cfg: PipelineConfig) -> dict[str, float]:
    return sample_accuracy(
        pipe,
        prompts,
        seeds,
        cfg.seed,
        steps=cfg.eval.sample_steps,
        guidance=cfg.eval.guidance,
        resolution=cfg.model.resolution,
    )[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--full", action="store_true", help="fine-tune the whole UNet instead of the adapter")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default dpo.lr)")
    parser.add_argument("--seeds", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_config(args.params)
    pipe = load_base_pipeline(cfg.base_model_dir())
    table = pd.read_parquet(cfg.paths.resolve("world") / "prompts.parquet")
    train, test = sorted(table.prompt[table.split == "train"]), sorted(table.prompt[table.split == "test"])
    before = held_out_accuracy(pipe, test, args.seeds, cfg)
    pixels = to_model_range(np.stack([render(parse_prompt(p), cfg.world.image_size) for p in train]))
    tok = pipe.tokenizer
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = tok(
            train, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        cond = pipe.text_encoder(ids)[0]
    unet, lr = pipe.unet, args.lr or cfg.dpo.lr
    if args.full:
        params = [p for p in unet.parameters()]
    else:
        torch.manual_seed(cfg.seed)
        add_lora(unet, cfg.dpo.lora)
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    scheduler, gen = make_scheduler("ddpm"), keyed_generator(cfg.seed, "sft-bound")
    unet.train()
    start, losses = time.perf_counter(), []
    for _ in range(cfg.dpo.steps):
        rows = torch.randint(0, len(latents), (cfg.dpo.batch_size,), generator=gen)
        noise = torch.randn(latents[rows].shape, generator=gen)
        t = torch.randint(0, 1000, (len(rows),), generator=gen)
        pred = unet(scheduler.add_noise(latents[rows], noise, t), t, encoder_hidden_states=cond[rows]).sample
        loss = (pred - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.dpo.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    result = {
        "base": str(cfg.base_model_dir()),
        "adapter": "full UNet" if args.full else cfg.dpo.lora.model_dump(),
        "steps": cfg.dpo.steps,
        "batch_size": cfg.dpo.batch_size,
        "lr": lr,
        "train_prompts": len(train),
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "held_out_before": before,
        "held_out_after": held_out_accuracy(pipe, test, args.seeds, cfg),
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
