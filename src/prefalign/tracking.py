"""Experiment tracking: the ``Tracker`` the stages log through, and the MLflow runs behind it.

Stages never touch MLflow; they get a ``Tracker`` from ``stage_run``. With ``tracking.enabled: false``
that is a ``NullTracker`` and MLflow is never imported. Otherwise every stage gets its own MLflow run,
a child of the pipeline run when the flow opened one (``pipeline_run`` hands its id to stage processes
through ``PREFALIGN_PARENT_RUN_ID``), carrying the lineage tags of docs/design.md ("MLflow").

``<out_dir>/run.json`` records which run produced a folder, so a later stage (its
``prefalign.upstream_run`` tag) or a pipeline run in which DVC skipped the stage still finds it.

mlflow is imported inside functions only: importing this module costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prefalign.config import PipelineConfig
from prefalign.versioning import data_version, git_commit, machine_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "PREFALIGN_PARENT_RUN_ID"
FLOW_RUN_ENV = "PREFALIGN_FLOW_RUN_ID"
RUN_FILE = "run.json"
# Stages whose MLflow run records the preference dataset as an input (mlflow.log_input).
TRAINING_STAGES = frozenset({"train_reward", "train_dpo", "train_dro"})
# MLflow's batch limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per request.
_PARAM_BATCH, _METRIC_BATCH = 100, 1000


class Tracker(Protocol):
    """What a stage may record about its run."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_dataset(self, *, name: str, digest: str, source: str, context: str = "training") -> None: ...


class NullTracker:
    """Records nothing: tracking disabled, unit tests."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Ignore ``params``."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Ignore ``metrics``."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Ignore ``path``."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Ignore ``tags``."""

    def log_dataset(self, *, name: str, digest: str, source: str, context: str = "training") -> None:
        """Ignore the dataset."""


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _param_value(value: Any) -> str:
    """Params are strings in MLflow; lists as JSON, and cut to MLflow's length cap (6000 characters)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


class MlflowTracker:
    """A ``Tracker`` writing to one MLflow run by id through ``MlflowClient``.

    Going through the client (not the fluent ``mlflow.log_*``) means it works from any thread or process
    that knows the run id, whether or not that run is the fluent "active run" there.
    """

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.run_id: str | None = run_id  # the Tracker protocol's type; always set here
        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (stringified, truncated to MLflow's cap); a key can only be logged once per run."""
        from mlflow.entities import Param

        entries = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for batch in _chunks(entries, _PARAM_BATCH):
            self._client.log_batch(self._run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (0 when None), all with one timestamp."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        for batch in _chunks(entries, _METRIC_BATCH):
            self._client.log_batch(self._run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts, under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values stringified)."""
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for batch in _chunks(entries, _PARAM_BATCH):
            self._client.log_batch(self._run_id, tags=batch)

    def log_dataset(self, *, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record a dataset input: ``digest`` is the DVC md5, ``source`` the remote URL or local path."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():
            # A local path matches two equivalent local source types; MLflow warns and picks one. Harmless.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = MetaDataset(source=resolve_dataset_source(source), name=name, digest=digest)  # type: ignore[abstract]  # concrete at run time
        # Dataset -> entity is what mlflow.log_input does internally; the client API takes entities only.
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._client.log_inputs(self._run_id, datasets=[entity])


# ----------------------------------------------------------------------------------------- configuration
def tracking_uri(cfg: PipelineConfig) -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking.uri``.

    A relative sqlite path in the config lives under ``cfg.paths.root`` (``sqlite:////abs/path.db``), so
    every process of one pipeline, whatever its working directory, writes the same database.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env or cfg.tracking.uri
    prefix = "sqlite:///"
    if not env and uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((Path(cfg.paths.root) / uri[len(prefix) :]).resolve())
    return uri


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _experiment_id(client: MlflowClient, cfg: PipelineConfig, uri: str) -> str:
    """The experiment's id, creating it (artifacts under root) or restoring it when deleted."""
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if _is_local(uri):  # a tracking server keeps its own artifact store; a local one uses the repo's
            folder = (Path(cfg.paths.root) / cfg.tracking.artifact_root).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another stage process created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _setup(cfg: PipelineConfig) -> tuple[str, MlflowClient, str]:
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI into os.environ. Undo that: the variable must keep
    # meaning "the user chose a store" (it wins over the config), not "an earlier config in this process".
    user_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_choice is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = mlflow.MlflowClient(uri)
    return uri, client, _experiment_id(client, cfg, uri)


def configure_mlflow(cfg: PipelineConfig) -> str:
    """Point this process's MLflow at the pipeline's store and make sure the experiment exists.

    Returns:
        The tracking URI (see ``tracking_uri``); the sqlite folder and artifact root are created.
    """
    return _setup(cfg)[0]


def flatten_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as dotted keys (``dpo.lora.rank``) -> values: the params of every run."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", cfg.model_dump(mode="json"))
    return flat


# ------------------------------------------------------------------------------------------- run.json
def read_run_id(out_dir: Path) -> str | None:
    """The MLflow run id recorded in ``<out_dir>/run.json``; None when absent, unreadable or untracked."""
    path = Path(out_dir) / RUN_FILE
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(run_id) if run_id else None


def _write_run_file(out_dir: Path | None, record: dict[str, Any]) -> None:
    if out_dir is None:
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _lineage_tags(cfg: PipelineConfig, stage: str, md5: str, upstream: Sequence[Path]) -> dict[str, str]:
    upstream_ids = [run_id for run_id in (read_run_id(p) for p in upstream) if run_id]
    tags = {
        "prefalign.stage": stage,
        "prefalign.git_commit": git_commit(Path(cfg.paths.root)),
        "prefalign.params_sha": cfg.section_sha(),
        "prefalign.data_version": md5,
        "prefalign.upstream_run": ",".join(upstream_ids),
    }
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return {**tags, **machine_tags()}


# ------------------------------------------------------------------------------------------ stage runs
@contextmanager
def stage_run(
    cfg: PipelineConfig, stage: str, *, out_dir: Path | None, upstream: Sequence[Path] = ()
) -> Iterator[Tracker]:
    """One MLflow run for one stage; yields its ``Tracker`` and writes ``<out_dir>/run.json`` on success.

    The run is named after the stage, is a child of ``$PREFALIGN_PARENT_RUN_ID`` when set, carries the
    lineage tags and the flattened config as params, and (training stages) the preference dataset as an
    input. An exception ends the run FAILED and propagates; no run.json is written then.

    Args:
        cfg: the pipeline config (tracking section, paths, params).
        stage: stage name, as in dvc.yaml.
        out_dir: the stage's output folder for run.json (None: write none).
        upstream: output folders this stage consumed; their run.json ids become ``prefalign.upstream_run``.
    """
    if not cfg.tracking.enabled:
        yield NullTracker()
        _write_run_file(
            out_dir,
            {"run_id": None, "stage": stage, "experiment_id": None, "tracking_uri": None, "parent_run_id": None},
        )
        return

    import mlflow

    uri, _, experiment_id = _setup(cfg)
    version = data_version(Path(cfg.paths.root), cfg.paths.preferences)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    # The fluent run stack is thread-local; nest only when this thread already has an active run (which
    # must then be the parent: mlflow refuses a parent_run_id different from the active run).
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=parent,
        nested=nested,
        tags=_lineage_tags(cfg, stage, version.md5, upstream),
    ) as run:
        tracker = MlflowTracker(run.info.run_id, uri)
        tracker.log_params(flatten_config(cfg))
        if stage in TRAINING_STAGES:
            source = version.remote_url or str(cfg.paths.resolve("preferences"))
            tracker.log_dataset(name="preferences", digest=version.md5, source=source)
        yield tracker
        _write_run_file(
            out_dir,
            {
                "run_id": run.info.run_id,
                "stage": stage,
                "experiment_id": experiment_id,
                "tracking_uri": uri,
                "parent_run_id": parent,
            },
        )


# ---------------------------------------------------------------------------------------- pipeline run
@contextmanager
def pipeline_run(
    cfg: PipelineConfig, *, flow_run_id: str | None = None, name: str = "pipeline"
) -> Iterator[str | None]:
    """The parent MLflow run of one pipeline run; yields its id (None with tracking disabled).

    For its duration ``PREFALIGN_PARENT_RUN_ID`` (and ``PREFALIGN_FLOW_RUN_ID``) are set in
    ``os.environ``, so stage runs in this process and in ``dvc repro`` subprocesses become its children;
    the previous values are restored afterwards. The run is created through the client, not as a fluent
    active run, so stage runs in any thread can start under it. It ends FAILED when the body raises.
    """
    if not cfg.tracking.enabled:
        yield None
        return

    uri, client, experiment_id = _setup(cfg)
    tags = {
        "prefalign.stage": "pipeline",
        "prefalign.git_commit": git_commit(Path(cfg.paths.root)),
        "prefalign.params_sha": cfg.section_sha(),
        "prefalign.data_version": data_version(Path(cfg.paths.root), cfg.paths.preferences).md5,
    }
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if os.environ.get(PARENT_RUN_ENV):  # a pipeline inside a pipeline nests like a stage
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    MlflowTracker(run_id, uri).log_params(flatten_config(cfg))
    saved = {key: os.environ.get(key) for key in (PARENT_RUN_ENV, FLOW_RUN_ENV)}
    os.environ[PARENT_RUN_ENV] = run_id
    if flow_run_id:
        os.environ[FLOW_RUN_ENV] = flow_run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        client.set_terminated(run_id, status)


def record_stage_runs(parent_run_id: str, runs: Mapping[str, str | None], cfg: PipelineConfig | None = None) -> None:
    """Tag the parent run with ``prefalign.stage_run.<stage> = <run id>`` for every stage with a run.

    This is how a pipeline run points at runs it reused (DVC skipped the stage, its run.json is older).

    Args:
        parent_run_id: the pipeline run.
        runs: stage -> run id (None entries, from untracked stages, are skipped).
        cfg: when given, MLflow is first pointed at its store (else the process's current tracking URI).
    """
    import mlflow

    uri = configure_mlflow(cfg) if cfg is not None else mlflow.get_tracking_uri()
    MlflowTracker(parent_run_id, uri).set_tags(
        {f"prefalign.stage_run.{stage}": run_id for stage, run_id in runs.items() if run_id}
    )
