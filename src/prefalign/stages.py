"""One ``run_<stage>(cfg)`` per pipeline stage: the only place where stages read and write files.

``dvc repro`` runs them through ``prefalign stage <name>``; the Prefect tasks run them the same way or
in-process (``mode="direct"``). Each returns a small JSON-able summary and records an MLflow run (or
nothing, with tracking disabled) whose id lands in ``<out>/run.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig
from prefalign.tracking import NullTracker, Tracker, stage_run

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "world", "pretrain_base", "ingest", "validate", "featurize", "train_reward", "train_dpo", "train_dro", "evaluate",
)


# Where each stage's run.json lands: (paths entry, subfolder). The one copy; tasks and tests read it here.
STAGE_OUTPUTS: dict[str, tuple[str, str]] = {
    "world": ("world", ""),
    "pretrain_base": ("base_model", ""),
    "ingest": ("preferences", ""),
    "validate": ("reports", "validation"),
    "featurize": ("features", ""),
    "train_reward": ("reward", ""),
    "train_dpo": ("dpo", ""),
    "train_dro": ("dro", ""),
    "evaluate": ("reports", "eval"),
}


def stage_out_dir(stage: str, cfg: PipelineConfig) -> Path:
    """The folder holding ``stage``'s outputs and run.json."""
    name, sub = STAGE_OUTPUTS[stage]
    return cfg.paths.resolve(name) / sub


class DataValidationError(RuntimeError):
    """The validation gate rejected the data; the report says why."""


def _p(cfg: PipelineConfig, name: str) -> Path:
    return cfg.paths.resolve(name)


def _fresh_dir(path: Path) -> Path:
    """An empty output folder: a stale file from an earlier run must never pass as this run's output."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def _log_figure(tracker: Tracker, path: Path) -> None:
    tracker.log_artifact(path, "figures")


def _torch_setup(cfg: PipelineConfig) -> None:
    from prefalign.seeding import seed_everything

    # torch takes its thread count from OMP_NUM_THREADS: set it to 1 per process when stages share the
    # cores, since two 2-thread processes on 2 cores ran ~20x slower than one here (OpenMP spin-waits).
    seed_everything(cfg.seed)


# --------------------------------------------------------------------------------------------------- world
def run_world(cfg: PipelineConfig) -> dict[str, Any]:
    """Demo world: the prompt table with splits, and partly mis-captioned noisy renderings for pretraining."""
    from prefalign.data.prepare import assign_split
    from prefalign.seeding import numpy_rng
    from prefalign.world.grammar import all_attributes, corrupt, prompt_of
    from prefalign.world.render import render

    out = _fresh_dir(stage_out_dir("world", cfg))
    with stage_run(cfg, "world", out_dir=out) as tracker:
        attrs = all_attributes()
        table = pd.DataFrame([{**vars(a), "prompt": prompt_of(a)} for a in attrs])
        table["split"] = [assign_split(p, train=cfg.data.split_train, val=cfg.data.split_val) for p in table.prompt]
        table.to_parquet(out / "prompts.parquet", index=False)
        rng = numpy_rng(cfg.seed, "world-pretrain")
        picks = rng.integers(0, len(attrs), cfg.world.n_pretrain_images)
        images, captions, wrong = [], [], 0
        for k in picks:
            true = attrs[k]
            caption_attrs = corrupt(true, rng) if rng.random() < cfg.world.caption_error_rate else true
            wrong += caption_attrs != true
            sigma = rng.uniform(0, cfg.world.pixel_noise_max)
            images.append(render(true, cfg.world.image_size, noise_sigma=sigma, rng=rng))
            captions.append(prompt_of(caption_attrs))
        np.savez_compressed(out / "pretrain.npz", images=np.stack(images), captions=np.array(captions))
        summary = {"prompts": len(table), "splits": table.split.value_counts().to_dict(),
                   "pretrain_images": len(images), "wrong_captions": int(wrong)}
        tracker.log_metrics({"world/pretrain_images": len(images), "world/wrong_captions": int(wrong)})
    return summary


# --------------------------------------------------------------------------------------------- pretrain
def run_pretrain_base(cfg: PipelineConfig) -> dict[str, Any]:
    """Train the tiny Stable Diffusion of the demo world and save it as a stock pipeline folder."""
    if cfg.model.preset == "sd15":
        return _record_local_base(cfg)
    if cfg.model.preset != "demo":
        raise ValueError(f"pretrain_base trains the demo model or records an sd15 folder; preset {cfg.model.preset!r} "
                         "builds random weights for benchmarks/bench_align.py only")
    from prefalign.evaluation.figures import image_grid, loss_curve
    from prefalign.evaluation.generate import eval_grid, generate
    from prefalign.training.pretrain import pretrain_base
    from prefalign.world.grammar import vocabulary_words

    _torch_setup(cfg)
    out = _fresh_dir(stage_out_dir("pretrain_base", cfg))
    world = np.load(_p(cfg, "world") / "pretrain.npz")
    with stage_run(cfg, "pretrain_base", out_dir=out, upstream=[_p(cfg, "world")]) as tracker:
        result = pretrain_base(world["images"], list(world["captions"]), vocabulary_words(), cfg.model, cfg.pretrain,
                               seed=cfg.seed, log_metrics=tracker.log_metrics)
        result.pipeline.save_pretrained(str(out), safe_serialization=True)
        every = pd.read_parquet(_p(cfg, "world") / "prompts.parquet").prompt.tolist()
        prompts = every[:: max(1, len(every) // 8)][:8]
        flat, seeds, _ = eval_grid(prompts, 8, cfg.seed)
        samples = generate(result.pipeline, flat, seeds, steps=cfg.eval.sample_steps, guidance=cfg.eval.guidance,
                           resolution=cfg.model.resolution)
        # Figures sit beside the pipeline files: stock from_pretrained ignores them.
        _log_figure(tracker, image_grid(samples, prompts, 8, out / "base_samples.png", title="base model samples"))
        _log_figure(tracker, loss_curve(result.history, out / "pretrain_loss.png", title="pretraining loss"))
        final = {k: float(np.mean(v[-50:])) for k, v in result.history.items() if v}
        tracker.log_metrics({f"pretrain/final_{k}": v for k, v in final.items()})
    return {"final_losses": final}


BASE_POINTER_FILE = "base_model.json"


def _record_local_base(cfg: PipelineConfig) -> dict[str, Any]:
    """sd15: check ``model.pretrained_path`` and record its fingerprint in ``paths.base_model``, no copy.

    The pointer is this stage's DVC output, so replacing the weights in the folder changes the fingerprint
    and reruns everything downstream; the MLflow run carries it as lineage.
    """
    from prefalign.models.diffusion import check_pipeline_folder, folder_fingerprint

    folder = check_pipeline_folder(cfg.base_model_dir())
    out = _fresh_dir(stage_out_dir("pretrain_base", cfg))
    with stage_run(cfg, "pretrain_base", out_dir=out) as tracker:
        pointer = {"source": str(folder), **folder_fingerprint(folder)}
        _write_json(out / BASE_POINTER_FILE, pointer)
        tracker.log_params({"base_model/source": pointer["source"], "base_model/sha256": pointer["sha256"]})
    log.info("pretrain_base: preset sd15 uses %s in place (sha256 %s, %d files)", folder, pointer["sha256"][:12],
             pointer["files"])
    return pointer


# ------------------------------------------------------------------------------------------------ ingest
def run_ingest(cfg: PipelineConfig) -> dict[str, Any]:
    """Build the canonical preference dataset.

    demo: renderings and base samples judged by simulated annotators. pickapic | hpd | jsonl: everything
    under ``paths.source`` imported afresh; the import is deterministic and de-duplicates by id, so
    re-importing all shards gives what an incremental import would, and DVC keeps every earlier version.
    """
    out = _fresh_dir(stage_out_dir("ingest", cfg))
    source = _p(cfg, "base_model") if cfg.data.source == "demo" else _p(cfg, "source")
    with stage_run(cfg, "ingest", out_dir=out, upstream=[source]) as tracker:
        if cfg.data.source == "demo":
            from prefalign.data.demo_pool import build_demo_pool

            summary = build_demo_pool(cfg, out)
        else:
            from prefalign.data.importers import import_preferences

            result = import_preferences(cfg.data.source, _import_input(cfg), out, data=cfg.data,
                                        validation=cfg.validation)
            summary = {**result.to_dict(), **{f"imported_{table}": n for table, n in result.imported.items()}}
        tracker.log_metrics({f"ingest/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _import_input(cfg: PipelineConfig) -> Path:
    """The file or folder the importer reads: ``paths.source``, or its one data file for single-file formats."""
    source = _p(cfg, "source")
    if cfg.data.source == "pickapic" or source.is_file():
        return source  # a folder of shards is Pick-a-Pic's native layout
    suffix = {"hpd": ".json", "jsonl": ".jsonl"}[cfg.data.source]
    found = sorted(source.glob(f"*{suffix}"))
    if len(found) != 1:
        raise ValueError(f"{source}: data.source={cfg.data.source!r} needs exactly one *{suffix} file here, "
                         f"found {len(found)}")
    return found[0]


# ---------------------------------------------------------------------------------------------- validate
def run_validate(cfg: PipelineConfig) -> dict[str, Any]:
    """The Great Expectations gate: raises ``DataValidationError`` when the data is invalid."""
    from prefalign.data.validation import validate_preferences

    out = _fresh_dir(stage_out_dir("validate", cfg))
    report_path = _p(cfg, "reports") / "validation.json"
    with stage_run(cfg, "validate", out_dir=out, upstream=[_p(cfg, "preferences")]) as tracker:
        report = validate_preferences(_p(cfg, "preferences"), cfg.validation, report_path=report_path,
                                      docs_dir=out / "data_docs", data=cfg.data)
        tracker.log_artifact(report_path)
        tracker.log_metrics({"validate/success": float(report.success),
                             "validate/failed_expectations": float(len(report.failures()))})
    if not report.success:
        raise DataValidationError(f"{_p(cfg, 'preferences')} failed validation ({report_path}):\n  "
                                  + "\n  ".join(report.failures()))
    return {"success": True, "report": str(report_path)}


# --------------------------------------------------------------------------------------------- featurize
def run_featurize(cfg: PipelineConfig) -> dict[str, Any]:
    """Cache VAE latents of every referenced image and text embeddings of every prompt (+ the empty one)."""
    from prefalign.training.features import compute_features

    _torch_setup(cfg)
    out = _fresh_dir(stage_out_dir("featurize", cfg))
    with stage_run(cfg, "featurize", out_dir=out, upstream=[_p(cfg, "preferences"), _p(cfg, "base_model")]) as tracker:
        summary = compute_features(cfg.base_model_dir(), _p(cfg, "preferences"), out, cfg.featurize)
        tracker.log_metrics({"featurize/images": summary["images"], "featurize/prompts": summary["prompts"]})
    return summary


# ------------------------------------------------------------------------------------------ train_reward
def checkpoint_dir(stage: str, cfg: PipelineConfig) -> Path:
    """``<paths.checkpoints>/<stage>``: resumable state, outside the stage's DVC output (DVC deletes those)."""
    return _p(cfg, "checkpoints") / stage


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of ``accelerate launch`` / ``torchrun`` (which set ``RANK``)."""
    return _rank() == 0


@contextlib.contextmanager
def _policy_stage_run(cfg: PipelineConfig, stage: str, upstream: Sequence[Path]) -> Iterator[tuple[Path, Tracker]]:
    """The output folder and tracker of a training stage that may run in several processes.

    Under ``accelerate launch`` every rank trains (the trainer splits each global batch between them),
    but only rank 0 empties and writes the output folder and records the MLflow run; the other ranks get
    a ``NullTracker`` and the folder's path, and must write nothing into it.
    """
    out = stage_out_dir(stage, cfg)
    if not is_main_process():
        yield out, NullTracker()
        return
    with stage_run(cfg, stage, out_dir=_fresh_dir(out), upstream=upstream) as tracker:
        yield out, tracker


def _drop_checkpoints(stage: str, cfg: PipelineConfig) -> None:
    # The outputs are written: the checkpoints served their purpose (resuming this run). Keeping them would
    # make the next run with another config or data stop at the fingerprint check.
    shutil.rmtree(checkpoint_dir(stage, cfg), ignore_errors=True)


def run_train_reward(cfg: PipelineConfig) -> dict[str, Any]:
    """Train the reward model (BT / PL) and report held-out accuracy next to the Bayes rate."""
    from prefalign.training.reward_stage import train_and_evaluate_reward

    _torch_setup(cfg)
    out = _fresh_dir(stage_out_dir("train_reward", cfg))
    with stage_run(cfg, "train_reward", out_dir=out, upstream=[_p(cfg, "preferences"), _p(cfg, "world")]) as tracker:
        report = train_and_evaluate_reward(cfg, out, tracker, checkpoint_dir=checkpoint_dir("train_reward", cfg))
        _write_json(_p(cfg, "reports") / "reward.json", report)
        tracker.log_metrics({f"reward/{k}": float(v) for k, v in report.items() if isinstance(v, int | float)})
    _drop_checkpoints("train_reward", cfg)
    return {k: v for k, v in report.items() if not isinstance(v, dict | list)}


# --------------------------------------------------------------------------------------------- train_dpo
def _load_pairs(cfg: PipelineConfig, split: str) -> pd.DataFrame:
    pairs = pd.read_parquet(_p(cfg, "preferences") / "pairs.parquet")
    return pairs[pairs.split == split].reset_index(drop=True)


def _finish_policy(cfg, tracker, out: Path, history, name: str) -> dict[str, Any]:
    from prefalign.evaluation.figures import loss_curve
    from prefalign.training.policy import save_history

    save_history(history, out / "history.json")
    curves = {k: history.metrics[k] for k in ("loss", "implicit_acc", "active") if k in history.metrics}
    _log_figure(tracker, loss_curve(curves, out / "loss_curve.png", title=f"{name} training"))
    final = {k: float(np.mean(v[-20:])) for k, v in history.metrics.items()}
    tracker.log_metrics({f"{name}/final_{k}": v for k, v in final.items()})
    return {"steps": history.steps, **{f"final_{k}": v for k, v in final.items()}}


def run_train_dpo(cfg: PipelineConfig) -> dict[str, Any]:
    """Offline Diffusion-DPO from the base model on the train pairs; ties dropped and counted.

    Ties (label 0.5) are always dropped: the published loss has no tie form and a tie kept in source
    order would be trained as a win. Their count is logged, tracked (``dpo.ties_dropped``) and in the summary.
    Resumes from ``<paths.checkpoints>/train_dpo`` when an interrupted run of the same config left one.
    """
    from prefalign.data.prepare import drop_ties
    from prefalign.models.diffusion import load_base_unet, save_lora
    from prefalign.training.features import load_features
    from prefalign.training.policy import train_dpo

    _torch_setup(cfg)
    with _policy_stage_run(cfg, "train_dpo", [_p(cfg, "features"), _p(cfg, "base_model")]) as (out, tracker):
        pairs, ties = drop_ties(_load_pairs(cfg, "train"))
        log.info("train_dpo: %d strict pairs, %d ties dropped", len(pairs), ties)
        tracker.log_params({"dpo.ties_dropped": ties, "dpo.train_pairs": len(pairs)})
        unet = load_base_unet(cfg.base_model_dir())
        history = train_dpo(unet, pairs.image_w.tolist(), pairs.image_l.tolist(), pairs.prompt.tolist(),
                            load_features(_p(cfg, "features")), cfg.dpo, seed=cfg.seed, log_metrics=tracker.log_metrics,
                            checkpoint_dir=checkpoint_dir("train_dpo", cfg))
        if not is_main_process():  # the trainer waited for every rank; rank 0 exports
            return {"rank": _rank(), "steps": history.steps}
        save_lora(unet, out)
        summary = {"train_pairs": len(pairs), "ties_dropped": ties, **_finish_policy(cfg, tracker, out, history, "dpo")}
        _write_json(out / "summary.json", summary)
    _drop_checkpoints("train_dpo", cfg)
    return summary


# --------------------------------------------------------------------------------------------- train_dro
def run_train_dro(cfg: PipelineConfig) -> dict[str, Any]:
    """Hybrid Diffusion-DRO: reward-selected experts + online negatives; exported as a full UNet.

    The export is a full ``unet/`` folder, not a LoRA file: DRO's adapter is trained on top of the DPO
    adapter merged into the base (``dro.init_from: dpo``), so it is no adapter of the base model. With
    ``dro.ema_decay`` > 0 the EMA of the adapter is what gets merged. Resumes from
    ``<paths.checkpoints>/train_dro`` when an interrupted run of the same config left one.
    """
    from prefalign.models.diffusion import unet_with_policy
    from prefalign.training.features import load_features
    from prefalign.training.policy import merge_and_strip_lora, train_dro
    from prefalign.registry import reward_tags
    from prefalign.training.reward_stage import select_experts

    _torch_setup(cfg)
    init_dir = _p(cfg, "dpo") if cfg.dro.init_from == "dpo" else None
    upstream = [_p(cfg, "features"), _p(cfg, "reward")] + ([init_dir] if init_dir else [])
    with _policy_stage_run(cfg, "train_dro", upstream) as (out, tracker):
        experts = select_experts(cfg)  # deterministic: every rank selects the same experts
        if is_main_process():
            tracker.set_tags(reward_tags(cfg, _p(cfg, "reward")))
            _write_json(out / "experts.json", {"shas": experts.image.tolist(), "prompts": experts.prompt.tolist()})
            tracker.log_artifact(out / "experts.json")
        # The DPO adapter is merged into the weights, which become DRO's reference; a new adapter trains on top.
        unet = unet_with_policy(cfg.base_model_dir(), init_dir)
        history = train_dro(unet, experts.image.tolist(), experts.prompt.tolist(), load_features(_p(cfg, "features")),
                            cfg.dro, seed=cfg.seed, log_metrics=tracker.log_metrics,
                            checkpoint_dir=checkpoint_dir("train_dro", cfg))
        if not is_main_process():
            return {"rank": _rank(), "steps": history.steps}
        merge_and_strip_lora(unet)
        unet.save_pretrained(str(out / "unet"), safe_serialization=True)
        summary = {"experts": len(experts), "init_from": cfg.dro.init_from,
                   **_finish_policy(cfg, tracker, out, history, "dro")}
        _write_json(out / "summary.json", summary)
    _drop_checkpoints("train_dro", cfg)
    return summary


# ---------------------------------------------------------------------------------------------- evaluate
def run_evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    """Base, DPO and DRO on held-out prompts with fixed seeds: oracle, reward, win rates with intervals."""
    from prefalign.evaluation.report import evaluate_policies
    from prefalign.registry import reward_tags

    _torch_setup(cfg)
    out = _fresh_dir(stage_out_dir("evaluate", cfg))
    upstream = [_p(cfg, "dpo"), _p(cfg, "dro"), _p(cfg, "reward")]
    with stage_run(cfg, "evaluate", out_dir=out, upstream=upstream) as tracker:
        tracker.set_tags(reward_tags(cfg, _p(cfg, "reward")))
        report = evaluate_policies(cfg, out, tracker)
        _write_json(_p(cfg, "reports") / "eval.json", report)
        tracker.log_artifact(_p(cfg, "reports") / "eval.json")
    return {"win_rates": report["win_rates"], "models": report["models"]}


RUNNERS: dict[str, Callable[[PipelineConfig], dict[str, Any]]] = {
    "world": run_world,
    "pretrain_base": run_pretrain_base,
    "ingest": run_ingest,
    "validate": run_validate,
    "featurize": run_featurize,
    "train_reward": run_train_reward,
    "train_dpo": run_train_dpo,
    "train_dro": run_train_dro,
    "evaluate": run_evaluate,
}


def run_stage(name: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Run one stage by name (the names of dvc.yaml, the CLI and the flow)."""
    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    log.info("stage %s", name)
    return RUNNERS[name](cfg)
