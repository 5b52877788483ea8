"""Detached copies of a model's trainable weights: a lagged sampler, an exponential moving average."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor


class ShadowWeights:
    """A detached copy of the trainable (LoRA) weights: DRO's lagged sampler adapter, or their EMA."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.tensors = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def copy_from(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            self.tensors[name].copy_(p)

    @torch.no_grad()
    def ema_update(self, params: Mapping[str, Tensor], decay: float) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ."""
        for name, p in params.items():
            self.tensors[name].mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    @torch.no_grad()
    def copy_into(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            p.copy_(self.tensors[name])

    @contextmanager
    def swapped_in(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """These weights in the model for the block, the trained ones restored bit for bit after it."""
        saved = {name: p.detach().clone() for name, p in params.items()}
        self.copy_into(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {prefix + name: t for name, t in self.tensors.items()}

    def load(self, stored: Mapping[str, Tensor], prefix: str) -> None:
        with torch.no_grad():
            for name, t in self.tensors.items():
                t.copy_(stored[prefix + name].to(t.device))
