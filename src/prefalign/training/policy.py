"""Policy training on cached features: offline Diffusion-DPO and hybrid Diffusion-DRO with LoRA.

The loops stay linear: draw keyed (t, ε) -> denoising errors -> loss function -> backward -> log. The
maths lives in ``prefalign.losses.diffusion`` and ``prefalign.training.denoise``.

One code path from one CPU process to several GPUs: an ``accelerate.Accelerator`` places the UNet,
applies mixed precision (CUDA only), accumulates gradients and averages them over processes. Exactness
rests on three rules:

* every random draw (item, timestep, noise, prompt dropout, sampler noise) is keyed by the *global*
  sample index, so a sample is the same whichever process draws it and whenever (resume);
* optimizer step s trains the global samples [s·G, (s+1)·G), G = batch_size × grad_accum ×
  num_processes; each process takes its contiguous share of every micro-batch, takes the mean loss over
  its b samples, accelerate divides by grad_accum and DDP averages over processes: the gradient is the
  mean over the G samples, as one process with the same global batch would compute;
* checkpoints (``prefalign.training.checkpoints``) restore model, optimizer, scheduler, RNG and the
  step, and the step is the data position.

Nothing in a step waits for the GPU. Metrics stay on the device and are read back in one transfer every
``log_every`` steps (``DeferredMetrics``); the host-side inputs of step s + 1 (keyed draws, feature
lookups) are prepared on a worker thread while step s runs (``StepPrefetcher``). On CUDA the UNet is
compiled (``trainer.compile``), its frozen weights are stored in bf16 under bf16 mixed precision and
channels-last, TF32 is on and AdamW is fused; on a CPU none of that applies and the numbers are those of
the plain loop, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from prefalign.config import DPOConfig, DROConfig, KTOConfig, PolicyTrainerConfig
from prefalign.losses.diffusion import diffusion_dpo_loss, diffusion_dro_loss, diffusion_kto_loss, dpo_metric_tensors
from prefalign.models.diffusion import add_lora, make_scheduler, save_lora
from prefalign.seeding import derive_seed, keyed_generator
from prefalign.training.checkpoints import (
    RunIdentity,
    TrainingState,
    config_sha,
    load_training_state,
    register_trainable_hooks,
    resumable_checkpoint,
    save_training_state,
    strings_sha,
    weights_sha,
)
from prefalign.training.denoise import (
    keyed_timesteps_and_noise,
    policy_and_reference_errors,
    reference_errors,
    stack_pair,
)
from prefalign.training.harness import (
    FrozenWeights,
    compile_module,
    make_accelerator,
    restore_frozen_weights,
    store_frozen_weights,
    uncompile_module,
)
from prefalign.training.weights import ShadowWeights, ema_state, load_ema_state, make_ema

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

from prefalign.training.features import Features

log = logging.getLogger(__name__)
MethodConfig = DPOConfig | DROConfig | KTOConfig
MetricsFn = Callable[[dict[str, float], int], None]
Inputs = TypeVar("Inputs")
Batch = TypeVar("Batch", bound="DataclassInstance")


@dataclass
class TrainHistory:
    steps: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def append(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(value)
        self.steps += 1

    @classmethod
    def restored(cls, state: TrainingState | None) -> TrainHistory:
        """The history of the steps before a resume (empty for a fresh run)."""
        if state is None:
            return cls()
        return cls(steps=state.step, metrics={k: list(v) for k, v in state.history.items()})


def keyed_order(n_items: int, sample_ids: np.ndarray, *, seed: int, purpose: str) -> np.ndarray:
    """Item of each global sample index: epoch e is a permutation keyed by (seed, purpose, e)."""
    epochs = sample_ids // n_items
    out = np.empty_like(sample_ids)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng(derive_seed(seed, purpose, int(epoch))).permutation(n_items)
        mask = epochs == epoch
        out[mask] = perm[sample_ids[mask] % n_items]
    return out


def drop_prompts(
    text_rows: torch.Tensor, sample_ids: np.ndarray, rate: float, empty_row: int, *, seed: int
) -> torch.Tensor:
    """Prompt dropout keyed by sample index (the same samples lose their prompt in every process)."""
    if rate <= 0:
        return text_rows
    uniforms = torch.cat(
        [torch.rand(1, generator=keyed_generator(seed, "prompt-dropout", int(i))) for i in sample_ids]
    )
    # Compared in float64, as a Python float would be: in float32 the rate would round and could flip a
    # sample that drew exactly the rounded value.
    return torch.where(uniforms.double() < rate, torch.full_like(text_rows, empty_row), text_rows)


def shard_sample_ids(
    step: int, micro: int, *, batch_size: int, grad_accum: int, process_index: int, num_processes: int
) -> np.ndarray:
    """Global sample indices of one process's micro-batch.

    Step s covers the G = b·A·P indices [s·G, (s+1)·G); micro-step a of all processes covers the a-th
    block of b·P of them, and process p takes the contiguous b at offset p·b. Which process and which
    micro-step a sample lands in changes only the order of a sum, never the set of samples of a step.
    """
    global_batch = batch_size * grad_accum * num_processes
    start = step * global_batch + micro * batch_size * num_processes + process_index * batch_size
    return np.arange(start, start + batch_size)


def make_optimizer(params: list[Tensor], cfg: MethodConfig, *, fused: bool = False):
    """AdamW or Adafactor at ``cfg.lr`` with a linear warmup over ``cfg.warmup_steps``, then constant.

    The schedule is diffusers' ``constant_with_warmup``: step s of the warmup trains at s/W of the rate
    (the first update at 0).

    Adafactor follows the SDXL Diffusion-DPO recipe: a fixed learning rate (relative_step off) without the
    parameter-scale factor, weight decay 1e-2 like AdamW.

    ``fused`` (CUDA): AdamW updates every tensor in one kernel and takes a GradScaler's inf check on the
    device instead of reading it back; CPU keeps the default implementation and its exact numbers.
    """
    from diffusers.optimization import get_scheduler

    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(
            params, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-2
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, **({"fused": True} if fused else {}))
    return opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps)


@dataclass
class PolicyRun:
    """One training run: the prepared UNet, its optimizer and schedule, and where it checkpoints.

    ``unet`` is what accelerate prepared (DDP-wrapped with several processes) and takes the trained
    forward; ``model`` is the bare peft UNet for the adapter switch, the sampler and the weights.
    ``frozen`` records how the base weights were stored for the GPU and ``compiled`` whether the UNet was
    compiled; ``finish`` undoes both.
    """

    accelerator: Accelerator
    unet: torch.nn.Module
    model: torch.nn.Module
    params: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    n_trainable: int
    identity: RunIdentity | None
    checkpoint_dir: Path | None
    resumed: TrainingState | None
    frozen: FrozenWeights | None = None
    compiled: bool = False

    @property
    def start_step(self) -> int:
        return self.resumed.step if self.resumed else 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sample_ids(self, step: int, micro: int, cfg: PolicyTrainerConfig, batch_size: int) -> np.ndarray:
        return shard_sample_ids(
            step,
            micro,
            batch_size=batch_size,
            grad_accum=cfg.grad_accum,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
        )

    def backward_and_step(self, loss: Tensor, max_grad_norm: float) -> tuple[float, Tensor | None]:
        """Backward of one micro-batch, then ``optimizer_step``; returns the learning rate this update used
        (read before the schedule steps; a Python float the schedule keeps, no device read) and the gradient
        norm on the device (None before the last micro-step)."""
        self.accelerator.backward(loss)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        return lr, self.optimizer_step(max_grad_norm)

    def optimizer_step(self, max_grad_norm: float) -> Tensor | None:
        """Clip, step and zero the gradients at the last micro-step of an update; None before it."""
        if not self.accelerator.sync_gradients:
            return None
        grad_norm = self.accelerator.clip_grad_norm_(list(self.params.values()), max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def mean_over_processes(self, local: Tensor) -> Tensor:
        """Elementwise mean over processes of a float64 tensor, on the device (equal local batches, so the
        mean of means is the global mean)."""
        if self.accelerator.num_processes == 1:
            return local
        return self.accelerator.reduce(local, reduction="mean")

    def maybe_checkpoint(
        self,
        steps_done: int,
        every: int,
        metrics: DeferredMetrics,
        *,
        shared: Mapping[str, Tensor] | None = None,
        local: Mapping[str, Tensor] | None = None,
        state: Mapping[str, Any] | None = None,
        export: Callable[[Path], object] | None = None,
    ) -> None:
        if self.checkpoint_dir is None or self.identity is None or every == 0 or steps_done % every:
            return
        save_training_state(
            self.accelerator,
            self.checkpoint_dir,
            steps_done,
            self.identity,
            history=metrics.flush().metrics,
            shared=shared,
            local=local,
            state=state,
            export=export,
        )

    def finish(self) -> None:
        """Back to a plain module: eager again (not compiled), the frozen weights as they came in, accelerate's
        autocast wrapper and references dropped."""
        self.accelerator.wait_for_everyone()
        if self.compiled:
            uncompile_module(self.model)
        self.accelerator.unwrap_model(self.unet, keep_fp32_wrapper=False)
        if self.frozen is not None:
            restore_frozen_weights(self.model, self.frozen)
        self.model.eval()
        self.accelerator.free_memory()


def start_policy_run(
    unet,
    cfg: MethodConfig,
    *,
    seed: int,
    purpose: str,
    data_sha: str,
    checkpoint_dir: Path | None,
) -> PolicyRun:
    """Checks, adapter, optimizer, ``accelerator.prepare`` and resume: everything before the first step.

    On CUDA also the GPU-only switches: frozen base weights in bf16 (under bf16 mixed precision) and
    channels-last, fused AdamW, and ``torch.compile`` of the UNet when ``cfg.compile``. On a CPU none of
    them applies: compiling would cost more than the demo's whole training and needs a C++ toolchain, and
    the CPU numbers stay those of the eager float32 loop.

    Raises:
        CheckpointMismatchError: ``checkpoint_dir`` holds checkpoints of a different run.
        ValueError: a LoRA target matches no module of the UNet (named).
    """
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    on_cuda = accelerator.device.type == "cuda"
    identity, resume_from = None, None
    if checkpoint_dir is not None:
        identity = RunIdentity(
            config_sha=config_sha(cfg),
            seed=seed,
            data_sha=data_sha,
            init_sha=weights_sha(unet),
            num_processes=accelerator.num_processes,
        )
        resume_from = resumable_checkpoint(checkpoint_dir, identity)
    # The adapter's random init is keyed, not taken from the global RNG: every process and every rerun
    # starts from the same weights whatever ran before in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, purpose, "lora-init"))
        n_trainable = add_lora(unet, cfg.lora)
    frozen = None
    if on_cuda:
        bf16 = accelerator.mixed_precision == "bf16"
        frozen = store_frozen_weights(unet, dtype=torch.bfloat16 if bf16 else None, channels_last=True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    optimizer, lr_scheduler = make_optimizer(list(params.values()), cfg, fused=on_cuda)
    prepared, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_trainable_hooks(accelerator, unet)
    resumed = None
    if resume_from is not None:
        resumed = load_training_state(accelerator, resume_from)
        log.info("resuming from %s (step %d of %d)", resume_from, resumed.step, cfg.steps)
    compiled = cfg.compile and on_cuda
    if compiled:
        compile_module(unet)
    unet.train()
    return PolicyRun(
        accelerator,
        prepared,
        unet,
        params,
        optimizer,
        lr_scheduler,
        n_trainable,
        identity,
        checkpoint_dir,
        resumed,
        frozen,
        compiled,
    )


def _log_start(run: PolicyRun, method: str, cfg: MethodConfig, n_items: int, extra: str) -> None:
    acc = run.accelerator
    global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
    if acc.is_main_process:
        log.info(
            "%s: %d items, global batch %d (%d per micro-batch x %d accum x %d processes), %d steps, "
            "%d trainable LoRA params, %s, precision %s, optimizer %s, compiled %s, checkpoints %s%s",
            method,
            n_items,
            global_batch,
            cfg.batch_size,
            cfg.grad_accum,
            acc.num_processes,
            cfg.steps,
            run.n_trainable,
            acc.device,
            acc.mixed_precision,
            cfg.optimizer,
            run.compiled,
            run.checkpoint_dir or "off",
            extra,
        )


def _progress(run: PolicyRun, total: int, desc: str):
    return tqdm(
        range(run.start_step, total),
        initial=run.start_step,
        total=total,
        desc=desc,
        mininterval=5,
        disable=not run.accelerator.is_main_process,
    )


# --------------------------------------------------------------------------------------------------
# What every trainer's step shares: device-side metrics, prefetched host inputs.
# --------------------------------------------------------------------------------------------------


class MicroSums:
    """Running float64 sums of the micro-steps' metrics, on the device.

    The additions run in the micro-step order from 0.0, as the Python floats they replace did, so a
    history read back from them is the same to the last bit.
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.total: Tensor | None = None

    def add(self, values: Mapping[str, Tensor]) -> None:
        keys = sorted(values)
        column = torch.stack([values[key].detach().double() for key in keys])
        if self.total is None:
            self.keys, self.total = keys, torch.zeros_like(column) + column
        elif keys != self.keys:
            raise ValueError(f"micro-step metrics {keys} differ from the step's first ones {self.keys}")
        else:
            self.total = self.total + column


@dataclass
class StepOutcome:
    """What one optimizer step leaves for the record, still on the device.

    Attributes:
        sums: this process's per-metric sums over the micro-steps.
        n_micro: the micro-steps summed.
        grad_norm: the gradient's total norm before clipping (None if the step did not update).
        lr: the learning rate the update used (a host value the schedule computes, no device read).
    """

    sums: MicroSums
    n_micro: int
    grad_norm: Tensor | None
    lr: float


class DeferredMetrics:
    """Per-step metrics kept on the device and read back in one transfer every ``log_every`` steps.

    Reading a GPU value (``.item()``, ``float()``) blocks the host until every kernel queued before it has
    run, and the GPU then idles while the host prepares and launches the next micro-step. Here a step
    only queues its metrics; ``flush`` (at log steps, checkpoints and the end) averages them over
    processes in one collective and copies them to the host in one transfer. The history, the logged
    values and the checkpoints are those of a per-step read, to the bit.
    """

    def __init__(self, run: PolicyRun, history: TrainHistory, log_metrics: MetricsFn | None, log_every: int) -> None:
        self.run, self.history, self.log_metrics, self.log_every = run, history, log_metrics, log_every
        self._keys: list[str] = []
        self._steps: list[tuple[int, float]] = []
        self._local: list[Tensor] = []
        self._grad_norms: list[Tensor] = []

    def record(self, step: int, outcome: StepOutcome) -> None:
        """Queue step ``step``'s metrics (no device read); flush at a log step."""
        if outcome.sums.total is None:
            raise ValueError(f"step {step} recorded no micro-step metrics")
        if self._steps and outcome.sums.keys != self._keys:
            raise ValueError(f"step {step} metrics {outcome.sums.keys} differ from the previous {self._keys}")
        self._keys = outcome.sums.keys
        self._local.append(outcome.sums.total / outcome.n_micro)
        grad_norm = outcome.grad_norm
        if grad_norm is None:
            grad_norm = torch.zeros((), device=self.run.device)
        self._grad_norms.append(grad_norm.detach().double().reshape(1))
        self._steps.append((step, outcome.lr))
        if self.log_every > 0 and step % self.log_every == 0:
            self.flush()

    def flush(self) -> TrainHistory:
        """Read every queued step back (one collective, one transfer), append it to the history, log it."""
        if not self._steps:
            return self.history
        with torch.profiler.record_function("prefalign.read_metrics"):
            means = self.run.mean_over_processes(torch.stack(self._local))
            rows = torch.cat([means, torch.stack(self._grad_norms)], dim=1).tolist()
        main = self.run.accelerator.is_main_process
        for (step, lr), row in zip(self._steps, rows, strict=True):
            metrics = {**dict(zip(self._keys, row[:-1], strict=True)), "grad_norm": row[-1], "lr": lr}
            self.history.append(metrics)
            if self.log_metrics and main and self.log_every > 0 and step % self.log_every == 0:
                self.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        self._steps, self._local, self._grad_norms = [], [], []
        return self.history


class StepPrefetcher(Generic[Inputs]):
    """The host-side inputs of step s + 1 prepared on a worker thread while step s runs.

    Keyed draws and feature lookups are CPU work. Done inline they sit between two steps, where a GPU
    idles; here ``get(s)`` returns step s's inputs (prepared while step s − 1 ran) and queues step
    s + 1's, so the step's critical path only hands them over. The draws are keyed, so which thread
    makes them changes no value.
    """

    def __init__(self, prepare: Callable[[int], Inputs], steps: range) -> None:
        self._prepare, self._steps = prepare, steps
        # One worker, within the caller's thread budget: it prepares one step at a time, in order.
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="prefalign-inputs",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        self._queued: tuple[int, Future[Inputs]] | None = None

    def get(self, step: int) -> Inputs:
        queued, self._queued = self._queued, None
        if queued is not None and queued[0] == step:
            future = queued[1]
        else:
            if queued is not None:
                queued[1].cancel()
            future = self._pool.submit(self._prepare, step)
        if step + 1 in self._steps:
            self._queued = (step + 1, self._pool.submit(self._prepare, step + 1))
        with torch.profiler.record_function("prefalign.wait_for_inputs"):
            return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queued = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor field of a dataclass copied to ``device`` without blocking the host (from pinned memory
    on CUDA, see ``pinned``); a no-op on the CPU."""
    moved = {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), Tensor)}
    return replace(batch, **{name: value.to(device, non_blocking=True) for name, value in moved.items()})


def pinned(batch: Batch, device: torch.device) -> Batch:
    """Every tensor field in page-locked memory when ``device`` is CUDA (an asynchronous copy needs it);
    unchanged otherwise."""
    if device.type != "cuda":
        return batch
    tensors = {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), Tensor)}
    return replace(batch, **{name: value.pin_memory() for name, value in tensors.items()})


def _row_shape(table: Tensor, rows: Tensor) -> tuple[int, ...]:
    """Shape of one row of a feature table, read from an indexed row (all the trainers ask of a table)."""
    return tuple(table[rows[:1]].shape[1:])


# --------------------------------------------------------------------------------------------------
# Diffusion-DPO
# --------------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """The pairs of a DPO run as rows of the feature cache: winner, loser and prompt rows per pair."""

    feats: Features
    rows_w: Tensor
    rows_l: Tensor
    rows_c: Tensor

    @property
    def n_pairs(self) -> int:
        return len(self.rows_w)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return _row_shape(self.feats.latents, self.rows_w)


@dataclass(frozen=True)
class PairBatch:
    """The inputs of ``stack_pair`` for one micro-batch: keyed (item, t, ε, prompt dropout), rows looked up."""

    latents_w: Tensor
    latents_l: Tensor
    cond: Tensor
    timesteps: Tensor
    noise: Tensor


def pair_batch(
    data: PairData, ids: np.ndarray, cfg: DPOConfig, *, seed: int, latent_shape: tuple[int, ...]
) -> PairBatch:
    """The host-side inputs of the global samples ``ids``: keyed pair order, t, ε and prompt dropout."""
    items = torch.from_numpy(keyed_order(data.n_pairs, ids, seed=seed, purpose="dpo-order"))
    t, noise = keyed_timesteps_and_noise(
        ids, seed=seed, purpose="dpo", shape=latent_shape, timestep_min=cfg.timestep_min
    )
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    latents = data.feats.latents
    return PairBatch(latents[data.rows_w[items]], latents[data.rows_l[items]], data.feats.text[cond_rows], t, noise)


class DPOStep:
    """One Diffusion-DPO optimizer step: what ``train_dpo`` repeats and ``bench_align.py`` times.

    ``step(s)`` trains the global samples of step s over ``cfg.grad_accum`` micro-batches and returns
    their metrics on the device. Its inputs come from a ``StepPrefetcher`` over ``steps``; ``close`` (or
    the ``with`` block) stops its worker.
    """

    def __init__(self, run: PolicyRun, data: PairData, cfg: DPOConfig, *, seed: int, steps: range) -> None:
        self.run, self.data, self.cfg, self.seed = run, data, cfg, seed
        self.scheduler = make_scheduler("ddpm")
        self.latent_shape = data.latent_shape
        self.inputs = StepPrefetcher(self._host_batches, steps)

    def _host_batches(self, step: int) -> list[PairBatch]:
        with torch.profiler.record_function("prefalign.prepare_inputs"):
            return [
                pinned(
                    pair_batch(
                        self.data,
                        self.run.sample_ids(step, micro, self.cfg, self.cfg.batch_size),
                        self.cfg,
                        seed=self.seed,
                        latent_shape=self.latent_shape,
                    ),
                    self.run.device,
                )
                for micro in range(self.cfg.grad_accum)
            ]

    def __call__(self, step: int) -> StepOutcome:
        run, cfg = self.run, self.cfg
        sums = MicroSums()
        lr, grad_norm = 0.0, None
        for host_batch in self.inputs.get(step):
            batch = to_device(host_batch, run.device)
            with run.accelerator.accumulate(run.unet):
                with run.accelerator.autocast():
                    errs = _pair_errors(run, self.scheduler, batch)
                    loss = diffusion_dpo_loss(*errs, beta=cfg.beta, variant=cfg.variant).mean()
                lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
            sums.add({"loss": loss, **dpo_metric_tensors(*errs, beta=cfg.beta)})
        return StepOutcome(sums, cfg.grad_accum, grad_norm, lr)

    def close(self) -> None:
        self.inputs.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pair_errors(run: PolicyRun, scheduler, batch: PairBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(err_w, err_l, ref_err_w, ref_err_l) of one micro-batch: winner and loser in one batched forward."""
    noisy, t2, cond2, target = stack_pair(
        scheduler, batch.latents_w, batch.latents_l, batch.cond, batch.timesteps, batch.noise
    )
    err, ref_err = policy_and_reference_errors(run.unet, run.model, noisy, t2, cond2, target)
    size = len(batch.timesteps)
    return err[:size], err[size:], ref_err[:size], ref_err[size:]


def train_dpo(
    unet,
    pairs_w: list[str],
    pairs_l: list[str],
    prompts: list[str],
    feats: Features,
    cfg: DPOConfig,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
    checkpoint_dir: Path | None = None,
    log_every: int = 10,
) -> TrainHistory:
    """Offline Diffusion-DPO with a fresh LoRA adapter on ``unet`` (its base weights are the reference).

    Every pair must be a strict preference: ties have no form in the published loss, so the caller drops
    them (and records how many) before calling; a tie passed here would be trained as a win.

    Args:
        unet: the base UNet; it gets the adapter in place and holds the trained adapter on return.
        pairs_w, pairs_l, prompts: winner sha, loser sha and prompt of each pair.
        feats: cached latents and text embeddings.
        cfg: the ``dpo`` section.
        seed: root of every keyed draw.
        log_metrics: called with ``train/*`` metrics every ``log_every`` steps on the main process.
        checkpoint_dir: the run's checkpoint folder; resumed from when it holds this run's checkpoints.
        log_every: steps between ``log_metrics`` calls (and between reads of the metrics from the device).

    Returns:
        Per-step metrics of the whole run (restored from the checkpoint on resume).

    Raises:
        ValueError: no pairs; a LoRA target matches nothing.
        CheckpointMismatchError: ``checkpoint_dir`` belongs to a different run.
    """
    if not pairs_w:
        raise ValueError("train_dpo: no training pairs (after dropping ties)")
    run = start_policy_run(
        unet,
        cfg,
        seed=seed,
        purpose="dpo",
        checkpoint_dir=checkpoint_dir,
        data_sha=strings_sha(pairs_w, pairs_l, prompts),
    )
    data = PairData(feats, feats.latent_rows(pairs_w), feats.latent_rows(pairs_l), feats.text_rows(prompts))
    _log_start(run, "DPO", cfg, len(pairs_w), f", beta {cfg.beta:g} ({cfg.variant})")
    metrics = DeferredMetrics(run, TrainHistory.restored(run.resumed), log_metrics, log_every)
    with DPOStep(run, data, cfg, seed=seed, steps=range(run.start_step, cfg.steps)) as dpo_step:
        for step in _progress(run, cfg.steps, "train dpo"):
            metrics.record(step, dpo_step(step))
            run.maybe_checkpoint(
                step + 1, cfg.checkpoint_every, metrics, export=lambda folder: save_lora(run.model, folder)
            )
    history = metrics.flush()
    run.finish()
    return history


# --------------------------------------------------------------------------------------------------
# Diffusion-DRO and its SFT control
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def record_trajectories(
    unet,
    cond: Tensor,
    uncond: Tensor,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator | None = None,
    initial_noise: Tensor | None = None,
    timesteps: list[int] | None = None,
):
    """Sample with DPM-Solver++ and record (x_t, t, ε_policy) at every step: x_t is the latent entering it.

    Args:
        unet: the sampling UNet (called under ``no_grad``).
        cond, uncond: text embeddings ``(B, L, D)`` and the empty prompt's ``(1, L, D)``.
        steps: solver steps when ``timesteps`` is None.
        guidance: classifier-free guidance scale (1 = none, as published).
        generator: draws x_T when ``initial_noise`` is not given.
        initial_noise: x_T before scaling by the solver's initial σ, ``(B, C, H, W)``.
        timesteps: a custom decreasing timestep grid (the jittered one of DRO).

    Returns:
        ``(states, times, eps)`` of shapes ``(S, B, C, H, W)``, ``(S, B)``, ``(S, B, C, H, W)``.
    """
    sampler = _solver(steps, timesteps)
    device = cond.device
    if initial_noise is None:
        shape = (cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        initial_noise = torch.randn(shape, generator=generator)
    x = initial_noise.to(device) * sampler.init_noise_sigma
    states, times, eps_all = [], [], []
    # The grid stays on the host: reading a device timestep back at every solver step would wait for the GPU.
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        eps = unet(x, t_batch, encoder_hidden_states=cond).sample.float()
        if guidance != 1.0:
            eps_uncond = unet(x, t_batch, encoder_hidden_states=uncond.expand_as(cond)).sample.float()
            eps = eps_uncond + guidance * (eps - eps_uncond)
        states.append(x), times.append(t_batch), eps_all.append(eps)
        x = sampler.step(eps, t, x).prev_sample
    return torch.stack(states), torch.stack(times), torch.stack(eps_all)


def _solver(steps: int, timesteps: list[int] | None):
    """DPM-Solver++ on ``steps`` of its own grid or on ``timesteps``, starting at the grid's first step.

    Setting the begin index spares the solver looking the first timestep up in its grid (a device read
    when the grid lives on the GPU); for a grid without repeats that lookup gives index 0 as well.
    """
    sampler = make_scheduler("dpmsolver++")
    if timesteps is None:
        sampler.set_timesteps(steps)
    else:
        sampler.set_timesteps(timesteps=timesteps)
    sampler.set_begin_index(0)
    return sampler


def sampler_grid(
    steps: int, jitter: int, *, seed: int, round_id: int, num_train_timesteps: int = 1000
) -> list[int] | None:
    """The online sampler's timestep grid of one round: the solver's own grid shifted by a keyed offset.

    One offset o ~ U{−j, …, j} per round (keyed by seed and round, so every process uses the same grid)
    is added to every timestep; results are clipped to [0, T − 1] and duplicates made by the clip are
    dropped. The published code draws a per-sample offset in [0, 50) for its 20-step grid; a per-round one
    keeps one solver schedule per batch. Over rounds, training covers t between the grid points.

    Returns:
        None when ``jitter`` is 0 (the solver's grid unchanged), else the decreasing list of timesteps.
    """
    if jitter == 0:
        return None
    solver = make_scheduler("dpmsolver++")
    solver.set_timesteps(steps)
    offset = int(np.random.default_rng(derive_seed(seed, "dro-jitter", round_id)).integers(-jitter, jitter + 1))
    shifted = np.clip(solver.timesteps.numpy().astype(np.int64) + offset, 0, num_train_timesteps - 1)
    return sorted({int(t) for t in shifted}, reverse=True)


@dataclass
class _ExpertData:
    feats: Features
    rows_x: Tensor
    rows_c: Tensor
    uncond: Tensor

    @property
    def n_experts(self) -> int:
        return len(self.rows_x)


@dataclass(frozen=True)
class _RoundInputs:
    """Host-side inputs of one micro-batch's trajectory recording: keyed x_T, prompts after dropout."""

    initial_noise: Tensor
    cond: Tensor


@dataclass(frozen=True)
class _DROInputs:
    """Host-side inputs of one DRO micro-step: keyed recorded-state index and expert noise, expert rows."""

    which: Tensor
    noise: Tensor
    expert_latents: Tensor
    cond: Tensor


@dataclass(frozen=True)
class _DROStepInputs:
    """One DRO step's host inputs: the round's grid and state count, a new round's inputs (at a round's first
    step; else None) and the micro-steps'."""

    grid: list[int] | None
    n_states: int
    rounds: list[_RoundInputs] | None
    micros: list[_DROInputs]


def _round_inputs(
    data: _ExpertData, ids: np.ndarray, cfg: DROConfig, seed: int, shape: tuple[int, ...]
) -> _RoundInputs:
    """Keyed x_T and the (dropout-applied) prompts of the global samples ``ids`` for the round's sampler."""
    items = torch.from_numpy(keyed_order(data.n_experts, ids, seed=seed, purpose="dro-order"))
    x_T = torch.stack([torch.randn(shape, generator=keyed_generator(seed, "dro-sample", int(i))) for i in ids])
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    return _RoundInputs(x_T, data.feats.text[cond_rows])


def _dro_inputs(
    data: _ExpertData, ids: np.ndarray, step: int, n_states: int, cfg: DROConfig, seed: int, shape: tuple[int, ...]
) -> _DROInputs:
    """Keyed by (step, sample): which recorded state each sample trains on and the fresh noise ē of its expert."""
    items = torch.from_numpy(keyed_order(data.n_experts, ids, seed=seed, purpose="dro-order"))
    gens = [keyed_generator(seed, "dro-step", step, int(i)) for i in ids]
    which = torch.cat([torch.randint(0, n_states, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    return _DROInputs(which, noise, data.feats.latents[data.rows_x[items]], data.feats.text[cond_rows])


def _record_round(
    run: PolicyRun,
    sampler_copy: ShadowWeights,
    data: _ExpertData,
    inputs: _RoundInputs,
    grid: list[int] | None,
    cfg: DROConfig,
) -> dict[str, Tensor]:
    """Trajectories of the lagged sampler adapter from the round's keyed x_T on the round's keyed grid."""
    run.model.eval()
    with sampler_copy.swapped_in(run.params), run.accelerator.autocast():
        states, times, eps = record_trajectories(
            run.model,
            inputs.cond,
            data.uncond,
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            initial_noise=inputs.initial_noise,
            timesteps=grid,
        )
    run.model.train()
    return {"states": states, "times": times, "eps": eps}


def _dro_micro_errors(run: PolicyRun, scheduler, buffer: dict[str, Tensor], inputs: _DROInputs, cfg: DROConfig):
    """(err_expert, ref_err_expert, err_policy, ref_err_policy) of one micro-batch at its drawn states.

    Each sample trains on the recorded state x_t its keyed draw picked and on its expert noised with the
    fresh ē to the same t. A sample whose prompt was dropped (``cfg.prompt_dropout``, keyed by sample)
    was sampled and trains with the empty prompt, as published.

    ``policy_target="recorded"``: the regression target of the policy half is the recorded ε_pol; both
    halves go through one forward (DDP allows one forward per backward). ``"current"``: the target is
    ε_φ(x_t) of the adapter being trained, as in the published code, whose sampler equals φ throughout
    each accumulation window: P_φ is then exactly 0 with zero gradient, so only the expert half needs
    a forward with gradient, and the policy half costs two no-grad forwards (adapter on and off) that
    give P_ref = ||ε_ref(x_t) − ε_φ(x_t)||².
    """
    batch = buffer["states"].shape[1]
    rows = torch.arange(batch, device=run.device)
    which = inputs.which
    x_t, t, target_pol = buffer["states"][which, rows], buffer["times"][which, rows], buffer["eps"][which, rows]
    noisy_expert = scheduler.add_noise(inputs.expert_latents, inputs.noise, t)
    cond = inputs.cond
    if cfg.policy_target == "current":
        err_expert, ref_err_expert = policy_and_reference_errors(
            run.unet, run.model, noisy_expert, t, cond, inputs.noise
        )
        with torch.no_grad():
            eps_current = run.model(x_t, t, encoder_hidden_states=cond).sample.float()
        ref_err_policy = reference_errors(run.model, x_t, t, cond, eps_current)
        return err_expert, ref_err_expert, torch.zeros_like(ref_err_policy), ref_err_policy
    err, ref_err = policy_and_reference_errors(
        run.unet,
        run.model,
        torch.cat([noisy_expert, x_t]),
        t.repeat(2),
        cond.repeat(2, 1, 1),
        torch.cat([inputs.noise, target_pol]),
    )
    return err[:batch], ref_err[:batch], err[batch:], ref_err[batch:]


def _dro_metrics(err_expert, ref_err_expert, err_policy, ref_err_policy, margin: float) -> dict[str, Tensor]:
    with torch.no_grad():
        diff = (err_expert - ref_err_expert) - (err_policy - ref_err_policy)
        return {
            "err_expert": err_expert.mean(),
            "ref_err_expert": ref_err_expert.mean(),
            "err_policy": err_policy.mean(),
            "ref_err_policy": ref_err_policy.mean(),
            "active": (diff + margin > 0).float().mean(),
        }


class _DROInputsMaker:
    """The host-side inputs of a DRO step (run on the prefetch worker): the round's at its first step, and
    each micro-step's, whose recorded-state draw needs the round's grid length."""

    def __init__(self, run: PolicyRun, data: _ExpertData, cfg: DROConfig, seed: int) -> None:
        self.run, self.data, self.cfg, self.seed = run, data, cfg, seed
        self.shape = _row_shape(data.feats.latents, data.rows_x)
        self._grids: dict[int, tuple[list[int] | None, int]] = {}

    def grid(self, round_id: int) -> tuple[list[int] | None, int]:
        """The round's jittered grid (None: the solver's own) and how many states its sampler records."""
        if round_id not in self._grids:
            grid = sampler_grid(self.cfg.sample_steps, self.cfg.timestep_jitter, seed=self.seed, round_id=round_id)
            self._grids = {round_id: (grid, len(_solver(self.cfg.sample_steps, grid).timesteps))}
        return self._grids[round_id]

    def __call__(self, step: int) -> _DROStepInputs:
        run, cfg, seed = self.run, self.cfg, self.seed
        round_id = step // cfg.reuse
        with torch.profiler.record_function("prefalign.prepare_inputs"):
            grid, n_states = self.grid(round_id)
            ids = [run.sample_ids(round_id, micro, cfg, cfg.batch_size) for micro in range(cfg.grad_accum)]
            rounds = None
            if step % cfg.reuse == 0:
                rounds = [pinned(_round_inputs(self.data, i, cfg, seed, self.shape), run.device) for i in ids]
            micros = [
                pinned(_dro_inputs(self.data, i, step, n_states, cfg, seed, self.shape), run.device) for i in ids
            ]
        return _DROStepInputs(grid, n_states, rounds, micros)


def _dro_update(
    run: PolicyRun,
    scheduler,
    buffers: list[dict[str, Tensor]],
    inputs: _DROStepInputs,
    cfg: DROConfig,
    step: int,
) -> StepOutcome:
    """One DRO optimizer step over the micro-batches, on the round's recorded trajectories."""
    sums = MicroSums()
    lr, grad_norm = 0.0, None
    for buffer, host_inputs in zip(buffers, inputs.micros, strict=True):
        if buffer["states"].shape[0] != inputs.n_states:
            raise RuntimeError(
                f"train_dro: step {step} drew among {inputs.n_states} states, "
                f"the round recorded {buffer['states'].shape[0]}"
            )
        micro_inputs = to_device(host_inputs, run.device)
        with run.accelerator.accumulate(run.unet):
            with run.accelerator.autocast():
                errs = _dro_micro_errors(run, scheduler, buffer, micro_inputs, cfg)
                loss = diffusion_dro_loss(*errs, margin=cfg.margin).mean()
            lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
        sums.add({"loss": loss, **_dro_metrics(*errs, cfg.margin)})
    return StepOutcome(sums, cfg.grad_accum, grad_norm, lr)


def train_dro(
    unet,
    expert_shas: list[str],
    expert_prompts: list[str],
    feats: Features,
    cfg: DROConfig,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
    checkpoint_dir: Path | None = None,
    log_every: int = 10,
) -> TrainHistory:
    """Hybrid Diffusion-DRO: a new LoRA on ``unet``, whose current weights are the reference θ_ref.

    Each round (every ``cfg.reuse`` updates) records fresh DPM-Solver++ trajectories (x_t, t, ε_pol) for
    the prompts of a batch of experts, and each update draws one recorded state per sample. The sampler
    is a frozen copy of the adapter that re-syncs with the trained one every ``cfg.sync_every`` = M
    updates. With M = 1 (as published) the recorded ε_pol equals ε_φ at the sampled states up to the
    updates since the round was recorded: P_φ = ||ε_φ − ε_pol||² is then ~0 with ~zero gradient, and the
    policy term acts as a data-dependent threshold P_ref = ||ε_ref − ε_pol||², not as a repulsive force
    (Wu et al. 2025, arXiv 2510.18353, Alg. 1). M > 1 makes it a repulsion from a policy lagging up to M
    updates behind.
    The timestep grid of each round is shifted by a per-round keyed offset in [−j, j]
    (``cfg.timestep_jitter``, see ``sampler_grid``).

    With ``cfg.ema_decay`` > 0 an EMA of the adapter weights is kept and, on return, is what the
    adapter of ``unet`` holds (the exported result). The caller merges it and exports a full UNet:
    the DRO adapter sits on top of the DPO-merged reference, so it is no LoRA of the base model.

    Args:
        unet: the reference UNet (base, or base with DPO merged); it gets the adapter in place.
        expert_shas, expert_prompts: the expert demonstrations and their prompts.
        feats: cached latents and text embeddings.
        cfg: the ``dro`` section.
        seed: root of every keyed draw.
        log_metrics: called with ``train/*`` metrics every ``log_every`` steps on the main process.
        checkpoint_dir: the run's checkpoint folder; resumed from when it holds this run's checkpoints.
        log_every: steps between ``log_metrics`` calls (and between reads of the metrics from the device).

    Returns:
        Per-step metrics of the whole run.

    Raises:
        ValueError: no experts; a LoRA target matches nothing.
        CheckpointMismatchError: ``checkpoint_dir`` belongs to a different run.
    """
    if not expert_shas:
        raise ValueError("train_dro: no expert demonstrations")
    run = start_policy_run(
        unet,
        cfg,
        seed=seed,
        purpose="dro",
        checkpoint_dir=checkpoint_dir,
        data_sha=strings_sha(expert_shas, expert_prompts),
    )
    empty_row = torch.tensor([feats.empty_prompt_row])
    data = _ExpertData(
        feats, feats.latent_rows(expert_shas), feats.text_rows(expert_prompts), feats.text[empty_row].to(run.device)
    )
    scheduler = make_scheduler("ddpm")
    sampler_copy = ShadowWeights(run.params)
    ema = make_ema(run.params, cfg.ema_decay, warmup=False) if cfg.ema_decay > 0 else None
    buffers = _restore_dro_state(run, sampler_copy, ema, cfg)
    _log_start(
        run,
        "DRO",
        cfg,
        len(expert_shas),
        f", reuse {cfg.reuse}, sync_every {cfg.sync_every}, "
        f"timestep_jitter {cfg.timestep_jitter}, ema {cfg.ema_decay:g}",
    )
    metrics = DeferredMetrics(run, TrainHistory.restored(run.resumed), log_metrics, log_every)
    with StepPrefetcher(_DROInputsMaker(run, data, cfg, seed), range(run.start_step, cfg.steps)) as prefetch:
        for step in _progress(run, cfg.steps, "train dro"):
            inputs = prefetch.get(step)
            if inputs.rounds is not None:
                buffers = [
                    _record_round(run, sampler_copy, data, to_device(r, run.device), inputs.grid, cfg)
                    for r in inputs.rounds
                ]
            if buffers is None:
                raise RuntimeError(f"train_dro: step {step} has no recorded trajectories (resume state lost)")
            outcome = _dro_update(run, scheduler, buffers, inputs, cfg, step)
            if (step + 1) % cfg.sync_every == 0:
                sampler_copy.copy_from(run.params)
            if ema is not None:
                ema.step(run.params.values())
            metrics.record(step, outcome)
            mid_round = (step + 1) % cfg.reuse != 0
            run.maybe_checkpoint(
                step + 1,
                cfg.checkpoint_every,
                metrics,
                shared={
                    **sampler_copy.state("sampler."),
                    **(ema_state(ema, list(run.params), "ema.") if ema else {}),
                },
                local=_buffer_state(buffers) if mid_round else None,
                state={"ema_updates": ema.optimization_step} if ema else None,
            )
    history = metrics.flush()
    if ema is not None:
        ema.copy_to(run.params.values())
    run.finish()
    return history


@dataclass(frozen=True)
class ImageBatch:
    """Host-side inputs of one micro-batch of a one-image-per-sample trainer (SFT, KTO)."""

    items: Tensor
    latents: Tensor
    cond: Tensor
    timesteps: Tensor
    noise: Tensor


class _ImageInputsMaker:
    """Keyed item order, t (uniform on ``timestep_min``..999), ε and prompt dropout of a step's micro-batches."""

    def __init__(
        self,
        run: PolicyRun,
        feats: Features,
        rows_x: Tensor,
        rows_c: Tensor,
        cfg: PolicyTrainerConfig,
        *,
        seed: int,
        purpose: str,
        batch_size: int,
        prompt_dropout: float,
        timestep_min: int = 0,
    ) -> None:
        self.run, self.feats, self.rows_x, self.rows_c, self.cfg = run, feats, rows_x, rows_c, cfg
        self.seed, self.purpose, self.batch_size = seed, purpose, batch_size
        self.prompt_dropout, self.timestep_min = prompt_dropout, timestep_min
        self.shape = _row_shape(feats.latents, rows_x)

    def __call__(self, step: int) -> list[ImageBatch]:
        with torch.profiler.record_function("prefalign.prepare_inputs"):
            return [
                pinned(self.batch(self.run.sample_ids(step, micro, self.cfg, self.batch_size)), self.run.device)
                for micro in range(self.cfg.grad_accum)
            ]

    def batch(self, ids: np.ndarray) -> ImageBatch:
        seed, purpose = self.seed, self.purpose
        items = torch.from_numpy(keyed_order(len(self.rows_x), ids, seed=seed, purpose=f"{purpose}-order"))
        t, noise = keyed_timesteps_and_noise(
            ids, seed=seed, purpose=purpose, shape=self.shape, timestep_min=self.timestep_min
        )
        cond_rows = drop_prompts(self.rows_c[items], ids, self.prompt_dropout, self.feats.empty_prompt_row, seed=seed)
        return ImageBatch(items, self.feats.latents[self.rows_x[items]], self.feats.text[cond_rows], t, noise)


def _noised(scheduler, batch: ImageBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_t, t, c, ε) of one micro-batch on the device."""
    return scheduler.add_noise(batch.latents, batch.noise, batch.timesteps), batch.timesteps, batch.cond, batch.noise


def train_sft(
    unet,
    expert_shas: list[str],
    expert_prompts: list[str],
    feats: Features,
    cfg: DROConfig,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
    log_every: int = 10,
) -> TrainHistory:
    """Supervised fine-tune on DRO's expert demonstrations: the DRO paper's "w/ SFT" control.

    Everything but the loss is DRO's: the adapter, learning rate, steps, batch, prompt dropout and the EMA
    of ``cfg``; the loss is the plain denoising error ||ε_φ(x̄_t, t, c) − ē||²/D of each expert at a keyed
    uniform t (A_φ of DRO without the reference and without the policy's own samples). A method that
    beats this control gains from its online negatives, not from seeing the experts.

    Args:
        unet: the starting UNet (base, or base with DPO merged); it gets the adapter in place.
        expert_shas, expert_prompts: the expert demonstrations and their prompts.
        feats: cached latents and text embeddings.
        cfg: the ``dro`` section.
        seed: root of every keyed draw.
        log_metrics: called with ``train/*`` metrics every ``log_every`` steps.
        log_every: steps between ``log_metrics`` calls (and between reads of the metrics from the device).

    Returns:
        Per-step metrics.
    """
    if not expert_shas:
        raise ValueError("train_sft: no expert demonstrations")
    run = start_policy_run(
        unet, cfg, seed=seed, purpose="sft", checkpoint_dir=None, data_sha=strings_sha(expert_shas, expert_prompts)
    )
    make_inputs = _ImageInputsMaker(
        run,
        feats,
        feats.latent_rows(expert_shas),
        feats.text_rows(expert_prompts),
        cfg,
        seed=seed,
        purpose="sft",
        batch_size=cfg.batch_size,
        prompt_dropout=cfg.prompt_dropout,
    )
    scheduler = make_scheduler("ddpm")
    ema = make_ema(run.params, cfg.ema_decay, warmup=False) if cfg.ema_decay > 0 else None
    _log_start(run, "SFT on experts", cfg, len(expert_shas), f", ema {cfg.ema_decay:g}")
    metrics = DeferredMetrics(run, TrainHistory(), log_metrics, log_every)
    with StepPrefetcher(make_inputs, range(run.start_step, cfg.steps)) as prefetch:
        for step in _progress(run, cfg.steps, "train sft"):
            sums = MicroSums()
            lr, grad_norm = 0.0, None
            for host_batch in prefetch.get(step):
                batch = _noised(scheduler, to_device(host_batch, run.device))
                with run.accelerator.accumulate(run.unet):
                    with run.accelerator.autocast():
                        err, ref_err = policy_and_reference_errors(run.unet, run.model, *batch)
                        loss = err.mean()
                    lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
                sums.add({"loss": loss, "err_expert": err.mean(), "ref_err_expert": ref_err.mean()})
            if ema is not None:
                ema.step(run.params.values())
            metrics.record(step, StepOutcome(sums, cfg.grad_accum, grad_norm, lr))
    history = metrics.flush()
    if ema is not None:
        ema.copy_to(run.params.values())
    run.finish()
    return history


def train_kto(
    unet,
    images: list[str],
    prompts: list[str],
    desirable: list[bool],
    feats: Features,
    cfg: KTOConfig,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
    checkpoint_dir: Path | None = None,
    log_every: int = 10,
) -> TrainHistory:
    """Diffusion-KTO (Li et al. 2024) on binary feedback, with a fresh LoRA adapter on ``unet`` (the reference).

    Each sample is one judged image at a keyed t ≥ ``cfg.timestep_min`` and keyed ε; its implicit reward
    is g = ref_err − err and the reference point z_ref is the detached batch mean of g, clamped at 0 (the
    authors' estimate of the KL term), averaged over processes so that N processes train as one. z_ref
    stays on the device: the loss takes it as a tensor.

    Args:
        unet: the base UNet; it gets the adapter in place and holds the trained adapter on return.
        images, prompts, desirable: the judged image sha, its prompt and the thumbs-up flag of each item.
        feats: cached latents and text embeddings.
        cfg: the ``kto`` section.
        seed: root of every keyed draw.
        log_metrics: called with ``train/*`` metrics every ``log_every`` steps on the main process.
        checkpoint_dir: the run's checkpoint folder; resumed from when it holds this run's checkpoints.
        log_every: steps between ``log_metrics`` calls (and between reads of the metrics from the device).

    Returns:
        Per-step metrics of the whole run.

    Raises:
        ValueError: no feedback, or only one kind of it (KTO needs desirable and undesirable examples).
    """
    if len(set(desirable)) < 2:
        raise ValueError(f"train_kto: needs desirable and undesirable feedback, got {len(desirable)} of one kind")
    data_sha = strings_sha(images, prompts, [str(bool(d)) for d in desirable])
    run = start_policy_run(unet, cfg, seed=seed, purpose="kto", checkpoint_dir=checkpoint_dir, data_sha=data_sha)
    wanted = torch.tensor(desirable, dtype=torch.bool)
    make_inputs = _ImageInputsMaker(
        run,
        feats,
        feats.latent_rows(images),
        feats.text_rows(prompts),
        cfg,
        seed=seed,
        purpose="kto",
        batch_size=cfg.batch_size,
        prompt_dropout=cfg.prompt_dropout,
        timestep_min=cfg.timestep_min,
    )
    scheduler = make_scheduler("ddpm")
    _log_start(run, "KTO", cfg, len(images), f", beta {cfg.beta:g}, {int(wanted.sum())} desirable")
    wanted = wanted.to(run.device)
    metrics = DeferredMetrics(run, TrainHistory.restored(run.resumed), log_metrics, log_every)
    with StepPrefetcher(make_inputs, range(run.start_step, cfg.steps)) as prefetch:
        for step in _progress(run, cfg.steps, "train kto"):
            sums = MicroSums()
            lr, grad_norm = 0.0, None
            for host_batch in prefetch.get(step):
                device_batch = to_device(host_batch, run.device)
                batch = _noised(scheduler, device_batch)
                with run.accelerator.accumulate(run.unet):
                    with run.accelerator.autocast():
                        err, ref_err = policy_and_reference_errors(run.unet, run.model, *batch)
                        kl_ref = run.mean_over_processes((ref_err - err).mean().detach().double().reshape(1))[0]
                        loss = diffusion_kto_loss(
                            err, ref_err, wanted[device_batch.items], beta=cfg.beta, kl_ref=kl_ref.clamp(min=0.0)
                        ).mean()
                    lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
                sums.add({"loss": loss, "kl_ref": kl_ref, "model_err": err.mean()})
            metrics.record(step, StepOutcome(sums, cfg.grad_accum, grad_norm, lr))
            run.maybe_checkpoint(step + 1, cfg.checkpoint_every, metrics)
    history = metrics.flush()
    run.finish()
    return history


def _buffer_state(buffers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {f"buffer.{micro}.{key}": value for micro, buffer in enumerate(buffers) for key, value in buffer.items()}


def _restore_dro_state(
    run: PolicyRun, sampler_copy: ShadowWeights, ema: EMAModel | None, cfg: DROConfig
) -> list[dict[str, Tensor]] | None:
    """Sampler copy, EMA and (mid-round) the recorded trajectories from the checkpoint resumed from."""
    if run.resumed is None:
        return None
    sampler_copy.load(run.resumed.shared, "sampler.")
    if ema is not None:
        load_ema_state(ema, list(run.params), run.resumed.shared, "ema.", int(run.resumed.state["ema_updates"]))
    if run.resumed.step % cfg.reuse == 0:
        return None
    return [
        {key: run.resumed.local[f"buffer.{micro}.{key}"].to(run.device) for key in ("states", "times", "eps")}
        for micro in range(cfg.grad_accum)
    ]


def merge_and_strip_lora(unet) -> None:
    """Fold the LoRA adapters into the base weights and remove the peft layers, in place.

    A UNet that still holds peft layers saves ``base_layer`` keys that ``from_pretrained`` cannot read.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    unet.unload_lora()


def save_history(history: TrainHistory, path: Path) -> Path:
    import json

    path.write_text(json.dumps({"steps": history.steps, "metrics": history.metrics}))
    return path
