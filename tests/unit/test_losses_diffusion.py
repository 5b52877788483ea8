"""Diffusion preference losses against hand-computed values and gradient signs."""

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from prefalign.config import DPOVariant
from prefalign.losses.diffusion import (
    POLICY_LOSSES,
    diffusion_dpo_loss,
    diffusion_dro_loss,
    diffusion_kto_loss,
    dpo_margin,
    dpo_metrics,
)

# Dyadic inputs: h = -1/2 * ((1/8 - 3/8) - (1/4 - 1/4)) = 1/8, so beta = 8 gives z = 1 exactly.
ERR_W, ERR_L, REF_W, REF_L = (torch.tensor([v]) for v in (0.125, 0.375, 0.25, 0.25))
LOG1P_EXP_M1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.3132617


def test_margin_is_half_the_error_difference():
    assert_close(dpo_margin(ERR_W, ERR_L, REF_W, REF_L), torch.tensor([0.125]))


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("sigmoid", LOG1P_EXP_M1), ("hinge", 0.0), ("ipo", (0.125 - 1 / 16) ** 2)],
)
def test_dpo_variants_hand_values(variant, expected):
    loss = diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=8.0, variant=variant)
    assert_close(loss, torch.tensor([expected]))


def test_dpo_sigmoid_at_zero_margin_is_log2():
    same = torch.tensor([0.3])
    assert_close(diffusion_dpo_loss(same, same, same, same, beta=2000.0), torch.tensor([math.log(2.0)]))


def test_beta_convention_matches_diffusers_example_with_half_beta():
    # diffusers: -logsigmoid(beta' * ((ref_w - ref_l) - (err_w - err_l))), no 1/2, so beta' = beta / 2.
    gen = torch.Generator().manual_seed(0)
    err_w, err_l, ref_w, ref_l = (torch.rand(16, generator=gen) for _ in range(4))
    beta = 3000.0
    diffusers_form = -torch.nn.functional.logsigmoid((beta / 2) * ((ref_w - ref_l) - (err_w - err_l)))
    assert_close(diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta), diffusers_form)


def test_original_code_form():
    # Salesforce DiffusionDPO train.py: inside = -0.5 * beta * (model_diff - ref_diff); loss = -logsigmoid(inside)
    model_diff, ref_diff = ERR_W - ERR_L, REF_W - REF_L
    original = -torch.nn.functional.logsigmoid(-0.5 * 8.0 * (model_diff - ref_diff))
    assert_close(diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=8.0), original)


@pytest.mark.parametrize("variant", ["sigmoid", "hinge", "ipo"])
def test_dpo_gradient_signs(variant):
    err_w = torch.tensor([0.30], requires_grad=True)
    err_l = torch.tensor([0.31], requires_grad=True)
    diffusion_dpo_loss(
        err_w, err_l, torch.tensor([0.3]), torch.tensor([0.3]), beta=50.0, variant=variant
    ).sum().backward()
    assert err_w.grad.item() > 0, "lowering the winner's error must lower the loss"
    assert err_l.grad.item() < 0, "raising the loser's error must lower the loss"


def test_dpo_rejects_bad_beta_and_variant():
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=0.0)
    with pytest.raises(ValueError, match="sigmoid"):
        diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=1.0, variant="cpo")


def test_dpo_variants_cover_config_literal():

    for variant in get_args(DPOVariant):
        assert diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=8.0, variant=variant).shape == (1,)


def test_dpo_is_per_sample():
    err = torch.rand(5)
    assert diffusion_dpo_loss(err, err.flip(0), err, err, beta=10.0).shape == (5,)


def test_dro_hand_values():
    t = torch.tensor
    assert_close(diffusion_dro_loss(t([0.125]), t([0.25]), t([0.375]), t([0.25]), margin=1e-3), t([0.0]))
    assert_close(diffusion_dro_loss(t([0.375]), t([0.25]), t([0.125]), t([0.25]), margin=1e-3), t([0.251]))


def test_dro_gradient_signs_in_active_region():
    err_expert = torch.tensor([0.375], requires_grad=True)
    err_policy = torch.tensor([0.125], requires_grad=True)
    diffusion_dro_loss(err_expert, torch.tensor([0.25]), err_policy, torch.tensor([0.25])).sum().backward()
    assert err_expert.grad.item() > 0
    assert err_policy.grad.item() < 0


def test_kto_at_reference_is_half():
    err = torch.tensor([0.2, 0.2])
    loss = diffusion_kto_loss(err, err, torch.tensor([True, False]), beta=1000.0, kl_ref=0.0)
    assert_close(loss, torch.tensor([0.5, 0.5]))


def test_kto_gradient_signs():
    err = torch.tensor([0.2, 0.2], requires_grad=True)
    diffusion_kto_loss(
        err, torch.tensor([0.2, 0.2]), torch.tensor([True, False]), beta=10.0, kl_ref=0.0
    ).sum().backward()
    assert err.grad[0] > 0, "desirable: lowering the error lowers the loss"
    assert err.grad[1] < 0, "undesirable: raising the error lowers the loss"


def test_dpo_metrics():
    metrics = dpo_metrics(ERR_W, ERR_L, REF_W, REF_L, beta=8.0)
    assert metrics["implicit_acc"] == 1.0
    assert metrics["reward_margin"] == pytest.approx(1.0)
    assert metrics["model_err"] == pytest.approx(0.25)


def test_policy_losses_registry():
    assert set(POLICY_LOSSES) == {"dpo", "dro", "kto"}


def test_loss_variants_are_the_configs():
    from prefalign.losses.diffusion import DPO_VARIANTS

    assert get_args(DPOVariant) == DPO_VARIANTS
