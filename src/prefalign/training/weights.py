"""Detached copies of a model's trainable weights: DRO's lagged sampler, and the EMA every trainer keeps.

The EMA is diffusers' ``EMAModel``; these helpers give it the trainers' checkpoint layout (tensors by
parameter name, the update count in the checkpoint's state) and a swap-in for validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


class ShadowWeights:
    """A detached copy of the trainable (LoRA) weights: DRO's sampler adapter, re-synced every M updates.

    Not an EMA: the sampler is the trained adapter as it was at the last sync, which ``EMAModel`` cannot
    express.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.tensors = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def copy_from(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            self.tensors[name].copy_(p)

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


def make_ema(params: Mapping[str, Tensor], decay: float, *, warmup: bool) -> EMAModel:
    """diffusers' ``EMAModel`` of ``params``; the first update copies the weights, as EMAModel does.

    ``warmup``: the decay after s updates is min(d, (1 + s) / (10 + s)), TensorFlow's
    ExponentialMovingAverage schedule with num_updates (an average over a window that grows with training,
    about s/9 updates, until it reaches d); otherwise the decay is d from the second update on
    (``min_decay = d``), as DRO's published constant EMA.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params.values()), decay=decay, min_decay=0.0 if warmup else decay)


def ema_state(ema: EMAModel, names: list[str], prefix: str) -> dict[str, Tensor]:
    """The averaged tensors by ``prefix + parameter name`` (for a checkpoint's shared tensors)."""
    return {prefix + name: t for name, t in zip(names, ema.shadow_params, strict=True)}


def load_ema_state(ema: EMAModel, names: list[str], stored: Mapping[str, Tensor], prefix: str, updates: int) -> None:
    """Restore the averaged tensors and the update count (which sets the next decay) from a checkpoint."""
    with torch.no_grad():
        for name, t in zip(names, ema.shadow_params, strict=True):
            t.copy_(stored[prefix + name].to(t.device))
    ema.optimization_step = updates


@contextmanager
def ema_swapped_in(ema: EMAModel, params: Mapping[str, Tensor]) -> Iterator[None]:
    """The averaged weights in the model for the block; the trained ones restored bit for bit after it."""
    trained = list(params.values())
    ema.store(trained)
    ema.copy_to(trained)
    try:
        yield
    finally:
        ema.restore(trained)
