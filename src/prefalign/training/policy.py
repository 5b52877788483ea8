"""Policy training on cached features: offline Diffusion-DPO and hybrid Diffusion-DRO with LoRA.

The loops stay linear: draw keyed (t, ε) -> denoising errors -> loss function -> backward -> log. The
maths lives in ``prefalign.losses.diffusion`` and ``prefalign.training.denoise``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prefalign.config import DPOConfig, DROConfig
from prefalign.losses.diffusion import diffusion_dpo_loss, diffusion_dro_loss, dpo_metrics
from prefalign.models.diffusion import add_lora, make_scheduler
from prefalign.seeding import derive_seed, keyed_generator
from prefalign.training.denoise import denoising_errors, keyed_timesteps_and_noise, pair_denoising_errors

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict[str, float], int], None]


@dataclass
class Features:
    """Cached VAE latents (scaled) and text embeddings, looked up by image sha and prompt."""

    latents: torch.Tensor
    image_rows: dict[str, int]
    text: torch.Tensor
    prompt_rows: dict[str, int]
    empty_prompt_row: int

    def latent_rows(self, shas) -> torch.Tensor:
        return torch.tensor([self.image_rows[s] for s in shas], dtype=torch.long)

    def text_rows(self, prompts) -> torch.Tensor:
        return torch.tensor([self.prompt_rows[p] for p in prompts], dtype=torch.long)


@dataclass
class TrainHistory:
    steps: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def append(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(value)
        self.steps += 1


def keyed_order(n_items: int, sample_ids: np.ndarray, *, seed: int, purpose: str) -> np.ndarray:
    """Item of each global sample index: epoch e is a permutation keyed by (seed, purpose, e)."""
    epochs = sample_ids // n_items
    out = np.empty_like(sample_ids)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng(derive_seed(seed, purpose, int(epoch))).permutation(n_items)
        mask = epochs == epoch
        out[mask] = perm[sample_ids[mask] % n_items]
    return out


def drop_prompts(text_rows: torch.Tensor, sample_ids: np.ndarray, rate: float, empty_row: int, *, seed: int) -> torch.Tensor:
    """Prompt dropout keyed by sample index (the same samples lose their prompt in every process)."""
    if rate <= 0:
        return text_rows
    drop = [torch.rand(1, generator=keyed_generator(seed, "prompt-dropout", int(i))).item() < rate for i in sample_ids]
    return torch.where(torch.tensor(drop), torch.full_like(text_rows, empty_row), text_rows)


def make_optimizer(params, lr: float, warmup: int):
    """AdamW with a linear warmup to ``lr``, then constant."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return opt, sched


def train_dpo(
    unet, pairs_w: list[str], pairs_l: list[str], prompts: list[str], feats: Features, cfg: DPOConfig, *,
    seed: int, log_metrics: MetricsFn | None = None,
) -> TrainHistory:
    """Offline Diffusion-DPO with a fresh LoRA adapter on ``unet`` (the base is the reference).

    Every pair must be a strict preference (ties are dropped by the caller and counted there).
    """
    if not pairs_w:
        raise ValueError("train_dpo: no training pairs (after dropping ties)")
    n_trainable = add_lora(unet, cfg.lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt, lr_sched = make_optimizer(params, cfg.lr, cfg.warmup_steps)
    scheduler = make_scheduler("ddpm")
    rows_w, rows_l, rows_c = feats.latent_rows(pairs_w), feats.latent_rows(pairs_l), feats.text_rows(prompts)
    global_batch = cfg.batch_size * cfg.grad_accum
    log.info("DPO: %d pairs, global batch %d (%d x %d accum), %d steps, %d trainable LoRA params, beta %.0f",
             len(pairs_w), global_batch, cfg.batch_size, cfg.grad_accum, cfg.steps, n_trainable, cfg.beta)
    history = TrainHistory()
    unet.train()
    for step in tqdm(range(cfg.steps), desc="train dpo", mininterval=5):
        step_metrics: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            sample_ids = np.arange(cfg.batch_size) + step * global_batch + micro * cfg.batch_size
            items = torch.from_numpy(keyed_order(len(pairs_w), sample_ids, seed=seed, purpose="dpo-order"))
            t, noise = keyed_timesteps_and_noise(sample_ids, seed=seed, purpose="dpo", shape=tuple(feats.latents.shape[1:]))
            cond = feats.text[drop_prompts(rows_c[items], sample_ids, cfg.prompt_dropout, feats.empty_prompt_row, seed=seed)]
            errs = pair_denoising_errors(unet, scheduler, feats.latents[rows_w[items]], feats.latents[rows_l[items]], cond, t, noise)
            loss = diffusion_dpo_loss(*errs, beta=cfg.beta, variant=cfg.variant).mean()
            (loss / cfg.grad_accum).backward()
            for key, value in {"loss": loss.item(), **dpo_metrics(*errs, beta=cfg.beta)}.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value / cfg.grad_accum
        step_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        step_metrics["lr"] = lr_sched.get_last_lr()[0]
        opt.step(), lr_sched.step(), opt.zero_grad(set_to_none=True)
        history.append(step_metrics)
        if log_metrics and step % 10 == 0:
            log_metrics({f"train/{k}": v for k, v in step_metrics.items()}, step)
    unet.eval()
    return history


@torch.no_grad()
def record_trajectories(unet, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int, guidance: float, generator: torch.Generator):
    """Sample with DPM-Solver++ and record (x_t, t, ε_policy) at every step: x_t is the latent entering it."""
    sampler = make_scheduler("dpmsolver++")
    sampler.set_timesteps(steps)
    x = torch.randn((cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), generator=generator)
    x = x * sampler.init_noise_sigma
    states, times, eps_all = [], [], []
    for t in sampler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = unet(x, t_batch, encoder_hidden_states=cond).sample
        if guidance != 1.0:
            eps_uncond = unet(x, t_batch, encoder_hidden_states=uncond.expand_as(cond)).sample
            eps = eps_uncond + guidance * (eps - eps_uncond)
        states.append(x), times.append(t_batch), eps_all.append(eps)
        x = sampler.step(eps, t, x).prev_sample
    return torch.stack(states), torch.stack(times), torch.stack(eps_all)


def train_dro(
    unet, expert_shas: list[str], expert_prompts: list[str], feats: Features, cfg: DROConfig, *,
    seed: int, log_metrics: MetricsFn | None = None,
) -> TrainHistory:
    """Hybrid Diffusion-DRO: a new LoRA on ``unet`` (whose current weights are the reference).

    Each round samples fresh trajectories from the current policy for the prompts of a batch of experts,
    and serves ``cfg.reuse`` optimizer updates (the published replay buffer allows reuse). The sampler is
    the trained UNet itself under ``no_grad``, so it re-syncs every ``reuse`` updates (M = reuse). With
    M = 1 the recorded ε_pol equals ε_φ at the sampled states up to numerics: P_φ is then ~0 with ~zero
    gradient and the policy term acts as a data-dependent threshold P_ref = ||ε_φ − ε_ref||², not as a
    repulsive force (ALGORITHMS.md §2.2); a lag M > 1 makes it push away from the old policy.
    """
    if not expert_shas:
        raise ValueError("train_dro: no expert demonstrations")
    n_trainable = add_lora(unet, cfg.lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt, lr_sched = make_optimizer(params, cfg.lr, 0)
    scheduler = make_scheduler("ddpm")
    rows_x, rows_c = feats.latent_rows(expert_shas), feats.text_rows(expert_prompts)
    uncond = feats.text[feats.empty_prompt_row : feats.empty_prompt_row + 1]
    log.info("DRO: %d experts, batch %d, %d steps, reuse %d, %d trainable LoRA params", len(expert_shas),
             cfg.batch_size, cfg.steps, cfg.reuse, n_trainable)
    history = TrainHistory()
    for step in tqdm(range(cfg.steps), desc="train dro", mininterval=5):
        if step % cfg.reuse == 0:
            round_id = step // cfg.reuse
            round_ids = np.arange(cfg.batch_size) + round_id * cfg.batch_size
            items = torch.from_numpy(keyed_order(len(expert_shas), round_ids, seed=seed, purpose="dro-order"))
            cond = feats.text[rows_c[items]]
            unet.eval()
            states, times, eps_pol = record_trajectories(unet, cond, uncond, steps=cfg.sample_steps, guidance=cfg.guidance,
                                                          generator=keyed_generator(seed, "dro-sample", round_id))
            unet.train()
        gen = keyed_generator(seed, "dro-step", step)
        which = torch.randint(0, states.shape[0], (cfg.batch_size,), generator=gen)
        batch = torch.arange(cfg.batch_size)
        x_t, t, target_pol = states[which, batch], times[which, batch], eps_pol[which, batch]
        noise = torch.randn(x_t.shape, generator=gen)
        noisy_expert = scheduler.add_noise(feats.latents[rows_x[items]], noise, t)
        err_expert, ref_err_expert = denoising_errors(unet, noisy_expert, t, cond, noise)
        err_policy, ref_err_policy = denoising_errors(unet, x_t, t, cond, target_pol)
        loss = diffusion_dro_loss(err_expert, ref_err_expert, err_policy, ref_err_policy, margin=cfg.margin).mean()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step(), lr_sched.step(), opt.zero_grad(set_to_none=True)
        metrics = {"loss": loss.item(), "err_expert": float(err_expert.mean()), "ref_err_expert": float(ref_err_expert.mean()),
                   "err_policy": float(err_policy.mean()), "ref_err_policy": float(ref_err_policy.mean()),
                   "active": float(((err_expert - ref_err_expert) - (err_policy - ref_err_policy) + cfg.margin > 0).float().mean()),
                   "grad_norm": grad_norm}
        history.append(metrics)
        if log_metrics and step % 10 == 0:
            log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
    unet.eval()
    return history


def merge_and_strip_lora(unet) -> None:
    """Fold the LoRA adapters into the base weights and remove the peft layers, in place.

    A UNet that still holds peft layers saves ``base_layer`` keys that ``from_pretrained`` cannot read.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    unet.unload_lora()


def save_history(history: TrainHistory, path: Path) -> Path:
    import json

    path.write_text(json.dumps({"steps": history.steps, "metrics": history.metrics}))
    return path
