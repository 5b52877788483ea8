"""Where a Diffusion-DPO training step spends its host time, and whether it waits for the device; before vs after.

Runs ``prefalign.training.policy.train_dpo`` for ``--steps`` steps on a preset's UNet (``sd-mini``: SD1.5's
structure at 1/8 width; ``demo``: the demo model; ``sd15-random`` for a GPU) with random cached features,
under ``torch.profiler``, once with this checkout's code ("after") and, with ``--baseline-rev``, once with
the code of a git revision ("before", unpacked with ``git archive`` into a temporary folder; nothing in the
checkout changes). Each runs in its own interpreter with that tree's ``src`` first on ``PYTHONPATH``.

Per step (one iteration of the trainer's step loop, marked by wrapping its progress iterator):

* ``ms``: wall time of the step.
* ``host_outside_ops_ms``: main-thread time inside the step covered by no ``aten::`` operator (Python,
  dispatch, numpy, hashing): on a GPU this is the time the host needs to keep the device fed.
* ``local_scalar_dense``: ``aten::_local_scalar_dense`` calls on the main thread (what ``.item()``,
  ``float(t)`` and ``bool(t)`` run) outside the optimizer's step; each one waits for the device when the
  tensor is on a GPU. ``local_scalar_dense_in_optimizer`` counts those inside ``optimizer.step``
  separately: the default (for-loop) AdamW reads each parameter's step counter, a host tensor unless the
  optimizer is fused or capturable, so they are no device syncs (and fused AdamW, used on CUDA, has none).
* ``device_syncs``: ``cudaStreamSynchronize``/``cudaDeviceSynchronize``/``cudaEventSynchronize``/``cudaMemcpy``
  (the synchronous copy) calls in the step, 0 on a CPU.
* ``main_thread_cpu_ms``: the main thread's CPU time in the step (``time.thread_time``), less sensitive
  than wall time to other jobs on a shared CPU; the prefetch worker's time is not in it.
* ``host_reads``: a second, unprofiled pass counts Python-level reads of tensor values on the main thread
  (``item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``, ``numpy``) with a ``TorchFunctionMode``,
  outside the optimizer's step (keys ``optimizer.*``: inside it): ``tolist`` has no aten operator of its
  own on a CPU, so the profiler alone would miss the metrics read-back.
* ``prep_main_ms`` / ``prep_worker_ms``: time in the keyed draws (``keyed_order``,
  ``keyed_timesteps_and_noise``, ``drop_prompts``, wrapped in both trees alike) on the main thread and on
  other threads; ``wait_inputs_ms``: main-thread time waiting for prefetched inputs (after only).

The summary gives the medians over the steps after the first (which includes lazy initialisation) and
the counts between log boundaries (steps s with s % log_every != 0); with ``--rounds R`` the trees are
profiled R times, alternating, and each figure is the median over the rounds. On a CPU every operator
runs on the host, so what the profile shows is structural: which work sits on the main thread between
two steps, and how often the step reads a value back.

``--check-identity`` also runs tiny DPO (with grad accumulation, prompt dropout and checkpoints), DRO (both
policy targets, jitter, EMA, guidance), KTO and SFT runs with both trees and compares the final adapter
weights, the per-step histories, the logged metrics and the checkpointed histories bit for bit.

    # 5b49c02: the commit before the step went device-side (the saved result's baseline)
    python benchmarks/profile_policy_step.py --preset sd-mini --steps 12 --log-every 5 --baseline-rev 5b49c02 \\
        --rounds 3 --check-identity --json benchmarks/results/profile_policy_step_sd-mini_cpu.json
    # on a GPU: device_syncs between log steps, with the trainer's compile and bf16 switches
    python benchmarks/profile_policy_step.py --preset sd15-random --steps 12 --batch 8 --mixed-precision bf16 \\
        --baseline-rev 5b49c02 --threads 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("profile_policy_step")

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("demo", "sd-mini", "sd15-random")
PREP_FUNCTIONS = ("keyed_order", "keyed_timesteps_and_noise", "drop_prompts")
STEP_MARK = "profile.step"
OPTIMIZER_MARK = "Optimizer.step#"
PREP_MARK = "profile.prep."
WAIT_MARK = "prefalign.wait_for_inputs"
# The CUDA runtime calls that block the host until the device catches up (cudaMemcpy: the synchronous one).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
READ_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
N_IMAGES, N_PROMPTS, N_PAIRS = 64, 16, 256


# --------------------------------------------------------------------------------------------------
# Worker side: runs inside an interpreter whose `prefalign` is the tree under test.
# --------------------------------------------------------------------------------------------------


def synthetic_features(n_images: int, n_prompts: int, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]):
    """Random latents and text embeddings in the trainers' ``Features`` layout (last text row: empty prompt)."""
    import torch

    from prefalign.training.features import Features

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n_images, *latent_shape, generator=gen)
    text = torch.randn(n_prompts + 1, *text_shape, generator=gen)
    shas, prompts = [f"img{i}" for i in range(n_images)], [f"prompt {i}" for i in range(n_prompts)]
    feats = Features(
        latents, {s: i for i, s in enumerate(shas)}, text, {p: i for i, p in enumerate(prompts)}, n_prompts
    )
    return feats, shas, prompts


def pairs_of(shas: list[str], prompts: list[str], n: int) -> tuple[list[str], list[str], list[str]]:
    return (
        [shas[i % len(shas)] for i in range(n)],
        [shas[(3 * i + 1) % len(shas)] for i in range(n)],
        [prompts[i % len(prompts)] for i in range(n)],
    )


def instrument(policy: Any) -> dict[int, float]:
    """Mark each step of the trainer loop and each keyed-draw call with profiler ranges (same in both trees).

    Returns:
        Main-thread CPU seconds per step, filled as the trainer runs (less sensitive than wall time to
        other jobs on a shared CPU; the prefetch worker's time is not in it).
    """
    import torch

    progress = policy._progress
    cpu_seconds: dict[int, float] = {}

    def marked_progress(run: Any, total: int, desc: str) -> Iterator[int]:
        for step in progress(run, total, desc):
            started = time.thread_time()
            with torch.profiler.record_function(f"{STEP_MARK}.{step}"):
                yield step
            cpu_seconds[step] = time.thread_time() - started

    def marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(PREP_MARK + name):
                return fn(*args, **kwargs)

        return wrapper

    policy._progress = marked_progress
    for name in PREP_FUNCTIONS:
        setattr(policy, name, marked(name, getattr(policy, name)))
    return cpu_seconds


def build_dpo_run(args: argparse.Namespace) -> Callable[[], Any]:
    """A closure training DPO for ``args.steps`` steps on the preset's UNet (built fresh at each call)."""
    from prefalign.config import load_config
    from prefalign.models.presets import build_preset
    from prefalign.training import policy

    src_root = Path(policy.__file__).resolve().parents[3]
    cfg = load_config(
        src_root / "params.yaml",
        {
            "dpo.steps": args.steps,
            "dpo.batch_size": args.batch,
            "dpo.grad_accum": 1,
            "trainer.checkpoint_every": 0,
            "trainer.mixed_precision": args.mixed_precision,
        },
    ).dpo
    models = build_preset(args.preset, seed=0)
    latent_shape = (models.unet.config.in_channels, models.unet.config.sample_size, models.unet.config.sample_size)
    text_shape = (models.text_encoder.config.max_position_embeddings, models.unet.config.cross_attention_dim)
    feats, shas, prompts = synthetic_features(N_IMAGES, N_PROMPTS, latent_shape, text_shape)
    winners, losers, pair_prompts = pairs_of(shas, prompts, N_PAIRS)

    def run() -> Any:
        # A fresh UNet each time: the trainer adds its adapter in place.
        return policy.train_dpo(
            build_preset(args.preset, seed=0).unet,
            winners,
            losers,
            pair_prompts,
            feats,
            cfg,
            seed=0,
            log_every=args.log_every,
            log_metrics=lambda metrics, step: None,
        )

    return run


def count_host_reads(run: Callable[[], Any]) -> dict[int, dict[str, int]]:
    """Python-level tensor value reads on this thread, per step (a pass of its own: the mode slows every op)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.overrides import TorchFunctionMode

    from prefalign.training import policy

    current = {"step": -1, "in_optimizer": 0}
    reads: dict[int, dict[str, int]] = {}
    watched = {getattr(torch.Tensor, name): name for name in READ_METHODS}

    class ReadCounter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = watched.get(func)
            if name is not None and current["step"] >= 0:
                key = f"optimizer.{name}" if current["in_optimizer"] else name
                per_step = reads.setdefault(current["step"], {})
                per_step[key] = per_step.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    def entering(*_: Any) -> None:
        current["in_optimizer"] = 1

    def leaving(*_: Any) -> None:
        current["in_optimizer"] = 0

    progress = policy._progress

    def tracked(run_: Any, total: int, desc: str) -> Iterator[int]:
        for step in progress(run_, total, desc):
            current["step"] = step
            yield step
        current["step"] = -1

    policy._progress = tracked
    hooks = [
        register_optimizer_step_pre_hook(entering),
        register_optimizer_step_post_hook(leaving),
    ]
    try:
        with ReadCounter():
            run()
    finally:
        policy._progress = progress
        for hook in hooks:
            hook.remove()
    return reads


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals in µs, returned in ms."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total / 1e3


def analyse(events: Any) -> list[dict[str, Any]]:
    """Per-step figures from the profiler's events (see the module docstring)."""
    steps = [e for e in events if e.name.startswith(STEP_MARK + ".")]
    if not steps:
        raise RuntimeError("no step markers in the profile: the trainer's _progress was not wrapped")
    main_thread = steps[0].thread
    rows = []
    for mark in sorted(steps, key=lambda e: e.time_range.start):
        start, end = mark.time_range.start, mark.time_range.end

        def inside(e: Any, start: float = start, end: float = end) -> bool:
            return start <= e.time_range.start and e.time_range.end <= end

        window = [e for e in events if inside(e)]
        main = [e for e in window if e.thread == main_thread]
        optimizer = [e for e in main if e.name.startswith(OPTIMIZER_MARK)]

        def in_optimizer(e: Any, spans: list[Any] = optimizer) -> bool:
            return any(
                s.time_range.start <= e.time_range.start and e.time_range.end <= s.time_range.end for s in spans
            )

        scalar_reads = [e for e in main if e.name == "aten::_local_scalar_dense"]
        optimizer_reads = sum(in_optimizer(e) for e in scalar_reads)
        aten = [(e.time_range.start, e.time_range.end) for e in main if e.name.startswith("aten::")]
        prep = [e for e in window if e.name.startswith(PREP_MARK)]
        rows.append(
            {
                "step": int(mark.name.rsplit(".", 1)[1]),
                "ms": round((end - start) / 1e3, 3),
                "host_outside_ops_ms": round((end - start) / 1e3 - union_ms(aten), 3),
                "local_scalar_dense": len(scalar_reads) - optimizer_reads,
                "local_scalar_dense_in_optimizer": optimizer_reads,
                "device_syncs": sum(e.name in SYNC_EVENTS for e in window),
                "prep_main_ms": round(
                    union_ms([(e.time_range.start, e.time_range.end) for e in prep if e.thread == main_thread]), 3
                ),
                "prep_worker_ms": round(
                    union_ms([(e.time_range.start, e.time_range.end) for e in prep if e.thread != main_thread]), 3
                ),
                "wait_inputs_ms": round(
                    union_ms([(e.time_range.start, e.time_range.end) for e in main if e.name == WAIT_MARK]), 3
                ),
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]], log_every: int) -> dict[str, Any]:
    steady = [r for r in rows if r["step"] > 0] or rows
    between = [r for r in rows if r["step"] % log_every != 0]

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in steady), 3)

    total_ms = sum(r["ms"] for r in steady)
    return {
        "median_step_ms": median("ms"),
        "median_main_thread_cpu_ms": median("main_thread_cpu_ms"),
        "median_host_outside_ops_ms": median("host_outside_ops_ms"),
        "prep_main_share": round(sum(r["prep_main_ms"] for r in steady) / total_ms, 5),
        "prep_worker_share": round(sum(r["prep_worker_ms"] for r in steady) / total_ms, 5),
        "wait_inputs_share": round(sum(r["wait_inputs_ms"] for r in steady) / total_ms, 5),
        "local_scalar_dense_per_step_between_logs": round(statistics.mean(r["local_scalar_dense"] for r in between), 3)
        if between
        else None,
        "host_reads_per_step_between_logs": round(
            statistics.mean(
                sum(v for k, v in r["host_reads"].items() if not k.startswith("optimizer.")) for r in between
            ),
            3,
        )
        if between
        else None,
        "local_scalar_dense_in_optimizer_per_step": round(
            statistics.mean(r["local_scalar_dense_in_optimizer"] for r in steady), 3
        ),
        "host_reads_at_log_steps": {r["step"]: r["host_reads"] for r in rows if r["step"] % log_every == 0},
    }


def profile_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._C._profiler import _ExperimentalConfig

    from prefalign.training import policy

    run = build_dpo_run(args)
    run()  # warm-up: lazy imports, allocator, first-call initialisation
    reads = count_host_reads(run)
    cpu_seconds = instrument(policy)
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Every thread: the prefetch worker's draws must show up, and on which thread they ran.
    config = _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=on_cuda)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities, experimental_config=config) as prof:
        run()
    wall = time.perf_counter() - started
    rows = analyse(prof.events())
    for row in rows:
        row["main_thread_cpu_ms"] = round(cpu_seconds[row["step"]] * 1e3, 3)
        row["host_reads"] = reads.get(row["step"], {})
    return {
        "source": str(Path(policy.__file__).resolve().parents[3]),
        "profiled_seconds": round(wall, 2),
        "summary": summarise(rows, args.log_every),
        "per_step": rows,
    }


def identity_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny DPO/DRO/KTO/SFT runs; writes each adapter to ``args.out`` and returns histories and logs."""
    import torch
    from safetensors.torch import save_file

    from prefalign.config import load_config
    from prefalign.models.diffusion import build_tiny_unet
    from prefalign.training import policy

    src_root = Path(policy.__file__).resolve().parents[3]
    tiny = {
        "model.unet_channels": [32, 64],
        "model.vae_channels": [32, 32],
        "model.text_hidden": 32,
        "trainer.lora.rank": 2,
        "trainer.checkpoint_every": 0,
    }
    feats, shas, prompts = synthetic_features(10, 5, (4, 8, 8), (8, 32))
    winners, losers, pair_prompts = pairs_of(shas, prompts, 12)
    runs: dict[str, tuple[dict[str, Any], Callable[..., Any]]] = {
        "dpo": (
            {
                "dpo.steps": 5,
                "dpo.batch_size": 3,
                "dpo.grad_accum": 2,
                "dpo.prompt_dropout": 0.3,
                "trainer.checkpoint_every": 2,
            },
            lambda unet, cfg, **kw: policy.train_dpo(unet, winners, losers, pair_prompts, feats, cfg.dpo, **kw),
        ),
        "dro_recorded": (
            {
                "dro.steps": 5,
                "dro.batch_size": 3,
                "dro.reuse": 2,
                "dro.sync_every": 2,
                "dro.ema_decay": 0.5,
                "dro.timestep_jitter": 40,
                "dro.sample_steps": 3,
                "dro.policy_target": "recorded",
            },
            lambda unet, cfg, **kw: policy.train_dro(
                unet, shas[:8], [prompts[i % 5] for i in range(8)], feats, cfg.dro, **kw
            ),
        ),
        "dro_current": (
            {
                "dro.steps": 3,
                "dro.batch_size": 2,
                "dro.grad_accum": 2,
                "dro.reuse": 1,
                "dro.sample_steps": 2,
                "dro.guidance": 2.0,
                "dro.timestep_jitter": 0,
                "dro.policy_target": "current",
            },
            lambda unet, cfg, **kw: policy.train_dro(
                unet, shas[:8], [prompts[i % 5] for i in range(8)], feats, cfg.dro, **kw
            ),
        ),
        "kto": (
            {
                "kto.steps": 4,
                "kto.batch_size": 3,
                "kto.grad_accum": 2,
                "kto.warmup_steps": 1,
                "kto.prompt_dropout": 0.25,
            },
            lambda unet, cfg, **kw: policy.train_kto(
                unet, shas, [prompts[i % 5] for i in range(10)], [i % 3 != 0 for i in range(10)], feats, cfg.kto, **kw
            ),
        ),
        "sft": (
            {"dro.steps": 3, "dro.batch_size": 3, "dro.ema_decay": 0.5},
            lambda unet, cfg, **kw: policy.train_sft(
                unet, shas[:8], [prompts[i % 5] for i in range(8)], feats, cfg.dro, **kw
            ),
        ),
    }
    report: dict[str, Any] = {"source": str(src_root)}
    for name, (overrides, train) in runs.items():
        cfg = load_config(src_root / "params.yaml", {**tiny, **overrides})
        torch.manual_seed(cfg.seed)
        unet = build_tiny_unet(cfg.model, 8)
        logged: list[list[Any]] = []
        kwargs: dict[str, Any] = {
            "seed": cfg.seed,
            "log_every": 3,
            "log_metrics": lambda m, s, logged=logged: logged.append([s, m]),
        }
        checkpoints = args.out / f"{name}_checkpoints"
        if name in ("dpo", "kto", "dro_recorded"):
            kwargs["checkpoint_dir"] = checkpoints
        history = train(unet, cfg, **kwargs)
        save_file(
            {n: p.detach().contiguous() for n, p in unet.named_parameters() if "lora_" in n},
            str(args.out / f"{name}.safetensors"),
        )
        stored = {
            folder.name: json.loads((folder / "history.json").read_text())
            for folder in sorted(checkpoints.glob("step_*"))
        }
        report[name] = {"history": history.metrics, "steps": history.steps, "logged": logged, "checkpointed": stored}
    return report


# --------------------------------------------------------------------------------------------------
# Parent side: one interpreter per tree, then the comparison.
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tree_at(rev: str | None) -> Iterator[Path]:
    """This checkout (rev None) or the files of a git revision unpacked into a temporary folder."""
    if rev is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="profile_policy_") as folder:
        archive = Path(folder) / "tree.tar"
        subprocess.run(
            ["git", "archive", "--format=tar", "-o", str(archive), rev, "src", "params.yaml"],
            cwd=REPO,
            check=True,
        )
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder)


def run_worker(tree: Path, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    result = out / f"{mode}.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--result-file",
        str(result),
        "--out",
        str(out),
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--log-every",
        str(args.log_every),
        "--threads",
        str(args.threads),
        "--mixed-precision",
        args.mixed_precision,
    ]
    subprocess.run(command, env=env, check=True, cwd=tree)
    report = json.loads(result.read_text())
    if Path(report["source"]).resolve() != tree.resolve():
        raise RuntimeError(f"worker imported prefalign from {report['source']}, expected {tree}")
    return report


def compare_identity(
    before: dict[str, Any], after: dict[str, Any], before_dir: Path, after_dir: Path
) -> dict[str, Any]:
    """Bit-for-bit comparison of every run's adapter, history, logged metrics and checkpointed histories."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in (key for key in after if key != "source"):
        left, right = (
            load_file(str(before_dir / f"{name}.safetensors")),
            load_file(str(after_dir / f"{name}.safetensors")),
        )
        same_weights = left.keys() == right.keys() and all(
            left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left
        )
        out[name] = {
            "adapter_tensors": len(right),
            "weights_identical": same_weights,
            "history_identical": before[name]["history"] == after[name]["history"]
            and list(before[name]["history"]) == list(after[name]["history"]),
            "logged_identical": before[name]["logged"] == after[name]["logged"],
            "checkpointed_history_identical": before[name]["checkpointed"] == after[name]["checkpointed"],
            "steps": after[name]["steps"],
            "logged_steps": [step for step, _ in after[name]["logged"]],
            "checkpoints": sorted(after[name]["checkpointed"]),
        }
    out["all_identical"] = all(
        all(v for k, v in entry.items() if k.endswith("identical"))
        for entry in out.values()
        if isinstance(entry, dict)
    )
    return out


def git_describe(rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="sd-mini", help="UNet architecture (random weights).")
    parser.add_argument("--steps", type=int, default=12, help="DPO steps profiled.")
    parser.add_argument("--batch", type=int, default=4, help="Pairs per step.")
    parser.add_argument("--log-every", type=int, default=5, help="Steps between metric logs (and read-backs).")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="trainer.mixed_precision (CUDA only; bf16 also stores the frozen weights in bf16).",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU).")
    parser.add_argument("--rounds", type=int, default=1, help="Profiles per tree, alternating; medians are reported.")
    parser.add_argument("--baseline-rev", help="Also profile this git revision's code (e.g. HEAD) as 'before'.")
    parser.add_argument(
        "--check-identity", action="store_true", help="Compare tiny runs with --baseline-rev bit for bit."
    )
    parser.add_argument("--json", type=Path, help="Also write the result JSON here.")
    parser.add_argument("--worker", choices=("profile", "identity"), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.log_every, args.threads, args.rounds) < 1:
        parser.error("--steps, --batch, --log-every, --threads and --rounds must be >= 1")
    if args.check_identity and not args.baseline_rev:
        parser.error("--check-identity needs --baseline-rev")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        import torch

        from prefalign.runtime import apply_offline_defaults

        apply_offline_defaults()
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        torch.set_num_threads(args.threads)
        result = profile_worker(args) if args.worker == "profile" else identity_worker(args)
        args.result_file.write_text(json.dumps(result))
        return

    from prefalign.runtime import emit_json

    report: dict[str, Any] = {
        "preset": args.preset,
        "steps": args.steps,
        "batch": args.batch,
        "log_every": args.log_every,
        "mixed_precision": args.mixed_precision,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    revs = {"after": None} if not args.baseline_rev else {"before": args.baseline_rev, "after": None}
    with tempfile.TemporaryDirectory(prefix="profile_policy_out_") as scratch, contextlib.ExitStack() as stack:
        trees = {label: stack.enter_context(tree_at(rev)) for label, rev in revs.items()}
        outs = {label: Path(scratch) / label for label in revs}
        for out in outs.values():
            out.mkdir()
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in revs}
        # Rounds alternate the trees, so that a change in the machine's load hits both alike.
        for index in range(args.rounds):
            for label, rev in revs.items():
                log.info(
                    "%s (round %d/%d): profiling %s",
                    label,
                    index + 1,
                    args.rounds,
                    f"git {rev}" if rev else "this checkout",
                )
                rounds[label].append(run_worker(trees[label], "profile", args, outs[label]))
        for label, rev in revs.items():
            report[label] = {
                "source": f"git {git_describe(rev)}" if rev else "working tree",
                "summary": median_summary([r["summary"] for r in rounds[label]]),
                "rounds": [{key: value for key, value in r.items() if key != "source"} for r in rounds[label]],
            }
        if args.check_identity:
            identity = {}
            for label in revs:
                log.info("%s: tiny DPO/DRO/KTO/SFT runs", label)
                identity[label] = run_worker(trees[label], "identity", args, outs[label])
            report["identity"] = compare_identity(identity["before"], identity["after"], outs["before"], outs["after"])
    emit_json(report, args.json)


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the rounds; the others (counts per log step) from the first round."""
    merged: dict[str, Any] = {}
    for key, value in summaries[0].items():
        numbers = [s[key] for s in summaries]
        if all(isinstance(n, int | float) for n in numbers):
            merged[key] = round(statistics.median(numbers), 5)
        else:
            merged[key] = value
    return merged


if __name__ == "__main__":
    main()
