"""The evaluation report: base and candidates on held-out prompts, same seeds, win rates with intervals.

On the demo world it also reads every image strictly, attribute by attribute (:mod:`prefalign.world.attributes`),
so the report says *what* alignment fixed (colour, position, ...), not only that the oracle score went up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from prefalign.config import PipelineConfig

if TYPE_CHECKING:
    from prefalign.evaluation.judges import Judge

log = logging.getLogger(__name__)

COMPARISONS = (("dpo", "base"), ("dro", "base"), ("dro", "dpo"))
ACCURACY_COMPARISONS = (("dpo", "base"), ("dro", "base"))
# Marks of the sample grid: the attributes an image gets wrong, abbreviated to fit under a 16 px tile.
MARKS = {"color": "col", "background": "bg", "position": "pos", "size": "size", "shape": "shape"}


def test_prompts(cfg: PipelineConfig) -> list[str]:
    """Held-out prompts: the world's test split on the demo, else the test split of the pairs."""
    world = cfg.paths.resolve("world") / "prompts.parquet"
    table = (
        pd.read_parquet(world)
        if cfg.model.preset == "demo"
        else pd.read_parquet(cfg.paths.resolve("preferences") / "pairs.parquet")
    )
    prompts = sorted(set(table.prompt[table.split == "test"]))
    if not prompts:
        raise ValueError(f"no held-out (test split) prompts in {world}")
    return prompts[: cfg.eval.n_prompts]


def policy_dirs(cfg: PipelineConfig) -> dict[str, Path | None]:
    return {"base": None, "dpo": cfg.paths.resolve("dpo"), "dro": cfg.paths.resolve("dro")}


def generate_images(cfg: PipelineConfig, prompts: list[str]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Every model's images on the same (prompt, seed) grid.

    Returns:
        (the prompt of each image, its prompt index, model to uint8 (N, H, W, 3) images in ``eval_grid`` order).
    """
    from prefalign.models.diffusion import load_policy_pipeline
    from prefalign.models.sampling import eval_grid, generate

    flat, seeds, prompt_ids = eval_grid(prompts, cfg.eval.images_per_prompt, cfg.seed)
    device, dtype = sampling_device_and_dtype(cfg.trainer.mixed_precision)
    images: dict[str, np.ndarray] = {}
    for name, policy_dir in policy_dirs(cfg).items():
        # The judges score raw samples: a safety checker's black images would score as the model's own.
        pipe = load_policy_pipeline(cfg.base_model_dir(), policy_dir, keep_safety_checker=False)
        images[name] = generate(
            pipe.to(device, dtype),
            flat,
            seeds,
            steps=cfg.eval.sample_steps,
            guidance=cfg.eval.guidance,
            resolution=cfg.model.resolution,
            batch_size=cfg.eval.batch_size,
            desc=f"evaluate {name}",
        )
        del pipe
    return flat, prompt_ids, images


def sampling_device_and_dtype(mixed_precision: str) -> tuple[torch.device, torch.dtype]:
    """The GPU in the trainers' half precision when there is one; the CPU in float32 (the demo's numbers).

    Seeds stay on CPU generators (``generate``), so an image's initial noise is the same on either device.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return torch.device("cuda"), dtype


def score_models(
    judges: Sequence[Judge], prompts: Sequence[str], images: Mapping[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """Every model's images scored by every judge: model to judge name to one score per image.

    Each judge moves to the GPU (when there is one) for its turn only, so the judges never share its memory.
    """
    from prefalign.evaluation.judges import judge_device

    device = judge_device()
    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in images}
    for judge in judges:
        judge.to(device)
        try:
            for name, batch in images.items():
                scores[name][judge.name] = judge.score(prompts, batch)
        finally:
            judge.to("cpu")
    return scores


def sample_accuracy(
    pipe, prompts: Sequence[str], images_per_prompt: int, seed: int, *, steps: int, guidance: float, resolution: int
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Demo world: one pipeline's strict per-attribute accuracy and oracle mean on the evaluation's seeds.

    Args:
        pipe: The pipeline to sample.
        prompts: The prompts; each gets ``images_per_prompt`` images with ``eval_grid``'s keyed seeds.
        images_per_prompt, seed: As in the evaluation.
        steps, guidance, resolution: The sampler's settings.

    Returns:
        ({attribute: accuracy, ..., "oracle_mean": ...} rounded to 4 digits, the images, their prompts).
    """
    from prefalign.models.sampling import eval_grid, generate
    from prefalign.world.attributes import attribute_correctness
    from prefalign.world.oracle import oracle_scores

    flat, seeds, _ = eval_grid(prompts, images_per_prompt, seed)
    images = generate(pipe, flat, seeds, steps=steps, guidance=guidance, resolution=resolution)
    out = {k: round(float(v.mean()), 4) for k, v in attribute_correctness(flat, images).items()}
    out["oracle_mean"] = round(float(oracle_scores(flat, images).mean()), 4)
    return out, images, flat


def grid_prompts(test_prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """The prompts of the sample grid: a fixed, spread-out choice that depends on nothing a model does.

    Sorting by a keyed hash spreads the choice over every attribute (the evaluated prompts are sorted
    alphabetically, so their first ``n`` would all be "a large black ...").

    Args:
        test_prompts: The held-out prompts evaluated.
        n: How many to show (``eval.grid_prompts``).
        seed: The global seed.

    Returns:
        ``n`` distinct prompts of ``test_prompts``, in grid order.

    Raises:
        ValueError: If ``n`` exceeds the number of distinct prompts.
    """
    from prefalign.seeding import derive_seed

    unique = sorted(set(test_prompts))
    if n > len(unique):
        raise ValueError(f"eval.grid_prompts is {n} but only {len(unique)} held-out prompts are evaluated")
    return sorted(unique, key=lambda p: (derive_seed(seed, "grid", p), p))[:n]


def check_grid(cfg: PipelineConfig, prompts: Sequence[str]) -> list[str]:
    """The sample grid's prompts, or the config error, before any image is generated.

    Args:
        cfg: The pipeline config (``eval.grid_prompts``, ``eval.grid_seeds``, ``eval.images_per_prompt``).
        prompts: The held-out prompts evaluated.

    Returns:
        :func:`grid_prompts` of ``prompts``.

    Raises:
        ValueError: If the grid asks for more prompts than evaluated or more seeds than images per prompt.
    """
    if cfg.eval.grid_seeds > cfg.eval.images_per_prompt:
        raise ValueError(
            f"eval.grid_seeds is {cfg.eval.grid_seeds} but eval.images_per_prompt is only "
            f"{cfg.eval.images_per_prompt} (the grid shows the evaluation's own images)"
        )
    return grid_prompts(prompts, cfg.eval.grid_prompts, cfg.seed)


def summarize(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    prompt_ids: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    correctness: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The numbers of ``reports/eval.json`` from per-image scores (and correctness), no images needed.

    Args:
        scores: Model to judge name ("oracle", "reward", each of ``eval.judges``) to one score per image; images
            are paired across models on (prompt, seed).
        prompt_ids: Prompt of each image; the intervals resample prompts.
        n_boot: Bootstrap resamples.
        seed: Seed of the resampling (the same for every metric).
        correctness: Optional model to attribute to bool per image
            (:func:`prefalign.world.attributes.attribute_correctness`).

    Returns:
        {"models": {model: {"<judge>_mean", "<judge>_ci_low", "<judge>_ci_high", ...}},
        "win_rates": {"<a>_vs_<b>": {judge: {"rate", "ci_low", "ci_high", "n"}}}}, and with ``correctness`` also
        each model's ``accuracy``
        ({attribute: {"mean", "ci_low", "ci_high"}}) and ``accuracy_delta``
        ({"dpo_vs_base": {attribute: {"mean", "ci_low", "ci_high"}}, ...}: candidate minus base, per image).
    """
    from prefalign.evaluation.metrics import mean_ci, win_rate

    boot = {"n_boot": n_boot, "seed": seed}
    models: dict[str, dict[str, Any]] = {
        name: {f"{m}_{k}": v for m in s for k, v in mean_ci(s[m], prompt_ids, **boot).items()}
        for name, s in scores.items()
    }
    metrics = list(next(iter(scores.values())))
    win_rates = {
        f"{a}_vs_{b}": {m: win_rate(scores[a][m], scores[b][m], prompt_ids, **boot) for m in metrics}
        for a, b in COMPARISONS
        if a in scores and b in scores
    }
    out: dict[str, Any] = {"models": models, "win_rates": win_rates}
    if correctness is not None:
        for name, correct in correctness.items():
            models[name]["accuracy"] = {
                k: mean_ci(np.asarray(v, np.float64), prompt_ids, **boot) for k, v in correct.items()
            }
        # Images are paired on (prompt, seed), so the per-image difference of 0/1 readings is a paired
        # estimate; resampling prompts keeps each prompt's images together, as for the win rates.
        out["accuracy_delta"] = {
            f"{a}_vs_{b}": {
                k: mean_ci(
                    np.asarray(correctness[a][k], np.float64) - np.asarray(correctness[b][k]), prompt_ids, **boot
                )
                for k in correctness[b]
            }
            for a, b in ACCURACY_COMPARISONS
            if a in correctness and b in correctness
        }
    return out


def _wrong_marks(correct: Mapping[str, np.ndarray], i: int) -> str:
    """Short red text naming what image ``i`` gets wrong ("" when it gets everything right)."""
    if not correct["found"][i]:
        return "\u2717 no object"
    wrong = [f"\u2717{short}" for name, short in MARKS.items() if not correct[name][i]]
    # Two marks a line: three ("✗col ✗pos ✗shape") are wider than a 16 px tile at 5x.
    return "\n".join(" ".join(wrong[k : k + 2]) for k in range(0, len(wrong), 2))


def sample_grid(
    images: Mapping[str, np.ndarray],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    correctness: Mapping[str, Mapping[str, np.ndarray]] | None,
    prompts: Sequence[str],
    chosen: Sequence[str],
    *,
    images_per_prompt: int,
    seeds: int,
    path: Path,
    judge: str,
) -> Path:
    """``samples.png``: the chosen prompts' first ``seeds`` evaluation images of every model, side by side.

    Args:
        images: Model to uint8 (N, H, W, 3) evaluation images, prompt-major (``eval_grid`` order).
        scores: Model to judge to per-image scores; captions show the deciding judge's.
        correctness: Model to attribute to per-image readings (demo world), for the wrong-attribute marks.
        prompts: The evaluated prompts, in evaluation order.
        chosen: The grid's prompts (:func:`grid_prompts`).
        images_per_prompt: Evaluation images per prompt.
        seeds: Images shown per prompt and model.
        path: Output PNG.
        judge: The deciding judge (``eval.judge``), whose score captions each image.

    Returns:
        The written path.
    """
    from prefalign.evaluation.figures import comparison_grid

    names = list(images)
    metric = judge
    index = np.array([[prompts.index(p) * images_per_prompt + s for s in range(seeds)] for p in chosen])
    tiles = np.stack([images[m][index] for m in names], axis=2)  # (prompts, seeds, models, H, W, 3)
    captions = [[[f"{scores[m][metric][i]:.2f}" for m in names] for i in row] for row in index]
    marks = (
        None
        if correctness is None
        else [[[_wrong_marks(correctness[m], i) for m in names] for i in row] for row in index]
    )
    title = f"held-out prompts, evaluation seeds 0-{seeds - 1}; under each image its {metric} score"
    if marks is not None:
        title += (
            "\n\u2717 = attribute read wrong (strict): col colour, bg background, pos position, size, shape; "
            "\u2713 = all right"
        )
    return comparison_grid(tiles, list(chosen), names, path, captions=captions, marks=marks, title=title)


def evaluate_policies(
    cfg: PipelineConfig, out: Path, tracker, *, judges: Sequence[Judge] | None = None
) -> dict[str, Any]:
    """Write figures into ``out`` and return the ``reports/eval.json`` payload (docs/design.md, "Reports").

    Args:
        cfg: The pipeline config.
        out: Folder of the figures (``reports/eval``).
        tracker: Where metrics and figures are logged.
        judges: The loaded judges (:func:`prefalign.evaluation.judges.load_judges`); None loads them here, after
            the grid check and before any image is generated.

    Returns:
        The payload: ``judge`` (the deciding judge), ``judges`` (each judge's kind and folder), per model
        ``<judge>_mean`` with its interval for every judge, per comparison the win rate on every judge; on the
        demo world each model also has ``accuracy`` and the payload ``accuracy_delta``.

    Raises:
        ValueError: If ``eval.grid_prompts`` or ``eval.grid_seeds`` ask for more than is evaluated, ``eval.judge``
            cannot decide on this preset, or a judge's folder is in the wrong format (before any image is generated).
    """
    from prefalign.evaluation.figures import accuracy_grouped_bars, win_rate_bars
    from prefalign.evaluation.judges import judge_descriptions, load_judges

    prompts = test_prompts(cfg)
    chosen = check_grid(cfg, prompts)
    judges = load_judges(cfg) if judges is None else judges
    flat, prompt_ids, images = generate_images(cfg, prompts)
    scores = score_models(judges, flat, images)
    correctness = None
    if cfg.model.preset == "demo":
        from prefalign.world.attributes import attribute_correctness

        correctness = {
            name: attribute_correctness(flat, batch, image_size=cfg.model.resolution) for name, batch in images.items()
        }
    summary = summarize(scores, prompt_ids, n_boot=cfg.eval.bootstrap, seed=cfg.seed, correctness=correctness)
    models, win_rates = summary["models"], summary["win_rates"]
    for name, values in models.items():
        tracker.log_metrics({f"eval/{name}_{k}": v for k, v in values.items() if k != "accuracy"})
        tracker.log_metrics({f"eval/{name}_acc_{a}": r["mean"] for a, r in values.get("accuracy", {}).items()})
    for key, result in win_rates.items():
        tracker.log_metrics({f"eval/{key}_{m}_rate": r["rate"] for m, r in result.items()})
    figures = [
        sample_grid(
            images,
            scores,
            correctness,
            prompts,
            chosen,
            images_per_prompt=cfg.eval.images_per_prompt,
            seeds=cfg.eval.grid_seeds,
            path=out / "samples.png",
            judge=cfg.eval.judge,
        ),
        win_rate_bars(
            {f"{k} ({m})": r for k, v in win_rates.items() for m, r in v.items()},
            out / "win_rates.png",
            title="win rate (95% bootstrap CI over prompts)",
        ),
    ]
    if correctness is not None:
        figures.append(
            accuracy_grouped_bars(
                {name: values["accuracy"] for name, values in models.items()},
                out / "accuracy.png",
                title="strict per-attribute accuracy (95% bootstrap CI over prompts)",
            )
        )
    (out / "samples_prompts.txt").write_text("\n".join(chosen) + "\n")
    for path in figures:
        tracker.log_artifact(path, "figures")
    report = {
        "judge": cfg.eval.judge,
        "models": models,
        "win_rates": win_rates,
        "n_prompts": len(prompts),
        "images_per_prompt": cfg.eval.images_per_prompt,
        "seeds": f"image_seed(seed={cfg.seed}, prompt, i) for i < {cfg.eval.images_per_prompt}",
        "sampler": {"scheduler": "dpmsolver++", "steps": cfg.eval.sample_steps, "guidance": cfg.eval.guidance},
        "judges": judge_descriptions(cfg),
        "notes": "The reward model selected DRO's expert demonstrations, so its score is not an independent judge "
        "of DRO; the oracle (demo world) and the judges of eval.judges are.",
    }
    if "accuracy_delta" in summary:
        report["accuracy_delta"] = summary["accuracy_delta"]
    return report
