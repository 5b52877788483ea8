"""Stage runs: run.json, parent/child, lineage tags, params, dataset input; NullTracker when disabled."""

import json
import os
from pathlib import Path

import pytest

from prefalign.config import PipelineConfig
from prefalign.tracking import (
    FLOW_RUN_ENV,
    PARENT_RUN_ENV,
    NullTracker,
    flatten_config,
    pipeline_run,
    read_run_id,
    record_stage_runs,
    stage_run,
    tracking_uri,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, FLOW_RUN_ENV):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    # One store for the module: creating an MLflow sqlite schema costs a few seconds.
    root = tmp_path_factory.mktemp("tracking")
    return PipelineConfig.model_validate({"paths": {"root": str(root)}})


@pytest.fixture(scope="module")
def client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(cfg))


def test_relative_sqlite_uri_lives_under_root_and_env_wins(cfg, monkeypatch):
    assert tracking_uri(cfg) == f"sqlite:///{cfg.paths.root}/mlruns/mlflow.db"
    assert tracking_uri(cfg).startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(cfg) == "http://mlflow.internal:5000"


def test_configuring_one_store_does_not_pin_the_next(cfg, tmp_path):
    from prefalign.tracking import configure_mlflow

    other = PipelineConfig.model_validate({"paths": {"root": str(tmp_path)}, "tracking": {"enabled": True}})
    assert configure_mlflow(cfg) == tracking_uri(cfg)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow exports it; configure_mlflow takes it back
    assert tracking_uri(other).startswith(f"sqlite:///{tmp_path}")


def test_stage_run_records_run_json_tags_params_and_dataset(cfg, client, tmp_path):
    out = tmp_path / "reward"
    with stage_run(cfg, "train_reward", out_dir=out) as tracker:
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_params({"reward.pairs_used": 10})
        (tmp_path / "note.txt").write_text("hello")
        tracker.log_artifact(tmp_path / "note.txt", "notes")
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == read_run_id(out) == tracker.run_id
    assert record["stage"] == "train_reward" and record["parent_run_id"] is None
    assert record["tracking_uri"] == tracking_uri(cfg)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train_reward"
    assert run.info.artifact_uri.startswith((Path(cfg.paths.root) / "mlruns" / "artifacts").resolve().as_uri())
    tags = run.data.tags
    assert tags["prefalign.stage"] == "train_reward"
    assert tags["prefalign.params_sha"] == cfg.section_sha()
    assert tags["prefalign.data_version"] == "unversioned"
    assert tags["prefalign.git_commit"]
    assert "prefect.flow_run_id" not in tags
    # what it ran on, so a float difference between machines can be traced (torch is imported by the suite)
    assert tags["prefalign.machine.cores"] == str(os.cpu_count())
    assert tags["prefalign.machine.cpu"] and tags["prefalign.machine.blas"]
    assert tags["prefalign.machine.torch"] == __import__("torch").__version__
    assert run.data.params["dpo.beta"] == str(cfg.dpo.beta)
    assert run.data.params["dpo.lora.targets"] == json.dumps(list(cfg.dpo.lora.targets))
    assert run.data.params["reward.pairs_used"] == "10"
    assert client.get_metric_history(run.info.run_id, "loss")[0].step == 3
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "preferences" and dataset.dataset.digest == "unversioned"
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"


def test_stage_runs_are_children_of_the_pipeline_run(cfg, client, tmp_path):
    with pipeline_run(cfg, flow_run_id="flow-123") as parent:
        assert os.environ[PARENT_RUN_ENV] == parent and os.environ[FLOW_RUN_ENV] == "flow-123"
        with stage_run(cfg, "world", out_dir=tmp_path / "world"):
            pass
        with stage_run(cfg, "pretrain_base", out_dir=tmp_path / "base", upstream=[tmp_path / "world"]):
            pass
        record_stage_runs(parent, {"world": read_run_id(tmp_path / "world"), "ingest": None}, cfg)
    assert PARENT_RUN_ENV not in os.environ and FLOW_RUN_ENV not in os.environ
    world, base = client.get_run(read_run_id(tmp_path / "world")), client.get_run(read_run_id(tmp_path / "base"))
    for child in (world, base):
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.tags["prefect.flow_run_id"] == "flow-123"
    assert base.data.tags["prefalign.upstream_run"] == world.info.run_id
    assert world.data.tags["prefalign.upstream_run"] == ""
    assert "mlflow.data.context" not in str(world.inputs.dataset_inputs)  # not a training stage
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.info.run_name == "pipeline"
    assert parent_run.data.tags["prefalign.stage_run.world"] == world.info.run_id
    assert "prefalign.stage_run.ingest" not in parent_run.data.tags
    assert json.loads((tmp_path / "world" / "run.json").read_text())["parent_run_id"] == parent


def test_failed_stage_ends_failed_and_writes_no_run_json(cfg, client, tmp_path):
    with (
        pytest.raises(ZeroDivisionError),
        pipeline_run(cfg) as parent,
        stage_run(cfg, "featurize", out_dir=tmp_path / "features") as tracker,
    ):
        run_id = tracker.run_id
        raise ZeroDivisionError("a stage that fails")
    assert not (tmp_path / "features" / "run.json").exists()
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"


def test_long_param_values_are_truncated(cfg, client, tmp_path):
    with stage_run(cfg, "evaluate", out_dir=None) as tracker:
        tracker.log_params({"notes.long": "x" * 7000})
    value = client.get_run(tracker.run_id).data.params["notes.long"]
    assert len(value) == 6000 and value.endswith("...")


def test_disabled_tracking_uses_null_tracker(tmp_path):
    cfg = PipelineConfig.model_validate({"paths": {"root": str(tmp_path)}, "tracking": {"enabled": False}})
    with pipeline_run(cfg) as parent, stage_run(cfg, "train_dpo", out_dir=tmp_path / "dpo") as tracker:
        assert parent is None
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        tracker.log_metrics({"loss": 1.0})
        tracker.log_dataset(name="preferences", digest="x", source="y")
    assert json.loads((tmp_path / "dpo" / "run.json").read_text())["run_id"] is None
    assert read_run_id(tmp_path / "dpo") is None
    assert not (tmp_path / "mlruns").exists()


def test_flatten_config_uses_dotted_keys(cfg):
    flat = flatten_config(cfg)
    assert flat["dpo.lora.rank"] == cfg.dpo.lora.rank
    assert flat["tracking.experiment"] == "prefalign"
    assert not any(isinstance(v, dict) for v in flat.values())
