"""Seconds per pair and peak memory of one Diffusion-DPO training step, in three code structures.

Same preset model, same batch, same dtype, same thread count; each structure runs in its own
subprocess (this script re-invoked with ``--variant``) so that its peak memory is its own:

* ``ours``: the pipeline's own training step, ``prefalign.training.policy.DPOStep`` on a run set up by
  ``start_policy_run``, as ``train_dpo`` runs it (not a copy): VAE latents and text embeddings computed
  once into a feature cache before training (not timed; the pipeline's ``featurize`` stage caches them),
  one UNet with LoRA, winner and loser in one batched forward with shared t and ε, reference errors from
  the same UNet with its adapters disabled, under ``no_grad``; keyed draws prepared on a worker thread,
  metrics left on the device; on CUDA also the trainer's GPU switches (``trainer.compile``, fused AdamW,
  bf16 frozen weights under ``--dtype bf16``, channels-last, TF32). Its (t, ε) are the trainer's keyed
  draws, not the shared sequence of the other two (the cost of a step does not depend on their values),
  and its AdamW is the trainer's (foreach-free on a CPU, where the trainer keeps torch's default).
* ``diffusers_lora``: the structure of diffusers' Diffusion-DPO LoRA example
  (``examples/research_projects/diffusion_dpo``): the same UNet step, but both images go through the
  VAE encoder (in chunks of ``--vae_encode_batch_size`` = 8) and the prompt through the text encoder at
  every step, under ``no_grad``.
* ``original``: the structure of the authors' ``train.py`` (SalesforceAIResearch/DiffusionDPO): every
  UNet parameter trained by AdamW, a separate frozen reference UNet (a deep copy), VAE and text encoder
  at every step.

All three use the same loss (``diffusion_dpo_loss``, β = 5000), gradient clipping at 1.0 (both reference
scripts clip) and AdamW (β 0.9/0.999, weight decay 1e-2). No variant uses gradient checkpointing (the
authors' SD1.5 launcher does not). Both LoRA variants use rank 8 on to_q, to_k, to_v and to_out.0.

Time: ``sec_per_pair`` = seconds of ``--steps`` timed steps / (steps × batch), after ``--warmup``
untimed ones. ``first_step_seconds`` is the very first step (lazy initialisation, and for a compiled
``ours`` the compilation), ``steady_step_seconds`` the median timed step, and ``compile_seconds`` their
difference when ``ours`` was compiled (None otherwise): compile time is reported apart from the step time.
With ``--repeats R`` the variants run R rounds, round-robin, and the median round counts: on a CPU shared
with other jobs the load drifts between subprocesses. On such a CPU also pass ``--threads 1`` (see its
help).

Peak memory: on CPU the child's maximum RSS as the parent sees it (``os.wait4``'s rusage of that one
child, i.e. ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` restricted to it), which includes the interpreter
and the libraries (~430 MB with diffusers, transformers and peft loaded); the child's RSS after those
imports and before any model is reported as ``baseline_rss_mb``, and ``peak_rss_above_baseline_mb`` is
what the structure itself costs. On CUDA, ``torch.cuda.max_memory_allocated``.

FLOPs: one extra step of each structure, after the timed ones, runs eagerly (a compiled ``ours`` with
``torch.compiler.set_stance("force_eager")``) under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention; element-wise work is not counted), split into the per-step
encoding and the UNet part. ``tflops_per_s`` is that count over the measured time; ``mfu`` divides by
the GPU's dense bf16 peak where the GPU is in a small table, null elsewhere (and on CPU). On the meta
device (``--flops-only``) ``ours`` is counted on ``LoraStep`` with cached features, its structural twin (the
trainer needs real tensors); the in-process test checks that the two count the same UNet FLOPs.

    python benchmarks/bench_align.py --preset sd-mini --steps 5 --batch 4 --json /tmp/bench_sdmini.json
    python benchmarks/bench_align.py --preset sd-mini --steps 5 --batch 4 --threads 1 --repeats 3   # busy CPU
    python benchmarks/bench_align.py --preset sd15-random --steps 20 --batch 8 --dtype bf16   # on a GPU
    python benchmarks/bench_align.py --preset sd15-random --flops-only   # FLOP counts on the meta device
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_align")

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "diffusers_lora", "original")
PRESETS = ("demo", "sd-mini", "sd15-random")
LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the diffusers example's targets
BETA_DPO = 5000.0  # the authors' default; the cost does not depend on it
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
VAE_ENCODE_BATCH_SIZE = 8  # the diffusers example's --vae_encode_batch_size default
# Dense bf16 tensor-core peaks (vendor data sheets), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# What the project asks of `ours` on sd-mini. FLOPs per pair alone predict about 1.45x and 1.7x
# (SD1.5 at 512 px: 5.0 TFLOP ours, 7.3 diffusers_lora, 8.7 original; `--flops-only` recounts them).
TARGETS = {"diffusers_lora_over_ours_time": 1.3, "original_over_ours_time": 1.6, "ours_over_original_mem": 0.5}


# --------------------------------------------------------------------------------------------------
# The child: one structure, timed.
# --------------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """One batch of preference pairs in pixel space, plus the draws of (t, ε) for every step."""

    images_w: Any
    images_l: Any
    token_ids: Any
    latent_shape: tuple[int, int, int]
    noise_generator: Any
    device: Any

    def draw_timesteps_and_noise(self) -> tuple[Any, Any]:
        """One (t, ε) per pair, shared by its winner and loser; the same sequence in every variant."""
        import torch

        batch = self.images_w.shape[0]
        timesteps = torch.randint(0, 1000, (batch,), generator=self.noise_generator)
        noise = torch.randn((batch, *self.latent_shape), generator=self.noise_generator)
        return timesteps.to(self.device), noise.to(self.device)


def make_pair_batch(models: Any, batch: int, *, seed: int, device: Any) -> PairBatch:
    """Random images in [-1, 1] and random token ids: the cost of a step does not depend on content."""
    import torch

    from prefalign.models.presets import latent_side

    generator = torch.Generator().manual_seed(seed)
    side = models.resolution
    images = torch.rand((2, batch, 3, side, side), generator=generator) * 2 - 1
    config = models.text_encoder.config
    token_ids = torch.randint(0, config.vocab_size, (batch, config.max_position_embeddings), generator=generator)
    latent = latent_side(models)
    return PairBatch(
        images_w=images[0].to(device),
        images_l=images[1].to(device),
        token_ids=token_ids.to(device),
        latent_shape=(models.unet.config.in_channels, latent, latent),
        noise_generator=torch.Generator().manual_seed(seed + 1),
        device=device,
    )


def encode_pairs(vae: Any, text_encoder: Any, pairs: PairBatch, *, chunk: int | None = None) -> tuple[Any, Any, Any]:
    """(latents_w, latents_l, text embeddings) under ``no_grad``; winners and losers in one VAE batch.

    Args:
        chunk: Encode at most this many images per VAE call (the diffusers example's
            ``vae_encode_batch_size``); None encodes all 2B at once (the authors' code).
    """
    import torch

    with torch.no_grad():
        pixels = torch.cat([pairs.images_w, pairs.images_l])
        pieces = pixels.split(chunk) if chunk else (pixels,)
        latents = torch.cat([vae.encode(piece).latent_dist.sample() for piece in pieces]) * vae.config.scaling_factor
        cond = text_encoder(pairs.token_ids)[0]
    batch = pairs.images_w.shape[0]
    return latents[:batch], latents[batch:], cond


class DPOStep:
    """One Diffusion-DPO training step, split into its per-step encoding and its UNet part."""

    trainable: list[Any]

    def encode(self) -> tuple[Any, Any, Any]:
        """Latents of winners and losers and the prompt embeddings used by this step."""
        raise NotImplementedError

    def denoise_and_update(self, latents_w: Any, latents_l: Any, cond: Any) -> Any:
        """Forward, loss, backward and optimizer update; returns the loss (not synchronised)."""
        raise NotImplementedError

    def __call__(self) -> Any:
        return self.denoise_and_update(*self.encode())

    def close(self) -> None:
        """Release what the step holds beyond memory (threads, the trainer's run); nothing by default."""


def _adamw(params: list[Any]) -> Any:
    import torch

    # foreach is PyTorch's default on CUDA; on CPU it is what keeps the full-UNet update from being
    # a Python loop over ~700 parameter tensors, so every variant gets it (LoRA ones gain nothing, lose nothing).
    return torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, foreach=True)


def _finish_step(loss: Any, trainable: list[Any], optimizer: Any) -> Any:
    import torch

    loss.backward()
    if loss.device.type == "meta":
        # --flops-only: the update has no meta kernels and FlopCounterMode does not count it anyway.
        return loss.detach()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _lora_unet(unet: Any) -> tuple[Any, list[Any]]:
    from prefalign.config import LoraConfig
    from prefalign.models.diffusion import add_lora

    add_lora(unet, LoraConfig(rank=LORA_RANK, alpha=float(LORA_RANK), targets=LORA_TARGETS))
    return unet, [p for p in unet.parameters() if p.requires_grad]


class LoraStep(DPOStep):
    """The diffusers example: one UNet with LoRA, reference = adapters disabled, encoders at every step.

    With ``cache_features`` it is the structure of ``ours`` (latents and embeddings encoded once), which
    ``--flops-only`` counts on the meta device where the pipeline's trainer cannot run.
    """

    def __init__(self, models: Any, pairs: PairBatch, *, cache_features: bool) -> None:
        from prefalign.models.diffusion import make_scheduler

        self.pairs = pairs
        self.scheduler = make_scheduler("ddpm")
        if cache_features:
            # Computed once and kept; the VAE and the text encoder are then dropped, as in the
            # pipeline, where featurize is a separate stage and training never loads them.
            self.cached = encode_pairs(models.vae, models.text_encoder, pairs)
            self.vae = self.text_encoder = None
        else:
            self.cached = None
            self.vae, self.text_encoder = models.vae.requires_grad_(False), models.text_encoder.requires_grad_(False)
        self.unet, self.trainable = _lora_unet(models.unet)
        self.optimizer = _adamw(self.trainable)

    def encode(self) -> tuple[Any, Any, Any]:
        if self.cached is not None:
            return self.cached
        return encode_pairs(self.vae, self.text_encoder, self.pairs, chunk=VAE_ENCODE_BATCH_SIZE)

    def denoise_and_update(self, latents_w: Any, latents_l: Any, cond: Any) -> Any:
        from prefalign.losses.diffusion import diffusion_dpo_loss
        from prefalign.training.denoise import pair_denoising_errors

        timesteps, noise = self.pairs.draw_timesteps_and_noise()
        errors = pair_denoising_errors(self.unet, self.scheduler, latents_w, latents_l, cond, timesteps, noise)
        loss = diffusion_dpo_loss(*errors, beta=BETA_DPO).mean()
        return _finish_step(loss, self.trainable, self.optimizer)


class FullUnetStep(DPOStep):
    """The authors' structure: full-UNet AdamW, a deep-copied frozen reference UNet, encoders every step."""

    def __init__(self, models: Any, pairs: PairBatch) -> None:
        from prefalign.models.diffusion import make_scheduler

        self.pairs = pairs
        self.scheduler = make_scheduler("ddpm")
        self.vae, self.text_encoder = models.vae.requires_grad_(False), models.text_encoder.requires_grad_(False)
        self.unet = models.unet.requires_grad_(True)
        self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.trainable = list(self.unet.parameters())
        self.optimizer = _adamw(self.trainable)

    def encode(self) -> tuple[Any, Any, Any]:
        return encode_pairs(self.vae, self.text_encoder, self.pairs)

    def denoise_and_update(self, latents_w: Any, latents_l: Any, cond: Any) -> Any:
        import torch

        from prefalign.losses.diffusion import diffusion_dpo_loss
        from prefalign.training.denoise import per_sample_mse

        batch = latents_w.shape[0]
        timesteps, noise = self.pairs.draw_timesteps_and_noise()
        timesteps2, noise2, cond2 = timesteps.repeat(2), noise.repeat(2, 1, 1, 1), cond.repeat(2, 1, 1)
        noisy = self.scheduler.add_noise(torch.cat([latents_w, latents_l]), noise2, timesteps2)
        err = per_sample_mse(self.unet(noisy, timesteps2, encoder_hidden_states=cond2).sample, noise2)
        with torch.no_grad():
            ref_pred = self.reference_unet(noisy, timesteps2, encoder_hidden_states=cond2).sample
            ref_err = per_sample_mse(ref_pred, noise2)
        loss = diffusion_dpo_loss(err[:batch], err[batch:], ref_err[:batch], ref_err[batch:], beta=BETA_DPO).mean()
        return _finish_step(loss, self.trainable, self.optimizer)


class PipelineStep(DPOStep):
    """``ours``: the pipeline's own Diffusion-DPO step, ``prefalign.training.policy.DPOStep``.

    The pairs are encoded once into a ``Features`` cache (float32, as the trainer reads it); the run is set
    up by ``start_policy_run`` from a ``DPOConfig`` with the benchmark's LoRA, learning rate, β, clipping
    and batch (no warmup, uniform t, no prompt dropout), so every trainer switch (accelerate, compile, fused
    AdamW, bf16 frozen weights) is the pipeline's. Step s trains the trainer's global samples of step s.
    """

    def __init__(self, models: Any, pairs: PairBatch, *, mixed_precision: str, compile_unet: bool, steps: int) -> None:
        import torch

        from prefalign.config import DPOConfig, LoraConfig
        from prefalign.training.features import Features
        from prefalign.training.policy import DPOStep as TrainerStep
        from prefalign.training.policy import PairData, start_policy_run

        latents_w, latents_l, cond = encode_pairs(models.vae, models.text_encoder, pairs)
        batch = latents_w.shape[0]
        text = torch.cat([cond, torch.zeros_like(cond[:1])]).float().cpu()  # last row: the empty prompt
        feats = Features(torch.cat([latents_w, latents_l]).float().cpu(), {}, text, {}, batch)
        self.cfg = DPOConfig(
            beta=BETA_DPO,
            lr=LEARNING_RATE,
            steps=steps,
            batch_size=batch,
            warmup_steps=0,
            timestep_min=0,
            prompt_dropout=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            lora=LoraConfig(rank=LORA_RANK, alpha=float(LORA_RANK), targets=LORA_TARGETS),
            mixed_precision=mixed_precision,
            compile=compile_unet,
            checkpoint_every=0,
        )
        self.run = start_policy_run(
            models.unet, self.cfg, seed=0, purpose="dpo", data_sha="bench_align", checkpoint_dir=None
        )
        if self.run.device != pairs.device:
            self.run.finish()
            raise SystemExit(
                f"ours runs where the pipeline's trainer puts it ({self.run.device}), not on {pairs.device}"
            )
        rows = torch.arange(batch)
        self.trainer_step = TrainerStep(
            self.run, PairData(feats, rows, rows + batch, rows), self.cfg, seed=0, steps=range(steps)
        )
        self.trainable = list(self.run.params.values())
        self.steps_done = 0

    def encode(self) -> tuple[Any, ...]:
        return ()  # the feature cache was filled once, before training

    def denoise_and_update(self) -> Any:
        outcome = self.trainer_step(self.steps_done)
        self.steps_done += 1
        assert outcome.sums.total is not None
        return outcome.sums.total[outcome.sums.keys.index("loss")]  # one micro-step: the sum is the loss

    def close(self) -> None:
        self.trainer_step.close()
        self.run.finish()


def build_step(
    variant: str, models: Any, pairs: PairBatch, *, dtype: str = "fp32", compile_unet: bool = True, steps: int = 1
) -> DPOStep:
    """The training step of ``variant`` on these models and pairs.

    Args:
        dtype, compile_unet, steps: for ``ours``, the trainer's mixed precision (bf16 for ``bf16``), its
            ``trainer.compile`` switch (CUDA only) and how many steps it will be asked for.
    """
    match variant:
        case "ours":
            return PipelineStep(
                models,
                pairs,
                mixed_precision="bf16" if dtype == "bf16" else "no",
                compile_unet=compile_unet,
                steps=steps,
            )
        case "diffusers_lora":
            return LoraStep(models, pairs, cache_features=False)
        case "original":
            return FullUnetStep(models, pairs)
        case _:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode PyTorch's CPU attention kernel, which its registry lacks (it would count 0)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(forward)(
            lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value)
        )
    if backward is not None and backward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
                grad_out, query, key, value
            )
        )


def count_step_flops(step: DPOStep, autocast: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one full step (it really runs and updates the weights), split into encoding and UNet.

    A compiled module runs eagerly here: the counter sees operators, which compiled code does not dispatch.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_flops()
    with torch.compiler.set_stance("force_eager"):
        with autocast(), FlopCounterMode(display=False) as encode_counter:
            features = step.encode()
        with autocast(), FlopCounterMode(display=False) as unet_counter:
            step.denoise_and_update(*features)
    encode, unet = encode_counter.get_total_flops(), unet_counter.get_total_flops()
    return {"encode": encode, "unet": unet, "total": encode + unet}


def device_description(device: Any, threads: int) -> str:
    """A readable name of what ran the step."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {threads} torch threads, {os.cpu_count()} cores visible"


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU, else None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def rss_mb_self() -> float:
    """This process's peak RSS so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Build the preset, set up ``args.variant``, warm up, time ``args.steps`` steps."""
    import contextlib

    import accelerate  # noqa: F401
    import diffusers.optimization  # noqa: F401
    import torch

    # diffusers and transformers import their model modules lazily, on first use: ~200 MB that would
    # otherwise land in the model's share. Import everything a step touches before the baseline.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import prefalign.losses.diffusion
    import prefalign.models.diffusion
    import prefalign.training.denoise
    import prefalign.training.policy  # noqa: F401  # ours' trainer, which imports accelerate
    from prefalign.models.presets import build_preset

    baseline_rss_mb = rss_mb_self()  # interpreter and every library, no model yet
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    use_bf16 = args.dtype == "bf16"

    def autocast() -> Any:
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tag = f"[{args.variant}]"
    started = time.perf_counter()
    models = build_preset(args.preset, seed=args.seed)
    models = models._replace(
        vae=models.vae.to(device), text_encoder=models.text_encoder.to(device), unet=models.unet.to(device)
    )
    pairs = make_pair_batch(models, args.batch, seed=args.seed, device=device)
    total_steps = args.warmup + args.steps + (0 if args.no_flops else 1)
    with autocast():
        step = build_step(args.variant, models, pairs, dtype=args.dtype, compile_unet=args.compile, steps=total_steps)
    del models  # the step holds what its structure keeps; `ours` lets the VAE and text encoder go
    trainable = sum(p.numel() for p in step.trainable)
    log.info(
        "%s %s built and set up in %.1f s; %d trainable parameters",
        tag,
        args.preset,
        time.perf_counter() - started,
        trainable,
    )

    warmup_seconds = []
    for warm in range(args.warmup):
        tick = time.perf_counter()
        with autocast():
            step()
        synchronize()
        warmup_seconds.append(time.perf_counter() - tick)
        log.info("%s warm-up %d/%d: %.2f s", tag, warm + 1, args.warmup, warmup_seconds[-1])

    step_seconds = []
    for index in range(args.steps):
        tick = time.perf_counter()
        with autocast():
            loss = step()
        synchronize()
        step_seconds.append(time.perf_counter() - tick)
        log.info("%s step %d/%d: %.2f s (loss %.4f)", tag, index + 1, args.steps, step_seconds[-1], float(loss))
    total = sum(step_seconds)

    flops = None
    if not args.no_flops:
        flops = count_step_flops(step, autocast)
        synchronize()
    compiled = isinstance(step, PipelineStep) and step.run.compiled
    step.close()
    first_step = (warmup_seconds or step_seconds)[0]
    steady = statistics.median(step_seconds)

    result: dict[str, Any] = {
        "sec_per_pair": total / (args.steps * args.batch),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "first_step_seconds": round(first_step, 4),
        "steady_step_seconds": round(steady, 4),
        "compiled": compiled,
        "compile_seconds": round(first_step - steady, 4) if compiled else None,
        "trainable_params": trainable,
        "device": device_description(device, args.threads),
        "baseline_rss_mb": round(baseline_rss_mb, 1),
        "self_peak_rss_mb": round(rss_mb_self(), 1),
    }
    if device.type == "cuda":
        result["cuda_peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if flops:
        tflops_per_s = flops["total"] * args.steps / total / 1e12
        peak = peak_bf16_tflops(result["device"]) if device.type == "cuda" else None
        result |= {
            "gflop_per_pair": round(flops["total"] / args.batch / 1e9, 3),
            "gflop_per_pair_encode": round(flops["encode"] / args.batch / 1e9, 3),
            "gflop_per_pair_unet": round(flops["unet"] / args.batch / 1e9, 3),
            "tflops_per_s": round(tflops_per_s, 4),
            "mfu": round(tflops_per_s / peak, 4) if peak else None,
        }
    return result


# --------------------------------------------------------------------------------------------------
# The parent: one subprocess per structure, then the comparison.
# --------------------------------------------------------------------------------------------------


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; its result with ``peak_mem_mb`` added."""
    with tempfile.TemporaryDirectory(prefix="bench_align_") as folder:
        result_file = Path(folder) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--variant",
            variant,
            "--result-file",
            str(result_file),
            "--preset",
            args.preset,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--warmup",
            str(args.warmup),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
            "--compile" if args.compile else "--no-compile",
        ] + (["--no-flops"] if args.no_flops else [])
        # Same thread count for every library in every child, whatever the parent's environment says.
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        env.setdefault("PYTHONPATH", str(REPO / "src"))
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env)
        # wait4 gives this child's own rusage; getrusage(RUSAGE_CHILDREN) would be the max over every
        # child so far, so the second and third variants would inherit the first one's peak.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"variant {variant} failed with exit code {child.returncode}")
        result = json.loads(result_file.read_text())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    rss_mb = usage.ru_maxrss / 1024
    result["peak_mem_mb"] = result.get("cuda_peak_mem_mb", round(rss_mb, 1))
    result["peak_rss_mb"] = round(rss_mb, 1)
    result["peak_rss_above_baseline_mb"] = round(rss_mb - result["baseline_rss_mb"], 1)
    return result


def run_here(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process (``--in-process``, for tests): fast, but memory is not isolated.

    ``peak_mem_mb`` is then this process's peak so far, which includes every variant run before.
    """
    started = time.perf_counter()
    result = run_variant(argparse.Namespace(**{**vars(args), "variant": variant}))
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["load_avg_1m"] = [round(os.getloadavg()[0], 2)] * 2
    result["peak_rss_mb"] = result["self_peak_rss_mb"]
    result["peak_mem_mb"] = result.get("cuda_peak_mem_mb", result["self_peak_rss_mb"])
    # The baseline already holds the variants run before this one: no share to read off.
    result["peak_rss_above_baseline_mb"] = None
    return result


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's figures over its rounds: median time, largest peak memory, every round kept."""
    if len(runs) == 1:
        return runs[0]
    result = dict(runs[-1])
    result["sec_per_pair"] = statistics.median(run["sec_per_pair"] for run in runs)
    result["sec_per_pair_rounds"] = [run["sec_per_pair"] for run in runs]
    result["step_seconds"] = [run["step_seconds"] for run in runs]
    result["first_step_seconds_rounds"] = [run["first_step_seconds"] for run in runs]
    result["load_avg_1m"] = [run["load_avg_1m"] for run in runs]
    result["wall_seconds"] = round(sum(run["wall_seconds"] for run in runs), 1)
    for key in ("peak_mem_mb", "peak_rss_mb", "peak_rss_above_baseline_mb", "self_peak_rss_mb", "cuda_peak_mem_mb"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if key in result:
            result[key] = max(values) if values else None
    if "gflop_per_pair" in result:
        # Achieved throughput of the median round; the FLOP count is the same in every round.
        result["tflops_per_s"] = round(result["gflop_per_pair"] / result["sec_per_pair"] / 1e3, 4)
        peak = peak_bf16_tflops(result["device"])
        result["mfu"] = round(result["tflops_per_s"] / peak, 4) if peak and "cuda_peak_mem_mb" in result else None
    return result


def compare(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The three ratios the project tracks (None where a variant was not run)."""

    def ratio(numerator: str, denominator: str, key: str) -> float | None:
        top, bottom = results.get(numerator, {}).get(key), results.get(denominator, {}).get(key)
        if top is None or not bottom:
            return None
        return round(top / bottom, 3)

    return {
        "diffusers_lora_over_ours_time": ratio("diffusers_lora", "ours", "sec_per_pair"),
        "original_over_ours_time": ratio("original", "ours", "sec_per_pair"),
        "ours_over_original_mem": ratio("ours", "original", "peak_mem_mb"),
        # RSS includes a few hundred MB of interpreter and libraries that no structure can avoid.
        "ours_over_original_mem_above_baseline": ratio("ours", "original", "peak_rss_above_baseline_mb"),
        "diffusers_lora_over_ours_gflop": ratio("diffusers_lora", "ours", "gflop_per_pair"),
        "original_over_ours_gflop": ratio("original", "ours", "gflop_per_pair"),
    }


def targets_met(ratios: dict[str, float | None]) -> dict[str, bool | None]:
    """Each project target: met, missed, or None when its variants were not both run."""
    met: dict[str, bool | None] = {}
    for key, bound in TARGETS.items():
        value = ratios.get(key)
        met[key] = None if value is None else (value <= bound if key.endswith("_mem") else value >= bound)
    return met


def flops_only(args: argparse.Namespace) -> dict[str, Any]:
    """FLOP counts of each structure on the ``meta`` device: no weights, no time, any preset size."""
    import torch

    from prefalign.models.presets import build_preset

    device = torch.device("meta")
    counts: dict[str, Any] = {}
    for variant in args.variants:
        models = build_preset(args.preset, seed=args.seed, device=device)
        pairs = make_pair_batch(models, args.batch, seed=args.seed, device=device)
        # The trainer needs real tensors; ours's structural twin counts the same operators.
        step = (
            LoraStep(models, pairs, cache_features=True) if variant == "ours" else build_step(variant, models, pairs)
        )
        flops = count_step_flops(step, lambda: torch.autocast("cpu", enabled=False))
        counts[variant] = {
            "gflop_per_pair" if part == "total" else f"gflop_per_pair_{part}": round(value / args.batch / 1e9, 3)
            for part, value in flops.items()
        }
        log.info("%s: %s", variant, counts[variant])
    ratios = {key: value for key, value in compare(counts).items() if value is not None}
    return {"preset": args.preset, "batch": args.batch, "flops_only": True, **counts, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="sd-mini", help="Model architecture (random weights).")
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps per variant.")
    parser.add_argument("--batch", type=int, default=4, help="Preference pairs per step.")
    parser.add_argument(
        "--warmup", type=int, default=2, help="Untimed steps first (the first one is reported: compile time)."
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: the trainer's trainer.compile switch (torch.compile of the UNet, CUDA only).",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32, or bf16 autocast over float32 weights (meant for CUDA).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads in every variant (default: the CPUs this process may use). "
        "On a CPU shared with other jobs use 1: OpenMP threads competing for busy cores made "
        "sd-mini steps 5-17x slower and erratic in our runs.",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N].")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Rounds over all variants (round-robin, one subprocess each); time is the median.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights, images, timesteps and noise.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="Which to run.")
    parser.add_argument("--no-flops", action="store_true", help="Skip the FLOP count (saves one step of time).")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="Only count FLOPs per pair, on the meta device (no weights; works for sd15-random).",
    )
    parser.add_argument("--json", type=Path, help="Also write the result JSON here.")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run the variants in this process (tests: fast, but peak memory is not per variant).",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one, in this process
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps, --batch, --threads and --repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from prefalign.runtime import apply_offline_defaults, emit_json

    apply_offline_defaults()
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    if args.variant:
        args.result_file.write_text(json.dumps(run_variant(args)))
        return

    if args.flops_only:
        report = flops_only(args)
    else:
        runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in args.variants}
        # Round-robin over the variants, so that a change in the machine's load hits all of them alike.
        for repeat in range(args.repeats):
            for variant in args.variants:
                log.info(
                    "variant %s (round %d/%d): starting (%s, batch %d, %d+%d steps, %s, %d threads, load avg %.2f)",
                    variant,
                    repeat + 1,
                    args.repeats,
                    args.preset,
                    args.batch,
                    args.warmup,
                    args.steps,
                    args.dtype,
                    args.threads,
                    os.getloadavg()[0],
                )
                run = run_here(variant, args) if args.in_process else run_child(variant, args)
                runs[variant].append(run)
                log.info("variant %s: %.4f s/pair, peak %.0f MB", variant, run["sec_per_pair"], run["peak_mem_mb"])
        results = {variant: aggregate(variant_runs) for variant, variant_runs in runs.items()}
        ratios = compare(results)
        report = {
            **results,
            "device": next(iter(results.values()))["device"],
            "preset": args.preset,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "dtype": args.dtype,
            "compile": args.compile,
            "threads": args.threads,
            "lora": {
                "rank": LORA_RANK,
                "alpha": float(LORA_RANK),
                "targets": list(LORA_TARGETS),
                "variants": ["ours", "diffusers_lora"],
            },
            "ratios": ratios,
            "targets": {"bounds": TARGETS, "met": targets_met(ratios)},
            "memory_isolated": not args.in_process,
            "python": platform.python_version(),
        }
    emit_json(report, args.json)


if __name__ == "__main__":
    main()
