"""Early stopping of reward training: which validation keeps the weights (reward.select_on)."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.config import ConfigError, load_config
from prefalign.training.reward_selection import BestWeights

# (accuracy, loss) per evaluation: accuracy peaks by noise at the 2nd, the loss keeps falling to the 4th.
HISTORY = [(0.66, 0.640), (0.70, 0.630), (0.68, 0.620), (0.69, 0.610), (0.69, 0.615)]


def _run(select_on: str, patience: int = 10) -> tuple[BestWeights, torch.nn.Linear]:
    model, best = torch.nn.Linear(1, 1, bias=False), BestWeights(patience, select_on)
    for step, (accuracy, loss) in enumerate(HISTORY, start=1):
        with torch.no_grad():
            model.weight.fill_(step)  # the weights remember their step
        best.update(model, accuracy, loss, step)
    best.restore(model)
    return best, model


@pytest.mark.parametrize(("select_on", "step", "accuracy"), [("loss", 4, 0.69), ("accuracy", 2, 0.70)])
def test_best_weights_follow_select_on(select_on, step, accuracy):
    best, model = _run(select_on)
    assert (best.step, best.accuracy) == (step, accuracy)
    assert model.weight.item() == step
    assert best.stale == len(HISTORY) - step


def test_loss_selection_breaks_ties_on_accuracy_and_never_keeps_nan():
    model, best = torch.nn.Linear(1, 1), BestWeights(3, "loss")
    assert best.update(model, 0.60, 0.6, 1)
    assert best.update(model, 0.65, 0.6, 2)  # same loss, better accuracy
    assert not best.update(model, 0.99, math.nan, 3)
    assert not best.update(model, 0.50, 0.7, 4)
    assert best.step == 2 and best.stale == 2
    assert not best.update(model, 0.60, 0.61, 5) and best.exhausted


def test_select_on_is_checked():
    with pytest.raises(ValueError, match="select_on"):
        BestWeights(3, "auc")


def test_select_on_config(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("reward:\n  select_on: auc\n")
    with pytest.raises(ConfigError, match="reward.select_on"):
        load_config(params)
    params.write_text("reward:\n  select_on: accuracy\n")
    assert load_config(params).reward.select_on == "accuracy"
