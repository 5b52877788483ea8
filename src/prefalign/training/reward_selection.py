"""Early stopping of the reward trainer: which validation is best, and the weights it had."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class BestWeights:
    """Early stopping: keeps the weights of the best validation so far.

    ``select_on="loss"`` ranks evaluations by the validation BT loss (accuracy breaking ties),
    ``"accuracy"`` by pairwise accuracy (loss breaking ties). The loss is a proper scoring rule and uses
    every pair's margin, where accuracy only counts signs: on noisy labels accuracy jumps by a point
    between evaluations from the noise alone (about ±0.9 points of standard error on 2340 validation pairs
    at 0.7), and selecting on it picks that noise. Measured on the demo world (2835 test pairs, one
    CLIP-pretrained backbone): expected accuracy 0.679-0.681 over three seeds selected on loss, against
    0.662 and 0.683 over two seeds selected on accuracy: a higher mean and a seventh of the spread.
    """

    def __init__(self, patience: int, select_on: str = "loss") -> None:
        if select_on not in ("loss", "accuracy"):
            raise ValueError(f"select_on must be 'loss' or 'accuracy', got {select_on!r}")
        self.patience, self.select_on = patience, select_on
        self.key: tuple[float, float] | None = None
        self.state: dict[str, Tensor] = {}
        self.accuracy, self.step, self.stale = math.nan, 0, 0

    def update(self, model: torch.nn.Module, accuracy: float, loss: float, step: int) -> bool:
        finite_accuracy = accuracy if math.isfinite(accuracy) else -math.inf
        key = (-loss, finite_accuracy) if self.select_on == "loss" else (finite_accuracy, -loss)
        # A diverged model (NaN loss) never counts as better: NaN compares False, which would keep it.
        if not math.isfinite(loss) or (self.key is not None and key <= self.key):
            self.stale += 1
            return False
        self.key, self.accuracy, self.step, self.stale = key, accuracy, step, 0
        self.state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
        return True

    @property
    def exhausted(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        if self.state:
            model.load_state_dict(self.state)

    def checkpoint(self, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The kept weights (tensors by ``prefix + name``) and the selection state, for a checkpoint."""
        state = {"key": self.key, "accuracy": self.accuracy, "step": self.step, "stale": self.stale}
        return {prefix + name: value.contiguous() for name, value in self.state.items()}, state

    def restore_checkpoint(self, tensors: Mapping[str, Tensor], state: Mapping[str, Any], prefix: str) -> None:
        self.state = {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
        self.key = tuple(state["key"]) if state["key"] is not None else None
        self.accuracy, self.step, self.stale = state["accuracy"], state["step"], state["stale"]
