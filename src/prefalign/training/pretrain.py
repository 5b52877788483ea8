"""Pretraining of the demo's tiny Stable Diffusion: the VAE first, then the UNet and text encoder.

The captions are partly wrong (web-style noise) and the renderings carry pixel noise, so the base model
follows prompts only loosely: there is room for alignment, as with a real base model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prefalign.config import ModelConfig, Pretrain
from prefalign.models import diffusion

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict[str, float], int], None]


@dataclass
class PretrainResult:
    pipeline: Any  # a diffusers StableDiffusionPipeline
    history: dict[str, list[float]] = field(default_factory=dict)


def train_vae(vae, images: torch.Tensor, cfg: Pretrain, *, seed: int, log_metrics: MetricsFn | None) -> list[float]:
    """Reconstruction + tiny KL; sets ``scaling_factor`` so scaled latents have unit variance, as in SD."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    history = []
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="pretrain vae", mininterval=5):
        batch = images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - batch).pow(2).mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if log_metrics and step % 50 == 0:
            log_metrics({"pretrain/vae_loss": history[-1]}, step)
    vae.eval()
    with torch.no_grad():
        std = torch.cat(
            [vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, min(len(images), 2048), 512)]
        ).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return history


def encode_posteriors(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior means and standard deviations of every image (the UNet samples latents from them)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            dist = vae.encode(images[i : i + 512]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def train_unet(
    unet, text_encoder, tokenizer, latents, latent_stds, captions, cfg: Pretrain, *, seed, log_metrics
) -> list[float]:
    """ε-prediction MSE with caption dropout (so classifier-free guidance works).

    ``cfg.unet_lr_schedule`` cosine (the demo's) decays the rate to zero over the run: the stage has a few
    minutes of CPU, and a decayed rate ends at a lower loss than a constant one in the same steps.
    """
    from diffusers.optimization import get_scheduler

    scheduler = diffusion.make_scheduler("ddpm")
    gen = torch.Generator().manual_seed(seed + 1)
    ids = tokenizer(
        list(captions) + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_id = len(captions)
    frozen_text = None
    if not any(p.requires_grad for p in text_encoder.parameters()):  # frozen by freeze_text_encoder
        with torch.no_grad():  # a frozen encoder: every caption's hidden states once, not per step
            frozen_text = torch.cat([text_encoder(ids[i : i + 512])[0] for i in range(0, len(ids), 512)])
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if frozen_text is None else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = get_scheduler(
        cfg.unet_lr_schedule, opt, num_warmup_steps=min(50, cfg.unet_steps), num_training_steps=cfg.unet_steps
    )
    history = []
    unet.train(), text_encoder.train(frozen_text is None)
    for step in tqdm(range(cfg.unet_steps), desc="pretrain unet", mininterval=5):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        caption_idx = torch.where(torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout, empty_id, idx)
        x0 = latents[idx] + latent_stds[idx] * torch.randn(latents[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        text = text_encoder(ids[caption_idx])[0] if frozen_text is None else frozen_text[caption_idx]
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        if log_metrics and step % 50 == 0:
            log_metrics({"pretrain/unet_loss": history[-1]}, step)
    unet.eval(), text_encoder.eval()
    return history


def thin_position_phrases(captions: list[str], rate: float, *, seed: int) -> list[str]:
    """Keep the position phrase of a share ``rate`` of the captions (keyed by index), drop it from the rest.

    With every caption naming the position, whether the base learns to place objects depends on its
    initialisation: two pretraining runs of the same recipe reached position accuracy 0.31 and 0.75
    (docs/alignment_notes.md). Captions that rarely name the position, as web captions do, keep the base
    reading the words without having learnt them, and leave placement to alignment.
    """
    from prefalign.seeding import numpy_rng
    from prefalign.world.grammar import without_position

    if rate >= 1.0:
        return list(captions)
    keep = numpy_rng(seed, "caption-position").random(len(captions)) < rate
    return [c if k else without_position(c) for c, k in zip(captions, keep, strict=True)]


def freeze_text_encoder(text_encoder, *, seed: int) -> None:
    """Word embeddings redrawn at unit scale (keyed), then every weight frozen.

    SD trains its UNet against a frozen, pretrained CLIP text encoder. Trained jointly from scratch, the demo's
    encoder erased the words its UNet did not use: with 20% of captions naming the position, changing only the
    position word moved its hidden states 9%, against 54-95% for the other words, and no fine-tune of the
    UNet could then learn position (docs/alignment_notes.md). At CLIP's initial scale (std 0.02) a frozen
    encoder's output is dominated by the position embeddings (background words moved it 8%); at unit scale
    every word moves it 32-48%.
    """
    from prefalign.seeding import keyed_generator

    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(
            0.0, 1.0, generator=keyed_generator(seed, "frozen-text-words")
        )
    text_encoder.requires_grad_(False).eval()


def pretrain_base(
    images: np.ndarray,
    captions: list[str],
    words: list[str],
    model_cfg: ModelConfig,
    cfg: Pretrain,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
) -> PretrainResult:
    """Build the tiny SD from config and train it on (images, captions); returns a stock pipeline."""
    from prefalign.models.text import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    vae = diffusion.build_tiny_vae(model_cfg)
    pixels = diffusion.to_model_range(images)
    vae_history = train_vae(vae, pixels, cfg, seed=seed, log_metrics=log_metrics)
    latents, latent_stds = encode_posteriors(vae, pixels)
    unet = diffusion.build_tiny_unet(model_cfg, latent_size=latents.shape[-1])
    text_encoder = diffusion.build_tiny_text_encoder(model_cfg, tokenizer)
    if cfg.text_encoder == "frozen":
        freeze_text_encoder(text_encoder, seed=seed)
    captions = thin_position_phrases(captions, cfg.caption_position_rate, seed=seed)
    unet_history = train_unet(
        unet, text_encoder, tokenizer, latents, latent_stds, captions, cfg, seed=seed, log_metrics=log_metrics
    )
    pipe = diffusion.assemble_pipeline(vae, text_encoder, tokenizer, unet)
    return PretrainResult(pipeline=pipe, history={"vae_loss": vae_history, "unet_loss": unet_history})
