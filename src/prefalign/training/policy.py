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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from prefalign.config import DPOConfig, DROConfig, KTOConfig, PolicyTrainerConfig
from prefalign.losses.diffusion import diffusion_dpo_loss, diffusion_dro_loss, diffusion_kto_loss, dpo_metrics
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
from prefalign.training.harness import make_accelerator
from prefalign.training.weights import ShadowWeights, ema_state, load_ema_state, make_ema

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

from prefalign.training.features import Features

log = logging.getLogger(__name__)
MethodConfig = DPOConfig | DROConfig | KTOConfig
MetricsFn = Callable[[dict[str, float], int], None]


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
    drop = [torch.rand(1, generator=keyed_generator(seed, "prompt-dropout", int(i))).item() < rate for i in sample_ids]
    return torch.where(torch.tensor(drop), torch.full_like(text_rows, empty_row), text_rows)


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


def make_optimizer(params: list[Tensor], cfg: MethodConfig):
    """AdamW or Adafactor at ``cfg.lr`` with a linear warmup over ``cfg.warmup_steps``, then constant.

    The schedule is diffusers' ``constant_with_warmup``: step s of the warmup trains at s/W of the rate
    (the first update at 0).

    Adafactor follows the SDXL Diffusion-DPO recipe: a fixed learning rate (relative_step off) without the
    parameter-scale factor, weight decay 1e-2 like AdamW.
    """
    from diffusers.optimization import get_scheduler

    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(
            params, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-2
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    return opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps)


@dataclass
class PolicyRun:
    """One training run: the prepared UNet, its optimizer and schedule, and where it checkpoints.

    ``unet`` is what accelerate prepared (DDP-wrapped with several processes) and takes the trained
    forward; ``model`` is the bare peft UNet for the adapter switch, the sampler and the weights.
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

    def backward_and_step(self, loss: Tensor, max_grad_norm: float) -> tuple[float, float | None]:
        """Backward of one micro-batch, then ``optimizer_step``; returns the learning rate this update used
        (read before the schedule steps) and the gradient norm (None before the last micro-step)."""
        self.accelerator.backward(loss)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        return lr, self.optimizer_step(max_grad_norm)

    def optimizer_step(self, max_grad_norm: float) -> float | None:
        """Clip, step and zero the gradients at the last micro-step of an update; None before it."""
        if not self.accelerator.sync_gradients:
            return None
        grad_norm = float(self.accelerator.clip_grad_norm_(list(self.params.values()), max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def global_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over processes (equal local batches, so the mean of means is the global mean)."""
        keys = sorted(values)
        local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        reduced = self.accelerator.reduce(local, reduction="mean") if self.accelerator.num_processes > 1 else local
        return dict(zip(keys, reduced.tolist(), strict=True))

    def maybe_checkpoint(
        self,
        steps_done: int,
        every: int,
        history: TrainHistory,
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
            history=history.metrics,
            shared=shared,
            local=local,
            state=state,
            export=export,
        )

    def finish(self) -> None:
        """Back to a plain module (drops accelerate's autocast wrapper) and release accelerate's references."""
        self.accelerator.wait_for_everyone()
        self.accelerator.unwrap_model(self.unet, keep_fp32_wrapper=False)
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

    Raises:
        CheckpointMismatchError: ``checkpoint_dir`` holds checkpoints of a different run.
        ValueError: a LoRA target matches no module of the UNet (named).
    """
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum)
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
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    optimizer, lr_scheduler = make_optimizer(list(params.values()), cfg)
    prepared, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_trainable_hooks(accelerator, unet)
    resumed = None
    if resume_from is not None:
        resumed = load_training_state(accelerator, resume_from)
        log.info("resuming from %s (step %d of %d)", resume_from, resumed.step, cfg.steps)
    unet.train()
    return PolicyRun(
        accelerator, prepared, unet, params, optimizer, lr_scheduler, n_trainable, identity, checkpoint_dir, resumed
    )


def _log_start(run: PolicyRun, method: str, cfg: MethodConfig, n_items: int, extra: str) -> None:
    acc = run.accelerator
    global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
    if acc.is_main_process:
        log.info(
            "%s: %d items, global batch %d (%d per micro-batch x %d accum x %d processes), %d steps, "
            "%d trainable LoRA params, %s, precision %s, optimizer %s, checkpoints %s%s",
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


def _record(
    run: PolicyRun,
    history: TrainHistory,
    step: int,
    sums: dict[str, float],
    n_micro: int,
    extra: dict[str, float],
    log_metrics: MetricsFn | None,
    log_every: int,
) -> None:
    metrics = {**run.global_mean({k: v / n_micro for k, v in sums.items()}), **extra}
    history.append(metrics)
    if log_metrics and run.accelerator.is_main_process and step % log_every == 0:
        log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)


def _add(sums: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value


def _dpo_micro_errors(run: PolicyRun, scheduler, data: _PairData, ids: np.ndarray, cfg: DPOConfig, seed: int):
    """(err_w, err_l, ref_err_w, ref_err_l) of the global samples ``ids`` (keyed item, t, ε, dropout)."""
    items = torch.from_numpy(keyed_order(data.n_pairs, ids, seed=seed, purpose="dpo-order"))
    t, noise = keyed_timesteps_and_noise(
        ids, seed=seed, purpose="dpo", shape=data.latent_shape, timestep_min=cfg.timestep_min
    )
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    to = run.device
    latents = data.feats.latents
    noisy, t2, cond2, target = stack_pair(
        scheduler,
        latents[data.rows_w[items]].to(to),
        latents[data.rows_l[items]].to(to),
        data.feats.text[cond_rows].to(to),
        t.to(to),
        noise.to(to),
    )
    err, ref_err = policy_and_reference_errors(run.unet, run.model, noisy, t2, cond2, target)
    batch = len(ids)
    return err[:batch], err[batch:], ref_err[:batch], ref_err[batch:]


@dataclass
class _PairData:
    feats: Features
    rows_w: Tensor
    rows_l: Tensor
    rows_c: Tensor

    @property
    def n_pairs(self) -> int:
        return len(self.rows_w)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.feats.latents.shape[1:])


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
        log_every: steps between ``log_metrics`` calls.

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
    data = _PairData(feats, feats.latent_rows(pairs_w), feats.latent_rows(pairs_l), feats.text_rows(prompts))
    scheduler = make_scheduler("ddpm")
    _log_start(run, "DPO", cfg, len(pairs_w), f", beta {cfg.beta:g} ({cfg.variant})")
    history = TrainHistory.restored(run.resumed)
    for step in _progress(run, cfg.steps, "train dpo"):
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = run.sample_ids(step, micro, cfg, cfg.batch_size)
            with run.accelerator.accumulate(run.unet):
                with run.accelerator.autocast():
                    errs = _dpo_micro_errors(run, scheduler, data, ids, cfg, seed)
                    loss = diffusion_dpo_loss(*errs, beta=cfg.beta, variant=cfg.variant).mean()
                lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
            _add(sums, {"loss": loss.item(), **dpo_metrics(*errs, beta=cfg.beta)})
        _record(
            run, history, step, sums, cfg.grad_accum, {"grad_norm": grad_norm or 0.0, "lr": lr}, log_metrics, log_every
        )
        run.maybe_checkpoint(
            step + 1, cfg.checkpoint_every, history, export=lambda folder: save_lora(run.model, folder)
        )
    run.finish()
    return history


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
    sampler = make_scheduler("dpmsolver++")
    device = cond.device
    if timesteps is None:
        sampler.set_timesteps(steps, device=device)
    else:
        sampler.set_timesteps(timesteps=timesteps, device=device)
    if initial_noise is None:
        shape = (cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        initial_noise = torch.randn(shape, generator=generator)
    x = initial_noise.to(device) * sampler.init_noise_sigma
    states, times, eps_all = [], [], []
    for t in sampler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
        eps = unet(x, t_batch, encoder_hidden_states=cond).sample.float()
        if guidance != 1.0:
            eps_uncond = unet(x, t_batch, encoder_hidden_states=uncond.expand_as(cond)).sample.float()
            eps = eps_uncond + guidance * (eps - eps_uncond)
        states.append(x), times.append(t_batch), eps_all.append(eps)
        x = sampler.step(eps, t, x).prev_sample
    return torch.stack(states), torch.stack(times), torch.stack(eps_all)


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


def _record_round(
    run: PolicyRun,
    sampler_copy: ShadowWeights,
    data: _ExpertData,
    ids: np.ndarray,
    round_id: int,
    cfg: DROConfig,
    seed: int,
) -> dict[str, Tensor]:
    """Trajectories of the lagged sampler adapter for the global samples ``ids`` (keyed x_T, keyed grid)."""
    items = torch.from_numpy(keyed_order(data.n_experts, ids, seed=seed, purpose="dro-order"))
    shape = tuple(data.feats.latents.shape[1:])
    x_T = torch.stack([torch.randn(shape, generator=keyed_generator(seed, "dro-sample", int(i))) for i in ids])
    grid = sampler_grid(cfg.sample_steps, cfg.timestep_jitter, seed=seed, round_id=round_id)
    run.model.eval()
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    with sampler_copy.swapped_in(run.params), run.accelerator.autocast():
        states, times, eps = record_trajectories(
            run.model,
            data.feats.text[cond_rows].to(run.device),
            data.uncond.to(run.device),
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            initial_noise=x_T,
            timesteps=grid,
        )
    run.model.train()
    return {"states": states, "times": times, "eps": eps}


def _dro_micro_errors(
    run: PolicyRun,
    scheduler,
    data: _ExpertData,
    buffer: dict[str, Tensor],
    ids: np.ndarray,
    step: int,
    seed: int,
    cfg: DROConfig,
):
    """(err_expert, ref_err_expert, err_policy, ref_err_policy) of the global samples ``ids`` at ``step``.

    Each sample draws, keyed by (step, sample), which recorded state x_t it trains on and the fresh noise
    ē of its expert, which is diffused to the same t.

    A sample whose prompt was dropped (``cfg.prompt_dropout``, keyed by sample) was sampled and trains
    with the empty prompt, as published.

    ``policy_target="recorded"``: the regression target of the policy half is the recorded ε_pol; both
    halves go through one forward (DDP allows one forward per backward). ``"current"``: the target is
    ε_φ(x_t) of the adapter being trained, as in the published code, whose sampler equals φ throughout
    each accumulation window: P_φ is then exactly 0 with zero gradient, so only the expert half needs
    a forward with gradient, and the policy half costs two no-grad forwards (adapter on and off) that
    give P_ref = ||ε_ref(x_t) − ε_φ(x_t)||².
    """
    items = torch.from_numpy(keyed_order(data.n_experts, ids, seed=seed, purpose="dro-order"))
    n_states, batch = buffer["states"].shape[:2]
    shape = tuple(buffer["states"].shape[2:])
    gens = [keyed_generator(seed, "dro-step", step, int(i)) for i in ids]
    which = torch.cat([torch.randint(0, n_states, (1,), generator=g) for g in gens]).to(run.device)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(run.device)
    rows = torch.arange(batch, device=run.device)
    x_t, t, target_pol = buffer["states"][which, rows], buffer["times"][which, rows], buffer["eps"][which, rows]
    noisy_expert = scheduler.add_noise(data.feats.latents[data.rows_x[items]].to(run.device), noise, t)
    cond_rows = drop_prompts(data.rows_c[items], ids, cfg.prompt_dropout, data.feats.empty_prompt_row, seed=seed)
    cond = data.feats.text[cond_rows].to(run.device)
    if cfg.policy_target == "current":
        err_expert, ref_err_expert = policy_and_reference_errors(run.unet, run.model, noisy_expert, t, cond, noise)
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
        torch.cat([noise, target_pol]),
    )
    return err[:batch], ref_err[:batch], err[batch:], ref_err[batch:]


def _dro_metrics(err_expert, ref_err_expert, err_policy, ref_err_policy, margin: float) -> dict[str, float]:
    with torch.no_grad():
        diff = (err_expert - ref_err_expert) - (err_policy - ref_err_policy)
        return {
            "err_expert": float(err_expert.mean()),
            "ref_err_expert": float(ref_err_expert.mean()),
            "err_policy": float(err_policy.mean()),
            "ref_err_policy": float(ref_err_policy.mean()),
            "active": float((diff + margin > 0).float().mean()),
        }


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
        log_every: steps between ``log_metrics`` calls.

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
    uncond = feats.text[feats.empty_prompt_row : feats.empty_prompt_row + 1]
    data = _ExpertData(feats, feats.latent_rows(expert_shas), feats.text_rows(expert_prompts), uncond)
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
    history = TrainHistory.restored(run.resumed)
    for step in _progress(run, cfg.steps, "train dro"):
        round_id = step // cfg.reuse
        if step % cfg.reuse == 0:
            buffers = [
                _record_round(
                    run, sampler_copy, data, run.sample_ids(round_id, m, cfg, cfg.batch_size), round_id, cfg, seed
                )
                for m in range(cfg.grad_accum)
            ]
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = run.sample_ids(round_id, micro, cfg, cfg.batch_size)
            with run.accelerator.accumulate(run.unet):
                with run.accelerator.autocast():
                    errs = _dro_micro_errors(run, scheduler, data, buffers[micro], ids, step, seed, cfg)
                    loss = diffusion_dro_loss(*errs, margin=cfg.margin).mean()
                lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
            _add(sums, {"loss": loss.item(), **_dro_metrics(*errs, cfg.margin)})
        if (step + 1) % cfg.sync_every == 0:
            sampler_copy.copy_from(run.params)
        if ema is not None:
            ema.step(run.params.values())
        _record(
            run, history, step, sums, cfg.grad_accum, {"grad_norm": grad_norm or 0.0, "lr": lr}, log_metrics, log_every
        )
        mid_round = (step + 1) % cfg.reuse != 0
        run.maybe_checkpoint(
            step + 1,
            cfg.checkpoint_every,
            history,
            shared={**sampler_copy.state("sampler."), **(ema_state(ema, list(run.params), "ema.") if ema else {})},
            local=_buffer_state(buffers) if mid_round else None,
            state={"ema_updates": ema.optimization_step} if ema else None,
        )
    if ema is not None:
        ema.copy_to(run.params.values())
    run.finish()
    return history


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
        log_every: steps between ``log_metrics`` calls.

    Returns:
        Per-step metrics.
    """
    if not expert_shas:
        raise ValueError("train_sft: no expert demonstrations")
    run = start_policy_run(
        unet, cfg, seed=seed, purpose="sft", checkpoint_dir=None, data_sha=strings_sha(expert_shas, expert_prompts)
    )
    rows_x, rows_c = feats.latent_rows(expert_shas), feats.text_rows(expert_prompts)
    scheduler = make_scheduler("ddpm")
    ema = make_ema(run.params, cfg.ema_decay, warmup=False) if cfg.ema_decay > 0 else None
    _log_start(run, "SFT on experts", cfg, len(expert_shas), f", ema {cfg.ema_decay:g}")
    history = TrainHistory()
    for step in _progress(run, cfg.steps, "train sft"):
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = run.sample_ids(step, micro, cfg, cfg.batch_size)
            _, batch = _image_batch(
                run, scheduler, feats, rows_x, rows_c, ids, seed=seed, purpose="sft", prompt_dropout=cfg.prompt_dropout
            )
            with run.accelerator.accumulate(run.unet):
                with run.accelerator.autocast():
                    err, ref_err = policy_and_reference_errors(run.unet, run.model, *batch)
                    loss = err.mean()
                lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
            _add(sums, {"loss": loss.item(), "err_expert": float(err.mean()), "ref_err_expert": float(ref_err.mean())})
        if ema is not None:
            ema.step(run.params.values())
        _record(
            run, history, step, sums, cfg.grad_accum, {"grad_norm": grad_norm or 0.0, "lr": lr}, log_metrics, log_every
        )
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
    authors' estimate of the KL term), averaged over processes so that N processes train as one.

    Args:
        unet: the base UNet; it gets the adapter in place and holds the trained adapter on return.
        images, prompts, desirable: the judged image sha, its prompt and the thumbs-up flag of each item.
        feats: cached latents and text embeddings.
        cfg: the ``kto`` section.
        seed: root of every keyed draw.
        log_metrics: called with ``train/*`` metrics every ``log_every`` steps on the main process.
        checkpoint_dir: the run's checkpoint folder; resumed from when it holds this run's checkpoints.
        log_every: steps between ``log_metrics`` calls.

    Returns:
        Per-step metrics of the whole run.

    Raises:
        ValueError: no feedback, or only one kind of it (KTO needs desirable and undesirable examples).
    """
    if len(set(desirable)) < 2:
        raise ValueError(f"train_kto: needs desirable and undesirable feedback, got {len(desirable)} of one kind")
    data_sha = strings_sha(images, prompts, [str(bool(d)) for d in desirable])
    run = start_policy_run(unet, cfg, seed=seed, purpose="kto", checkpoint_dir=checkpoint_dir, data_sha=data_sha)
    rows_x, rows_c = feats.latent_rows(images), feats.text_rows(prompts)
    wanted = torch.tensor(desirable, dtype=torch.bool)
    scheduler = make_scheduler("ddpm")
    _log_start(run, "KTO", cfg, len(images), f", beta {cfg.beta:g}, {int(wanted.sum())} desirable")
    history = TrainHistory.restored(run.resumed)
    for step in _progress(run, cfg.steps, "train kto"):
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = run.sample_ids(step, micro, cfg, cfg.batch_size)
            items, batch = _image_batch(
                run,
                scheduler,
                feats,
                rows_x,
                rows_c,
                ids,
                seed=seed,
                purpose="kto",
                prompt_dropout=cfg.prompt_dropout,
                timestep_min=cfg.timestep_min,
            )
            with run.accelerator.accumulate(run.unet):
                with run.accelerator.autocast():
                    err, ref_err = policy_and_reference_errors(run.unet, run.model, *batch)
                    kl_ref = run.global_mean({"g": float((ref_err - err).mean())})["g"]
                    loss = diffusion_kto_loss(
                        err, ref_err, wanted[items].to(run.device), beta=cfg.beta, kl_ref=max(kl_ref, 0.0)
                    ).mean()
                lr, grad_norm = run.backward_and_step(loss, cfg.max_grad_norm)
            _add(sums, {"loss": loss.item(), "kl_ref": kl_ref, "model_err": float(err.mean())})
        _record(
            run, history, step, sums, cfg.grad_accum, {"grad_norm": grad_norm or 0.0, "lr": lr}, log_metrics, log_every
        )
        run.maybe_checkpoint(step + 1, cfg.checkpoint_every, history)
    run.finish()
    return history


def _image_batch(
    run: PolicyRun,
    scheduler,
    feats: Features,
    rows_x: Tensor,
    rows_c: Tensor,
    ids: np.ndarray,
    *,
    seed: int,
    purpose: str,
    prompt_dropout: float,
    timestep_min: int = 0,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Items and (noisy latents, t, text, ε) of the global samples ``ids`` of a one-image-per-sample trainer.

    Keyed item order, t (uniform on ``timestep_min``..999), ε and prompt dropout.
    """
    items = torch.from_numpy(keyed_order(len(rows_x), ids, seed=seed, purpose=f"{purpose}-order"))
    t, noise = keyed_timesteps_and_noise(
        ids,
        seed=seed,
        purpose=purpose,
        shape=tuple(feats.latents.shape[1:]),
        timestep_min=timestep_min,
    )
    t, noise = t.to(run.device), noise.to(run.device)
    cond_rows = drop_prompts(rows_c[items], ids, prompt_dropout, feats.empty_prompt_row, seed=seed)
    noisy = scheduler.add_noise(feats.latents[rows_x[items]].to(run.device), noise, t)
    return items, (noisy, t, feats.text[cond_rows].to(run.device), noise)


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
