"""The accelerate set-up every trainer shares (policy and reward): one way to build the Accelerator.

Also the GPU-only switches of the policy trainer: TF32, frozen base weights in bf16 and channels-last, and
``torch.compile``. Each is applied only on CUDA, so CPU runs (the demo, the tests) compute exactly what they
computed without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1) -> Accelerator:
    """An Accelerator with ``mixed_precision`` on CUDA only (CPU trains in fp32), accumulating ``grad_accum``.

    On CUDA it also allows TF32 for float32 matmuls and convolutions (``allow_tf32``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    on_cuda = torch.cuda.is_available()
    precision = mixed_precision if on_cuda else "no"
    if precision != mixed_precision:
        log.info("mixed_precision=%s needs CUDA; training in float32 on CPU", mixed_precision)
    if on_cuda:
        allow_tf32()
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


def allow_tf32() -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions left outside autocast (the fp32 runs, the
    optimizer-side norms). Process-wide and CUDA-only: CPU kernels ignore it.

    torch 2.9 replaced ``torch.backends.cuda.matmul.allow_tf32`` / ``cudnn.allow_tf32`` by ``fp32_precision``
    and warns on the old names.
    """
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # torch swaps in a module class that has it


@dataclass
class FrozenWeights:
    """What ``store_frozen_weights`` changed, to put the frozen weights back as they were."""

    originals: dict[str, Tensor] = field(default_factory=dict)
    channels_last: list[str] = field(default_factory=list)


def store_frozen_weights(model: torch.nn.Module, *, dtype: torch.dtype | None, channels_last: bool) -> FrozenWeights:
    """Store the frozen (``requires_grad=False``) parameters of ``model`` for a GPU step, in place.

    Only the base weights change: trainable parameters (LoRA) keep their float32, the optimizer and the
    gradient clipping see exactly what they saw before. Call after the adapter is added: peft gives a new
    adapter the dtype of its base layer.

    Args:
        model: the UNet with its adapter.
        dtype: store the frozen weights in this dtype (bf16 under bf16 autocast: autocast casts every
            matmul and convolution input to bf16 anyway, so a bf16 copy halves their memory and spares
            the cast at every call); None keeps their dtype. The float32 originals are kept on the host.
        channels_last: store frozen 4-D (convolution) weights channels-last, the layout cuDNN's tensor-core
            kernels take; the activations follow the weights' layout from the first convolution on.

    Returns:
        What ``restore_frozen_weights`` needs to undo it.
    """
    frozen = FrozenWeights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                continue
            if dtype is not None and param.dtype != dtype:
                frozen.originals[name] = param.detach().cpu()
                param.data = param.data.to(dtype)
            if channels_last and param.ndim == 4:
                frozen.channels_last.append(name)
                param.data = param.data.contiguous(memory_format=torch.channels_last)
    return frozen


def restore_frozen_weights(model: torch.nn.Module, frozen: FrozenWeights) -> None:
    """Undo ``store_frozen_weights``: the original float32 weights, contiguous again (safetensors needs it).

    A caller merges the adapter into these weights and exports them: they must be the ones it passed in,
    not a bf16 rounding of them.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in frozen.channels_last:
            params[name].data = params[name].data.contiguous()
        for name, original in frozen.originals.items():
            params[name].data = original.to(params[name].device)


def compile_module(model: torch.nn.Module, *, backend: Any = "inductor") -> None:
    """``torch.compile`` a module in place (``nn.Module.compile``): every call of it, direct or through a
    wrapper such as DistributedDataParallel, runs the compiled code.

    A policy step calls the UNet twice: with gradients and adapters on (the policy), then under ``no_grad``
    with adapters off (the reference). peft's ``disable_adapters`` flips a Python flag on every LoRA layer
    and the adapters' ``requires_grad``; dynamo guards on those and on the grad mode, so it compiles one graph
    for each pass and picks between them by their guards from then on: two compilations in the first step,
    none after (tests/unit/test_policy_trainer.py counts them).

    Args:
        model: the module to compile.
        backend: the dynamo backend; tests pass a counting backend that needs no C++ compiler.
    """
    model.compile(backend=backend)


def uncompile_module(model: torch.nn.Module) -> None:
    """Undo ``compile_module``: the caller gets back a module that runs eagerly (it may merge the adapter,
    change its structure and sample with it; compiled guards would recompile at each of those)."""
    # nn.Module.compile has no public inverse; it only sets this attribute, which __call__ reads.
    model._compiled_call_impl = None
