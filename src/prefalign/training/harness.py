"""The accelerate set-up every trainer shares (policy and reward): one way to build the Accelerator."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1) -> Accelerator:
    """An Accelerator with ``mixed_precision`` on CUDA only (CPU trains in fp32), accumulating ``grad_accum``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    on_cuda = torch.cuda.is_available()
    precision = mixed_precision if on_cuda else "no"
    if precision != mixed_precision:
        log.info("mixed_precision=%s needs CUDA; training in float32 on CPU", mixed_precision)
    # The precision lives in a process-wide singleton that refuses a change; trainers run one after another
    # in one process in direct mode and may ask for different ones. The distributed set-up (PartialState)
    # is kept.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the lr schedule num_processes
    # times per update, making warmup depend on the process count. Trainers step it once per optimizer step.
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        cpu=not on_cuda,
        step_scheduler_with_optimizer=False,
    )
