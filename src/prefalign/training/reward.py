"""The reward-model training loop (Bradley–Terry on pairs, Plackett–Luce on rankings).

The loop stays linear: step plan and its images -> one step of ``reward_steps`` -> EMA -> periodic
validation -> early stopping on the validation loss (or accuracy, ``reward.select_on``), keeping the best
weights (``reward_selection``). It runs on the trainers' shared harness: the Accelerator of
``harness.make_accelerator``, diffusers' ``get_scheduler`` and ``EMAModel``, and the checkpoints of
``checkpoints`` (accelerate ``save_state``, atomic publish, the run's fingerprint, one mismatch error).
The data it indexes is ``reward_data``, the held-out report ``reward_scoring``.

At CLIP-L/H scale: images come from the device or are decoded on demand (``reward.preload_max_bytes``),
forwards run under bf16 autocast on CUDA (``reward.mixed_precision``) and the towers can recompute their
activations in the backward (``reward.gradient_checkpointing``). Under ``accelerate launch`` (the policies'
launcher) each of P processes trains on its share of a global batch of P × ``batch_size`` pairs, decoding
only its own images; gradients are averaged before clipping and validation is gathered, so every process
holds the same weights and stops at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from prefalign.config import RewardConfig
from prefalign.models.reward_model import RewardScorer
from prefalign.training.checkpoints import (
    RunIdentity,
    config_sha,
    load_training_state,
    register_trainable_hooks,
    resumable_checkpoint,
    save_training_state,
    strings_sha,
    weights_sha,
)
from prefalign.training.harness import make_accelerator
from prefalign.training.reward_data import RewardData, SplitTensors, image_batches, step_plans
from prefalign.training.reward_selection import BestWeights
from prefalign.training.reward_steps import train_step, validate
from prefalign.training.weights import ema_state, ema_swapped_in, load_ema_state, make_ema

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict[str, float], int], None]
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 1e-2
LOG_EVERY = 10


@dataclass
class TrainResult:
    """Outcome of ``train_reward_model``; the scorer holds the best weights on return.

    Attributes:
        best_val_accuracy: validation pairwise accuracy of the kept weights (NaN if val has no decided pairs).
        steps_run: optimizer steps taken (fewer than ``cfg.steps`` after early stopping).
        history: per step ``step``, ``loss``, ``lr``, ``logit_scale``; per evaluation ``eval_step``,
            ``val_accuracy``, ``val_loss``.
        best_step: the step whose weights were kept.
    """

    best_val_accuracy: float
    steps_run: int
    history: dict[str, list[float]]
    best_step: int = 0


def optimizer_for(model: torch.nn.Module, *, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases, norms and logit_scale); diffusers' cosine schedule with a linear warmup
    over 5% of the steps (step s of the warmup at s/W of the rate)."""
    from diffusers.optimization import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def run_identity(
    cfg: RewardConfig, train: RewardData, scorer: RewardScorer, seed: int, num_processes: int = 1
) -> RunIdentity:
    """What a checkpoint must match: the reward config, seed, training examples, starting weights, processes."""
    rankings = [] if train.ranking_images is None else [str(row) for row in train.ranking_images.tolist()]
    pairs = [f"{win},{lose},{y}" for win, lose, y in zip(train.pair_w, train.pair_l, train.pair_label, strict=True)]
    return RunIdentity(
        config_sha=config_sha(cfg),
        seed=seed,
        data_sha=strings_sha(train.image_shas, train.prompts, pairs, rankings),
        init_sha=weights_sha(scorer.model),
        num_processes=num_processes,
    )


def _loss_parts(cfg: RewardConfig, train: RewardData) -> tuple[bool, bool]:
    """Whether the configured loss uses pairs and/or rankings; PL without rankings is an error."""
    use_pairs, use_rankings = cfg.loss in ("bt", "mixed"), cfg.loss in ("pl", "mixed")
    if use_rankings and train.n_rankings == 0:
        raise ValueError(f"reward.loss={cfg.loss!r} needs rankings, but the {train.split!r} split has none; use 'bt'")
    return use_pairs, use_rankings


def _save(
    accelerator: Accelerator,
    root: Path,
    step: int,
    identity: RunIdentity,
    best: BestWeights,
    history: dict[str, list[float]],
    ema: EMAModel | None,
    names: list[str],
) -> None:
    best_tensors, best_state = best.checkpoint("best.")
    shared = {**best_tensors, **(ema_state(ema, names, "ema.") if ema is not None else {})}
    state = {"best": best_state, "ema_updates": ema.optimization_step if ema is not None else 0}
    # Each checkpoint holds the whole model twice (trained and best): only the newest is kept.
    save_training_state(accelerator, root, step, identity, history=history, shared=shared, state=state, keep_last=1)


def _resume(
    accelerator: Accelerator, folder: Path, best: BestWeights, ema: EMAModel | None, names: list[str]
) -> tuple[int, dict[str, list[float]]]:
    resumed = load_training_state(accelerator, folder)  # trainable weights, optimizer, schedule, RNG
    best.restore_checkpoint(resumed.shared, resumed.state["best"], "best.")
    if ema is not None:
        load_ema_state(ema, names, resumed.shared, "ema.", int(resumed.state["ema_updates"]))
    return resumed.step, resumed.history


def train_reward_model(
    scorer: RewardScorer,
    cfg: RewardConfig,
    train: RewardData,
    val: RewardData,
    *,
    seed: int,
    log_metrics: MetricsFn | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train ``scorer`` in place with the configured loss; early stopping on validation loss or accuracy.

    Args:
        scorer: the model to train (its trainable parameters are those with ``requires_grad``).
        cfg: ``reward`` section: loss (bt | pl | mixed), keep_ties, steps, lr, batch_size (pairs per step),
            eval_every, patience (evaluations without improvement before stopping), select_on, ema_decay.
        train, val: splits from ``RewardData.from_tables``.
        seed: seeds torch and the keyed batch order.
        log_metrics: ``(metrics, step)`` callback (``train/*`` every 10 steps, ``eval/*`` at each evaluation).
        progress: show a tqdm bar.
        checkpoint_dir: when given, a checkpoint is written there at every evaluation and a run with the
            same identity resumes from the newest one: killed and restarted, it ends with the weights of an
            uninterrupted run.

    Returns:
        ``TrainResult``; the scorer holds the best validation weights, in eval mode.

    Raises:
        CheckpointMismatchError: ``checkpoint_dir`` holds checkpoints of a different run (names what differs).
    """
    torch.manual_seed(seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    scorer.model.to(accelerator.device)
    scorer.mixed_precision = accelerator.mixed_precision  # "no" on CPU
    if accelerator.num_processes > 1:
        _same_weights_everywhere(scorer.model)
    use_pairs, use_rankings = _loss_parts(cfg, train)
    train_tensors = SplitTensors.of(scorer, train, mirrored=cfg.mirror_augment, num_workers=cfg.num_workers)
    val_tensors = SplitTensors.of(scorer, val, num_workers=cfg.num_workers)
    identity, resume_from = None, None
    if checkpoint_dir is not None:
        identity = run_identity(cfg, train, scorer, seed, accelerator.num_processes)
        resume_from = resumable_checkpoint(checkpoint_dir, identity)
    if cfg.gradient_checkpointing:
        # transformers 5 names it activation checkpointing (gradient_checkpointing_enable is its deprecated
        # alias); non-reentrant, it recomputes each tower layer in the backward, only in train mode.
        scorer.model.activation_checkpointing_enable()
    optimizer, schedule = optimizer_for(scorer.model, lr=cfg.lr, steps=cfg.steps)
    # The model is not prepared: the trainer calls its towers directly, past any DDP wrapper's forward, and
    # averages gradients itself (``reward_steps.average_gradients``); forwards autocast through the scorer.
    optimizer, schedule = accelerator.prepare(optimizer, schedule)
    register_trainable_hooks(accelerator, scorer.model)
    params = {name: p for name, p in scorer.model.named_parameters() if p.requires_grad}
    ema = make_ema(params, cfg.ema_decay, warmup=True) if cfg.ema_decay > 0 else None
    best = BestWeights(cfg.patience, cfg.select_on)
    history: dict[str, list[float]] = {key: [] for key in ("step", "loss", "lr", "logit_scale")}
    start = 0
    if resume_from is not None:
        start, history = _resume(accelerator, resume_from, best, ema, list(params))
        log.info("reward training resumes at step %d from %s", start, resume_from)
    if accelerator.is_main_process:
        log.info(
            "reward training: loss=%s, %d train pairs, %d rankings, %d val pairs, up to %d steps of %d pairs "
            "(%d per process x %d), %s, images %s, precision %s, activation checkpointing %s",
            *(cfg.loss, train.n_pairs, train.n_rankings, val.n_pairs, cfg.steps),
            *(cfg.batch_size * accelerator.num_processes, cfg.batch_size, accelerator.num_processes),
            accelerator.device,
            "on the device" if train.images is not None else f"decoded on demand ({cfg.num_workers} workers)",
            accelerator.mixed_precision,
            "on" if cfg.gradient_checkpointing else "off",
        )
    plans = step_plans(
        cfg,
        train,
        seed,
        use_pairs=use_pairs,
        use_rankings=use_rankings,
        start=start,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    batches = image_batches(train_tensors.images, plans, accelerator.device, cfg.num_workers)
    scorer.model.train()
    steps_run = start
    bar = tqdm(
        range(start, cfg.steps),
        desc="train reward",
        disable=not progress or not accelerator.is_main_process,
        mininterval=2,
    )
    try:
        for step in bar:
            if best.exhausted:  # resumed from a checkpoint written at the early stop
                break
            plan, pixels = next(batches)
            metrics = train_step(scorer, train_tensors, plan, pixels, optimizer, schedule, accelerator)
            if accelerator.num_processes > 1:
                metrics = _mean_over_processes(accelerator, metrics)
            steps_run = step + 1
            if ema is not None:
                ema.step(params.values())
            for key in ("loss", "lr", "logit_scale"):
                history[key].append(metrics[key])
            history["step"].append(float(steps_run))
            if log_metrics and step % LOG_EVERY == 0:
                log_metrics({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, steps_run)
            if steps_run % cfg.eval_every == 0 or steps_run == cfg.steps:
                # With an EMA, the averaged weights are what is validated and kept.
                with ema_swapped_in(ema, params) if ema is not None else contextlib.nullcontext():
                    stop = _evaluate_and_check(scorer, val_tensors, best, history, steps_run, log_metrics, bar)
                if checkpoint_dir is not None and identity is not None:
                    _save(accelerator, checkpoint_dir, steps_run, identity, best, history, ema, list(params))
                if stop:
                    log.info(
                        "early stopping at step %d: no better validation for %d evaluations", steps_run, cfg.patience
                    )
                    break
    finally:
        batches.close()  # stops the DataLoader's workers of an early stop
    best.restore(scorer.model)
    if cfg.gradient_checkpointing:
        scorer.model.activation_checkpointing_disable()
    scorer.model.eval()
    accelerator.free_memory()
    log.info("reward training done: %d steps, best validation %.4f at step %d", steps_run, best.accuracy, best.step)
    return TrainResult(best.accuracy, steps_run, history, best.step)


def _same_weights_everywhere(model: torch.nn.Module) -> None:
    """Every process starts from process 0's weights (what DDP's constructor does): a backbone pretrained on
    each process, or loaded from a folder, must not differ by a nondeterministic kernel."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def _mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Step metrics averaged over the processes' equal shares: the global batch's (NaN if any share's is)."""
    keys = sorted(metrics)
    local = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, reduction="mean").tolist(), strict=True))


def _evaluate_and_check(
    scorer: RewardScorer,
    val_tensors: SplitTensors,
    best: BestWeights,
    history: dict[str, list[float]],
    step: int,
    log_metrics: MetricsFn | None,
    bar: Any,
) -> bool:
    """Validate, record, keep the weights if better; True when patience is exhausted."""
    accuracy, loss = validate(scorer, val_tensors, across_processes=True)
    best.update(scorer.model, accuracy, loss, step)
    for key, value in (("eval_step", float(step)), ("val_accuracy", accuracy), ("val_loss", loss)):
        history.setdefault(key, []).append(value)
    if log_metrics:
        log_metrics(
            {k: v for k, v in {"eval/pairwise_accuracy": accuracy, "eval/loss": loss}.items() if math.isfinite(v)},
            step,
        )
    bar.set_postfix(val_acc=f"{accuracy:.3f}", best=f"{best.accuracy:.3f}", refresh=False)
    return best.exhausted
