"""Reward losses against hand-computed values, their gradients, and the registry's sync with the config."""

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from prefalign.config import RewardLoss
from prefalign.losses.reward import REWARD_LOSSES, bradley_terry_loss, clip_contrastive_loss, plackett_luce_loss

LOG2 = 0.6931472
LOG1P_EXP_M1 = 0.3132617  # log(1 + e^-1) = -log σ(1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    ("score_w", "score_l", "margin", "expected"),
    [
        (0.0, 0.0, 0.0, LOG2),  # equal scores: σ(0) = ½
        (1.0, 0.0, 0.0, LOG1P_EXP_M1),  # gap 1
        (3.0, 1.0, 1.0, LOG1P_EXP_M1),  # gap 2, margin 1 -> effective gap 1
    ],
)
def test_bradley_terry_hand_values(score_w: float, score_l: float, margin: float, expected: float) -> None:
    loss = bradley_terry_loss(t(score_w), t(score_l), margin=margin)
    assert_close(loss, t(expected))


def test_bradley_terry_label_one_equals_no_label() -> None:
    score_w, score_l = torch.randn(8), torch.randn(8)
    assert_close(bradley_terry_loss(score_w, score_l, label=1.0), bradley_terry_loss(score_w, score_l))


def test_bradley_terry_tie_hand_values() -> None:
    # Δ = 0: −½ log ½ − ½ log ½ = log 2; Δ = 1: ½(log(1+e^-1) + log(1+e^1)).
    expected_gap1 = 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)))
    loss = bradley_terry_loss(t(0.0, 1.0), t(0.0, 0.0), label=0.5)
    assert_close(loss, t(LOG2, expected_gap1))


def test_bradley_terry_tie_is_symmetric_and_ignores_margin() -> None:
    score_w, score_l = torch.randn(16), torch.randn(16)
    forward = bradley_terry_loss(score_w, score_l, label=0.5, margin=1.0)
    assert_close(forward, bradley_terry_loss(score_l, score_w, label=0.5))


def test_bradley_terry_mixed_label_tensor() -> None:
    score_w, score_l = t(1.0, 0.0, 2.0), t(0.0, 0.0, 0.0)
    labels = t(1.0, 0.5, 0.5)
    loss = bradley_terry_loss(score_w, score_l, label=labels, margin=0.0)
    expected = torch.stack(
        [
            bradley_terry_loss(score_w[:1], score_l[:1])[0],
            bradley_terry_loss(score_w[1:2], score_l[1:2], label=0.5)[0],
            bradley_terry_loss(score_w[2:], score_l[2:], label=0.5)[0],
        ]
    )
    assert_close(loss, expected)
    assert_close(loss[:2], t(LOG1P_EXP_M1, LOG2))


def test_bradley_terry_stable_for_large_gaps() -> None:
    loss = bradley_terry_loss(t(-500.0, 500.0), t(500.0, -500.0), label=t(1.0, 0.5))
    assert torch.isfinite(loss).all()
    assert_close(loss, t(1000.0, 500.0))


def test_bradley_terry_rejects_labels_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="labels must lie in"):
        bradley_terry_loss(t(0.0), t(0.0), label=2.0)


def test_bradley_terry_gradient_signs() -> None:
    score_w = torch.randn(6, requires_grad=True)
    score_l = torch.randn(6, requires_grad=True)
    bradley_terry_loss(score_w, score_l, margin=0.5).sum().backward()
    assert (score_w.grad < 0).all()  # raising the winner's score lowers the loss
    assert (score_l.grad > 0).all()  # raising the loser's score raises it


def test_plackett_luce_hand_values() -> None:
    # [0, 0, 0]: every order equally likely, P = 1/3! ; [2, 1, 0] by hand below.
    by_hand = (math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1)
    assert by_hand == pytest.approx(0.7208677, abs=1e-7)
    loss = plackett_luce_loss(torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0]]))
    assert_close(loss, t(1.7917595, 0.7208677))


def test_plackett_luce_k2_equals_bradley_terry() -> None:
    scores = torch.randn(32, 2) * 3
    assert_close(plackett_luce_loss(scores), bradley_terry_loss(scores[:, 0], scores[:, 1]))


def test_plackett_luce_masked_ragged_ranking() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 123.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = plackett_luce_loss(scores, mask=mask)
    assert_close(loss[0], plackett_luce_loss(t(2.0, 1.0, 0.0)[None])[0])
    assert_close(loss[1], plackett_luce_loss(t(2.0, 1.0)[None])[0])
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[1, 2] == 0  # padding gets no gradient


def test_plackett_luce_gradient_favours_the_top() -> None:
    scores = torch.zeros(1, 4, requires_grad=True)
    plackett_luce_loss(scores).sum().backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, -1]


def test_registry_keys_match_config_literal() -> None:
    assert set(REWARD_LOSSES) == set(get_args(RewardLoss)) - {"mixed"}


def test_clip_contrastive_hand_values() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # Distinct captions: each direction is -log softmax(2; [2, 0]) = log(1 + e^-2).
    assert_close(clip_contrastive_loss(logits), torch.full((2,), math.log1p(math.exp(-2.0))))
    # One caption twice: targets (1/2, 1/2), so -1/2 [log sm(2) + log sm(0)] = 1/2 [2 log(1 + e^-2) + 2].
    same = torch.ones(2, 2, dtype=torch.bool)
    expected = 0.5 * (2 * math.log1p(math.exp(-2.0)) + 2.0)
    assert_close(clip_contrastive_loss(logits, same), torch.full((2,), expected))


def test_clip_contrastive_asymmetric_logits_average_both_directions() -> None:
    logits = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    row = -torch.log_softmax(logits, dim=1).diagonal()
    col = -torch.log_softmax(logits, dim=0).diagonal()
    assert_close(clip_contrastive_loss(logits), 0.5 * (row + col))


def test_clip_contrastive_gradient_pulls_matches_together() -> None:
    logits = torch.zeros(3, 3, requires_grad=True)
    clip_contrastive_loss(logits).sum().backward()
    assert (logits.grad.diagonal() < 0).all()  # descent raises the matching logits
    off_diagonal = logits.grad[~torch.eye(3, dtype=torch.bool)]
    assert (off_diagonal > 0).all()


def test_clip_contrastive_rejects_bad_shapes_and_masks() -> None:
    with pytest.raises(ValueError, match="square"):
        clip_contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="diagonal"):
        clip_contrastive_loss(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
