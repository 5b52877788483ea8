"""Preference losses on denoising errors: Diffusion-DPO, Diffusion-DRO, Diffusion-KTO.

Conventions shared by every function here (docs/design.md, "Loss contract"):

* ``err`` is the per-sample **mean** squared denoising error over C×H×W, ||ε_θ(x_t, t, c) − ε||² / D,
  in float32; lower is better. ``ref_err`` is the same error of the frozen reference (the UNet with its
  LoRA adapters disabled), computed under ``no_grad``.
* The implicit reward of a sample is proportional to −(err − ref_err): improving on the reference at
  denoising a sample is the diffusion analogue of raising its log-likelihood ratio.
* Inputs are ``(B,)`` tensors; outputs are the per-sample loss ``(B,)``. Callers average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The loss module stays free of the config (losses are the bottom layer); test_losses_diffusion checks
# that these are the names config.DPOVariant accepts.
DPO_VARIANTS = ("sigmoid", "hinge", "ipo")


def dpo_margin(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """The implicit log-ratio margin h = −½·((err_w − err_l) − (ref_err_w − ref_err_l)).

    Positive when the model improved on the reference more for the winner than for the loser.
    """
    return -0.5 * ((err_w - err_l) - (ref_err_w - ref_err_l))


def diffusion_dpo_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, *, beta: float, variant: str = "sigmoid"
) -> Tensor:
    """Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14 as in the authors' code).

    Symbols: x_0^w / x_0^l winner and loser, sharing one t and one ε; err_w = ||ε − ε_θ(x_t^w, t)||²/D,
    ref_err_w = ||ε − ε_ref(x_t^w, t)||²/D (likewise for l); h = −½·((err_w − err_l) − (ref_err_w −
    ref_err_l)) (the ½ is the paper's noise-aware derivation, Supp. S4); z = β·h.

    * ``sigmoid``: −log σ(z), the paper's loss.
    * ``hinge``: relu(1 − z).
    * ``ipo``: (h − 1/(2β))², IPO (Azar et al. 2023) squares the *unscaled* margin.

    Scale: with mean-reduced errors β ∈ [2000, 5000] is the published range (SD1.5/SDXL). The diffusers
    example writes −log σ(β'·((ref_w − ref_l) − (err_w − err_l))) without the ½, so β' = β/2.

    Args:
        err_w, err_l, ref_err_w, ref_err_l: `(B,)` float tensors.
        beta: β > 0.
        variant: ``sigmoid``, ``hinge`` or ``ipo``.

    Returns:
        `(B,)` per-sample loss.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = dpo_margin(err_w, err_l, ref_err_w, ref_err_l)
    match variant:
        case "sigmoid":
            return -F.logsigmoid(beta * margin)
        case "hinge":
            return F.relu(1.0 - beta * margin)
        case "ipo":
            return (margin - 1.0 / (2.0 * beta)) ** 2
        case _:
            raise ValueError(f"unknown DPO variant {variant!r}; expected one of {DPO_VARIANTS}")


def diffusion_dro_loss(
    err_expert: Tensor, ref_err_expert: Tensor, err_policy: Tensor, ref_err_policy: Tensor, *, margin: float = 1e-3
) -> Tensor:
    """Diffusion-DRO (Wu et al., NeurIPS 2025, arXiv 2510.18353, Alg. 1 / Eq. 15 and the authors' code).

    Symbols: A_φ = err_expert = ||ε_φ(x̄_t, t, c) − ē||²/D on an expert image noised at the policy sample's
    t; A_ref = ref_err_expert; P_φ = err_policy = ||ε_φ(x_t, t, c) − ε_pol||²/D on a state x_t of the
    policy's own trajectory with its recorded prediction ε_pol; P_ref = ref_err_policy.

    loss = max(0, (A_φ − A_ref) − (P_φ − P_ref) + m): the expert must improve on the reference by m more
    than the policy's own samples do. No sigmoid, no β (the paper's m′ = −m).

    Returns:
        `(B,)` per-sample hinge loss.
    """
    return F.relu((err_expert - ref_err_expert) - (err_policy - ref_err_policy) + margin)


def diffusion_kto_loss(
    err: Tensor, ref_err: Tensor, desirable: Tensor, *, beta: float, kl_ref: Tensor | float
) -> Tensor:
    """Diffusion-KTO (Li et al., NeurIPS 2024, arXiv 2404.04465) on binary feedback.

    Symbols: g = ref_err − err is the implicit reward of the image; z_ref = kl_ref the reference point
    (the authors use the detached, clamped batch mean of g). Desirable: 1 − σ(β(g − z_ref));
    undesirable: 1 − σ(β(z_ref − g)). β has no ½ here (published β = 1000).

    Returns:
        `(B,)` per-sample loss in [0, 1].
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    implicit_reward = ref_err - err
    sign = desirable.to(implicit_reward.dtype) * 2.0 - 1.0
    return 1.0 - torch.sigmoid(beta * sign * (implicit_reward - kl_ref))


def dpo_metric_tensors(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, *, beta: float
) -> dict[str, Tensor]:
    """``dpo_metrics`` as 0-dim tensors on the errors' device, without reading them back.

    Trainers accumulate these on the device and read them once every ``log_every`` steps: converting a
    GPU value to a Python float waits for every kernel queued before it.
    """
    with torch.no_grad():
        z = beta * dpo_margin(err_w, err_l, ref_err_w, ref_err_l)
        return {
            "implicit_acc": (z > 0).float().mean(),
            "reward_margin": z.mean(),
            "model_err": torch.cat([err_w, err_l]).mean(),
            "ref_err": torch.cat([ref_err_w, ref_err_l]).mean(),
        }


def dpo_metrics(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, *, beta: float
) -> dict[str, float]:
    """Batch metrics beside the loss: implicit accuracy (share of z > 0), reward margin, model/ref errors."""
    return {
        key: float(value) for key, value in dpo_metric_tensors(err_w, err_l, ref_err_w, ref_err_l, beta=beta).items()
    }


POLICY_LOSSES = {"dpo": diffusion_dpo_loss, "dro": diffusion_dro_loss, "kto": diffusion_kto_loss}
