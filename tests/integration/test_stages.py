"""Every run_<stage> in-process on a tiny config, in a temporary repo root, with real MLflow tracking."""

import json
import shutil
from pathlib import Path

import pytest

from prefalign.config import load_config
from prefalign.stages import STAGES, run_stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    return root


@pytest.fixture(scope="module")
def ran(pipeline_root, tiny_overrides):
    cfg = load_config(pipeline_root / "params.yaml", tiny_overrides)
    summaries = {name: run_stage(name, cfg) for name in STAGES}
    return cfg, summaries


def test_every_stage_writes_its_outputs(ran, pipeline_root):
    _, summaries = ran
    assert set(summaries) == set(STAGES)
    assert (pipeline_root / "models/base/model_index.json").is_file()
    assert (pipeline_root / "data/preferences/pairs.parquet").is_file()
    assert (pipeline_root / "data/features/latents-00000.safetensors").is_file()
    assert (pipeline_root / "models/dpo/pytorch_lora_weights.safetensors").is_file()
    assert (pipeline_root / "models/dro/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (pipeline_root / "reports/validation.json").is_file()


def test_dpo_drops_ties_and_finished_runs_leave_no_checkpoints(ran, pipeline_root):
    import pandas as pd

    _, summaries = ran
    pairs = pd.read_parquet(pipeline_root / "data/preferences/pairs.parquet")
    train = pairs[pairs.split == "train"]
    assert summaries["train_dpo"]["ties_dropped"] == int((train.label == 0.5).sum())
    assert summaries["train_dpo"]["train_pairs"] == int((train.label == 1.0).sum())
    # checkpoints are for resuming an interrupted run; a finished stage removes them
    assert not (pipeline_root / "checkpoints/train_dpo").exists()
    assert not (pipeline_root / "checkpoints/train_dro").exists()


def test_each_stage_records_its_mlflow_run(ran, pipeline_root):
    for out in (
        "data/world",
        "models/base",
        "data/preferences",
        "data/features",
        "models/reward",
        "models/dpo",
        "models/dro",
        "reports/eval",
        "reports/validation",
    ):
        run = json.loads((pipeline_root / out / "run.json").read_text())
        assert run["run_id"], out


def test_eval_report_has_the_stable_keys(ran, pipeline_root):
    report = json.loads((pipeline_root / "reports/eval.json").read_text())
    assert report["judge"] == "oracle"
    assert set(report["models"]) == {"base", "dpo", "dro"}
    for model in report["models"].values():
        assert {"oracle_mean", "reward_mean"} <= set(model)
    for key in ("dpo_vs_base", "dro_vs_base", "dro_vs_dpo"):
        for metric in ("oracle", "reward"):
            result = report["win_rates"][key][metric]
            assert result["ci_low"] <= result["rate"] <= result["ci_high"]
    assert report["n_prompts"] == 4 and report["images_per_prompt"] == 2
    assert (pipeline_root / "reports/eval/samples.png").is_file()


def test_reward_report_keys(ran, pipeline_root):
    report = json.loads((pipeline_root / "reports/reward.json").read_text())
    for key in ("pairwise_accuracy", "n_pairs", "n_ties_excluded", "bayes_accuracy", "kendall_tau", "top1_accuracy"):
        assert key in report
    # Demo world: the model's label-noise-free accuracy sits between chance and the oracle's.
    assert 0.0 <= report["oracle_agreement"] <= 1.0
    assert report["expected_accuracy"] <= report["bayes_accuracy"] + 1e-12


def test_policies_load_with_stock_diffusers(ran, pipeline_root):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline_root / "models/base", safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.load_lora_weights(pipeline_root / "models/dpo")
    image = pipe(
        "a small red circle at the center on a black background",
        num_inference_steps=2,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 16, 16, 3)


def test_validation_gate_stops_bad_data(ran, pipeline_root):
    import pandas as pd

    from prefalign.stages import DataValidationError

    cfg, _ = ran
    pairs_path = pipeline_root / "data/preferences/pairs.parquet"
    original = pairs_path.read_bytes()
    try:
        pairs = pd.read_parquet(pairs_path)
        pairs.loc[0, "image_l"] = pairs.loc[0, "image_w"]
        pairs.to_parquet(pairs_path, index=False)
        with pytest.raises(DataValidationError, match="image_w"):
            run_stage("validate", cfg)
    finally:
        pairs_path.write_bytes(original)


@pytest.mark.parametrize("stage", ["train_dpo", "train_dro"])
def test_a_non_zero_rank_trains_but_writes_no_output_and_no_run(ran, pipeline_root, monkeypatch, stage):
    """Under `accelerate launch` every rank runs the stage; only rank 0 may write the folder or the MLflow run."""
    import mlflow

    from prefalign import stages

    cfg, summaries = ran
    out = stages.stage_out_dir(stage, cfg)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    from prefalign.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    n_runs = len(client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]))
    monkeypatch.setenv("RANK", "1")  # as accelerate launch sets it on rank 1
    summary = stages.run_stage(stage, cfg)
    assert summary == {"rank": 1, "steps": summaries[stage]["steps"]}
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert len(client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])) == n_runs


def test_sd15_preset_uses_the_local_folder_in_place(ran, pipeline_root, tmp_path, tiny_overrides):
    """preset sd15: pretrain_base records the folder's fingerprint instead of copying it; featurize and
    train_dpo load the base from model.pretrained_path."""
    import numpy as np
    import torch

    from prefalign.models.diffusion import folder_fingerprint
    from prefalign.training.features import load_features

    external = tmp_path / "weights/sd15"
    shutil.copytree(pipeline_root / "models/base", external, ignore=shutil.ignore_patterns("*.png", "run.json"))
    root = tmp_path / "sd15_run"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    cfg = load_config(
        root / "params.yaml",
        {
            **tiny_overrides,
            "model.preset": "sd15",
            "model.pretrained_path": "../weights/sd15",
            "model.resolution": ran[0].model.resolution,
            "tracking.enabled": False,
            "paths.preferences": str(pipeline_root / "data/preferences"),
        },
    )
    pointer = run_stage("pretrain_base", cfg)
    assert pointer["sha256"] == folder_fingerprint(external)["sha256"]
    assert json.loads((root / "models/base/base_model.json").read_text())["source"] == str(external.resolve())
    assert not (root / "models/base/unet").exists()
    run_stage("featurize", cfg)
    ours, demo = (load_features(r / "data/features") for r in (root, pipeline_root))
    assert ours.image_rows == demo.image_rows
    rows = np.arange(len(demo.image_rows))
    text_rows = np.arange(demo.text.shape[0])
    assert torch.equal(ours.latents[rows], demo.latents[rows]) and torch.equal(
        ours.text[text_rows], demo.text[text_rows]
    )
    run_stage("train_dpo", cfg)
    assert (root / "models/dpo/pytorch_lora_weights.safetensors").is_file()


def test_a_base_folder_that_is_not_an_sd_pipeline_is_named(tmp_path):
    from prefalign.models.diffusion import check_pipeline_folder

    with pytest.raises(ValueError, match=f"{tmp_path / 'none'}.*no model_index.json"):
        check_pipeline_folder(tmp_path / "none")
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            }
        )
    )
    with pytest.raises(ValueError, match="SDXL"):
        check_pipeline_folder(sdxl)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    with pytest.raises(ValueError, match="missing component.*vae"):
        check_pipeline_folder(partial)


def test_bench_reward_ceiling_reads_the_pipeline_outputs(ran, pipeline_root, tmp_path):
    import subprocess
    import sys

    out, figure = tmp_path / "ceiling.json", tmp_path / "ceiling.png"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/bench_reward_ceiling.py"),
            "--params",
            str(pipeline_root / "params.yaml"),
            "--seeds",
            "2",
            "--steps",
            "20",
            "--json",
            str(out),
            "--figure",
            str(figure),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    reward = json.loads((pipeline_root / "reports/reward.json").read_text())
    # The same model on the same pairs as the stage's report.
    assert report["reward_model"]["pairwise_accuracy"] == pytest.approx(reward["pairwise_accuracy"])
    assert report["reward_model"]["expected_accuracy"] == pytest.approx(reward["expected_accuracy"])
    assert report["bayes_accuracy"] == pytest.approx(reward["bayes_accuracy"])
    ceiling = report["perception_ceiling"]
    assert ceiling["seeds"] == 2 and len(ceiling["best_steps"]) == 2
    assert ceiling["expected_accuracy"]["min"] <= ceiling["expected_accuracy"]["max"] <= report["bayes_accuracy"]
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_bench_efficacy_trains_every_variant_per_seed(ran, pipeline_root, tiny_overrides, tmp_path):
    import subprocess
    import sys

    out, figure = tmp_path / "efficacy.json", tmp_path / "efficacy.png"
    sets = [
        arg
        for k, v in {**tiny_overrides, "kto.steps": 2, "kto.batch_size": 4}.items()
        if k.split(".")[0] in ("trainer", "dpo", "dro", "kto", "eval")
        for arg in ("-S", f"{k}={v}")
    ]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/bench_efficacy.py"),
            "--params",
            str(pipeline_root / "params.yaml"),
            "--seeds",
            "0,1",
            "--variants",
            "base,dpo,sft_experts,dro_base,dro_dpo,kto",
            "--json",
            str(out),
            "--figure",
            str(figure),
            *sets,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"base", "dpo", "sft_experts", "dro_base", "dro_dpo", "kto"}
    assert set(report["claims"]["dpo_vs_kto"]["oracle_win_rate"]) == {"0", "1"}
    assert set(report["models"]["dpo"]["per_seed"]) == {"0", "1"}
    assert set(report["models"]["base"]["per_seed"]) == {"0"}  # trained by no seed: evaluated once
    claim = report["claims"]["dro_dpo_vs_dpo"]
    assert set(claim["oracle_win_rate"]) == {"0", "1"}
    assert claim["holds_every_seed"] == all(r["ci_low"] > 0.5 for r in claim["oracle_win_rate"].values())
    # Different training seeds train different models.
    dpo = report["models"]["dpo"]["per_seed"]
    assert dpo["0"]["oracle_mean"]["mean"] != dpo["1"]["oracle_mean"]["mean"]
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_bench_efficacy_rejects_an_unknown_variant_before_training(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/bench_efficacy.py"),
            "--variants",
            "dpo,ppo",
            "--params",
            str(tmp_path / "absent.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("unknown variant 'ppo' in --variants; known: base,dpo,sft_experts,dro_base,dro_dpo,kto")
    )
