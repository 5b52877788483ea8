"""Denoising errors: the per-sample quantities every preference loss is written in.

A winner and its loser share one timestep and one noise draw (otherwise the difference of their errors
is dominated by the noise, not by the images), go through the UNet in one batched forward, and the
reference errors come from the same UNet with its LoRA adapters disabled, under ``no_grad``: no second
UNet in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from prefalign.seeding import keyed_generator


def keyed_timesteps_and_noise(
    sample_ids: Sequence[int],
    *,
    seed: int,
    purpose: str,
    shape: tuple[int, ...],
    num_train_timesteps: int = 1000,
    timestep_min: int = 0,
) -> tuple[Tensor, Tensor]:
    """One (t, ε) per sample, drawn from a generator keyed by the sample's global index.

    The same sample gets the same draw whatever the batch size, the number of processes or a resume.
    t is uniform on ``timestep_min .. num_train_timesteps - 1``.
    """
    timesteps, noises = [], []
    for sample_id in sample_ids:
        gen = keyed_generator(seed, purpose, int(sample_id))
        timesteps.append(torch.randint(timestep_min, num_train_timesteps, (1,), generator=gen))
        noises.append(torch.randn(shape, generator=gen))
    return torch.cat(timesteps), torch.stack(noises)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over C×H×W of the squared error, in float32 (half precision loses the small differences)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


@contextmanager
def adapters_disabled(unet):
    """The UNet as its own reference: LoRA adapters off, no autograd graph."""
    unet.disable_adapters()
    try:
        with torch.no_grad():
            yield unet
    finally:
        unet.enable_adapters()


def policy_and_reference_errors(
    policy, reference, noisy: Tensor, timesteps: Tensor, cond: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """(err, ref_err) when the trained forward goes through a wrapper (e.g. DistributedDataParallel).

    Args:
        policy: the module called with grad; may wrap ``reference`` (DDP syncs gradients through it).
        reference: the bare peft-adapted UNet whose adapters are switched off for the reference pass; a
            DDP wrapper has no ``disable_adapters`` and must not see a no-grad forward.
        noisy, timesteps, cond, target: one batch x_t, t, c and the regression target ε.

    Returns:
        ``(err, ref_err)``, both ``(B,)``; ``ref_err`` carries no graph.
    """
    err = per_sample_mse(policy(noisy, timesteps, encoder_hidden_states=cond).sample, target)
    return err, reference_errors(reference, noisy, timesteps, cond, target)


def reference_errors(reference, noisy: Tensor, timesteps: Tensor, cond: Tensor, target: Tensor) -> Tensor:
    """Per-sample errors ``(B,)`` of the bare peft UNet with its adapters off, under ``no_grad``."""
    with adapters_disabled(reference):
        return per_sample_mse(reference(noisy, timesteps, encoder_hidden_states=cond).sample, target)


def denoising_errors(unet, noisy: Tensor, timesteps: Tensor, cond: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(err, ref_err) of one batch: the trained UNet with grad, the reference without."""
    return policy_and_reference_errors(unet, unet, noisy, timesteps, cond, target)


def stack_pair(
    scheduler, latents_w: Tensor, latents_l: Tensor, cond: Tensor, timesteps: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Winners then losers along the batch, noised with the same (t, ε): (x_t, t, c, ε) of size 2B."""
    noisy = torch.cat(
        [scheduler.add_noise(latents_w, noise, timesteps), scheduler.add_noise(latents_l, noise, timesteps)]
    )
    return noisy, timesteps.repeat(2), cond.repeat(2, 1, 1), noise.repeat(2, 1, 1, 1)


def pair_denoising_errors(
    unet, scheduler, latents_w: Tensor, latents_l: Tensor, cond: Tensor, timesteps: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(err_w, err_l, ref_err_w, ref_err_l) with shared t and ε, one batched forward for both images."""
    batch = latents_w.shape[0]
    err, ref_err = denoising_errors(unet, *stack_pair(scheduler, latents_w, latents_l, cond, timesteps, noise))
    return err[:batch], err[batch:], ref_err[:batch], ref_err[batch:]
