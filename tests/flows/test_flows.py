"""The Prefect flow end to end in ``direct`` mode: fast fake stages, real MLflow store and registry.

The fakes replace ``prefalign.stages.run_stage`` only; they open real stage runs (``stage_run``) and
write the files the stage contract names, so the flow's registration, promotion, artifacts and parent
run are the real ones.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # flows/ and tasks/ are repo-level folders, not installed
    sys.path.insert(0, str(ROOT))

from prefalign import stages  # noqa: E402
from prefalign.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, read_run_id, stage_run, tracking_uri  # noqa: E402

UPSTREAM = {
    "world": [],
    "pretrain_base": ["world"],
    "ingest": ["pretrain_base"],
    "validate": ["ingest"],
    "featurize": ["ingest", "pretrain_base"],
    "train_reward": ["ingest"],
    "train_dpo": ["featurize", "pretrain_base"],
    "train_dro": ["featurize", "train_reward", "train_dpo"],
    "evaluate": ["train_dpo", "train_dro", "train_reward"],
}
EVAL = {
    "judge": "oracle",
    "models": {
        "base": {
            "oracle_mean": 0.50,
            "reward_mean": 0.1,
            "accuracy": {"position": {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4}},
        },
        "dpo": {"oracle_mean": 0.58, "reward_mean": 0.2},
        "dro": {"oracle_mean": 0.63, "reward_mean": 0.3},
    },
    "win_rates": {
        k: {
            "oracle": {"rate": r, "ci_low": r - 0.05, "ci_high": r + 0.05},
            "reward": {"rate": r, "ci_low": r - 0.05, "ci_high": r + 0.05},
        }
        for k, r in (("dpo_vs_base", 0.6), ("dro_vs_base", 0.66), ("dro_vs_dpo", 0.55))
    },
    "n_prompts": 4,
    "images_per_prompt": 2,
    "seeds": "fake",
}


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def make_fake_run_stage(valid: bool):
    from prefalign.stages import stage_out_dir

    def fake_run_stage(name: str, cfg) -> dict:
        reports = cfg.paths.resolve("reports")
        upstream = [stage_out_dir(u, cfg) for u in UPSTREAM[name]]
        with stage_run(cfg, name, out_dir=stage_out_dir(name, cfg), upstream=upstream) as tracker:
            out = stage_out_dir(name, cfg)
            match name:
                case "pretrain_base":
                    _write(out / "model_index.json", "{}")
                    _write(out / "unet" / "diffusion_pytorch_model.safetensors", b"base")
                case "validate":
                    result = {
                        "file": "pairs.parquet",
                        "expectation": "expect_column_values_to_not_be_null",
                        "columns": ["prompt"],
                        "success": valid,
                        "unexpected_count": 0 if valid else 3,
                    }
                    report = {
                        "success": valid,
                        "results": [result],
                        "statistics": {"successful_expectations": int(valid), "evaluated_expectations": 1},
                    }
                    _write(reports / "validation.json", json.dumps(report))
                case "train_reward":
                    _write(out / "model.safetensors", b"reward")
                    _write(
                        reports / "reward.json",
                        json.dumps(
                            {"pairwise_accuracy": 0.8, "n_pairs": 100, "n_ties_excluded": 0, "bayes_accuracy": 0.85}
                        ),
                    )
                case "train_dpo":
                    _write(out / "pytorch_lora_weights.safetensors", b"dpo lora")
                case "train_dro":
                    _write(out / "unet" / "diffusion_pytorch_model.safetensors", b"dro unet")
                case "evaluate":
                    _write(reports / "eval.json", json.dumps(EVAL))
                    _png(out / "win_rates.png")
            tracker.log_metrics({f"{name}/done": 1.0})
        if name == "validate" and not valid:
            raise stages.DataValidationError("pairs.parquet: expect_column_values_to_not_be_null(prompt) failed")
        return {"stage": name}

    return fake_run_stage


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, FLOW_RUN_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def repo(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _cfg(repo):
    from prefalign.config import load_config

    return load_config(repo / "params.yaml")


def test_direct_flow_runs_every_stage_registers_and_promotes(repo, monkeypatch):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from flows.pipeline import alignment_pipeline

    monkeypatch.setattr(stages, "run_stage", make_fake_run_stage(valid=True))
    summary = alignment_pipeline(params_path=str(repo / "params.yaml"), mode="direct")

    cfg = _cfg(repo)
    client = MlflowClient(tracking_uri(cfg))
    assert summary["tracking_uri"] == tracking_uri(cfg)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    for stage in stages.STAGES:
        from prefalign.stages import stage_out_dir

        run_id = read_run_id(stage_out_dir(stage, cfg))
        assert parent.data.tags[f"prefalign.stage_run.{stage}"] == run_id
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert summary["promoted"] and summary["champion"]["method"] == "dro"
    assert summary["eval"]["means"]["dro"] == 0.63 and summary["eval"]["win_rates"]["dro_vs_base"]["rate"] == 0.66
    assert {c["created"] for c in summary["candidates"].values()} == {True}
    champion = client.get_model_version_by_alias("prefalign-policy", "champion")
    assert champion.tags["method"] == "dro" and champion.run_id == read_run_id(repo / "models" / "dro")
    assert client.get_model_version_by_alias("prefalign-policy", "challenger").tags["method"] == "dpo"
    assert len(client.search_model_versions("name = 'prefalign-reward'")) == 1

    for key in ("validation-report", "eval-win-rates", "eval-accuracy", "promotion-decision", "eval-figures"):
        assert Artifact.get(key) is not None, key
    assert "data:image/png;base64," in Artifact.get("eval-figures").data
    assert "PASSED" in Artifact.get("validation-report").data

    # An unchanged pipeline registers nothing new and leaves the champion where it is.
    again = alignment_pipeline(params_path=str(repo / "params.yaml"), mode="direct")
    assert {c["created"] for c in again["candidates"].values()} == {False}
    assert not again["promoted"] and again["champion"] == summary["champion"]
    assert len(client.search_model_versions("name = 'prefalign-policy'")) == 2


def test_validation_failure_stops_the_flow_and_publishes_the_report(repo, monkeypatch):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from flows.pipeline import alignment_pipeline

    monkeypatch.setattr(stages, "run_stage", make_fake_run_stage(valid=False))
    state = alignment_pipeline(params_path=str(repo / "params.yaml"), mode="direct", return_state=True)

    assert state.is_failed()
    with pytest.raises(stages.DataValidationError):
        state.result()
    artifact = Artifact.get("validation-report")
    assert artifact.flow_run_id == state.state_details.flow_run_id
    assert "FAILED" in artifact.data and "expect_column_values_to_not_be_null" in artifact.data
    assert not (repo / "data" / "features").exists()  # nothing after the gate ran
    assert (repo / "data" / "preferences" / "run.json").is_file()  # everything before it stays
    client = MlflowClient(tracking_uri(_cfg(repo)))
    experiment = client.get_experiment_by_name("prefalign").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`prefalign.stage` = 'pipeline'")
    assert parent.info.status == "FAILED"
    assert client.search_registered_models() == []


def test_dvc_mode_rejects_overrides(repo):
    from tasks.stages import run_stage_task

    with pytest.raises(ValueError, match="dvc exp run -S dpo.beta=5000"):
        run_stage_task.fn("train_dpo", str(repo / "params.yaml"), "dvc", {"dpo.beta": 5000})


DVC_YAML = """\
stages:
  world:
    cmd: python make_world.py
    deps: [make_world.py]
    outs: [data/world]
  validate:
    cmd: python -c "import sys; print('2 expectations failed'); sys.exit(1)"
    deps: [data/world]
"""
MAKE_WORLD = """\
import json, pathlib
out = pathlib.Path("data/world")
out.mkdir(parents=True, exist_ok=True)
(out / "run.json").write_text(json.dumps({"run_id": "r-world"}))
"""


def test_dvc_mode_runs_dvc_repro_reports_skips_and_failures(repo):
    import subprocess

    from tasks.stages import run_stage_task

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "make_world.py").write_text(MAKE_WORLD)
    params = str(repo / "params.yaml")
    first = run_stage_task("world", params, "dvc")
    assert first == {"stage": "world", "mode": "dvc", "run_id": "r-world", "skipped": False, "summary": None}
    assert (repo / "dvc.lock").is_file()
    assert run_stage_task("world", params, "dvc")["skipped"] is True  # DVC skipped it; the old run id stays
    with pytest.raises(RuntimeError, match="(?s)dvc repro validate.*2 expectations failed.*exited with 1"):
        run_stage_task("validate", params, "dvc")
