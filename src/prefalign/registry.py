"""The MLflow model registry: register candidates, promote a champion, roll back, trace lineage.

- ``prefalign-policy`` versions are MLflow pyfuncs (``prefalign/policy_model.py``, "models from code")
  whose artifacts are the base pipeline folder and the policy folder; ``mlflow.pyfunc.load_model(
  "models:/prefalign-policy@champion")`` gives prompts -> base64 PNGs in any process with prefalign.
- ``prefalign-reward`` versions are MLflow 3 LoggedModels holding the reward folder as saved by
  ``RewardScorer.save``; ``fetch_model_folder`` downloads one for ``RewardScorer.load``.
- Registration is keyed by ``weights_sha`` (content hash of the ``*.safetensors`` files): re-running an
  unchanged pipeline returns the existing version and registers nothing (docs/design.md, "MLflow").
- Promotion moves the ``champion`` alias only to a strictly better candidate; MLflow keeps no alias
  history, so the old champion is written into the new one's ``previous_champion`` tag first.

mlflow is imported inside functions only.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.config import PipelineConfig
from prefalign.tracking import configure_mlflow
from prefalign.versioning import data_version, files_sha256, git_commit

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

POLICY_CODE = Path(__file__).with_name("policy_model.py")
METRIC_TAG = "metric."  # version tag prefix: metric.oracle_mean = "0.71"
# What the policy pyfunc needs at load time besides prefalign itself: prefalign is on no public index, so
# an image that serves the model (`mlflow models serve`, a container) must install it next to these.
_RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "peft", "accelerate", "pillow", "numpy")


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version, as the flow passes it between tasks (JSON-able through ``as_dict``)."""

    name: str
    version: str
    created: bool
    weights_sha: str
    run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and Prefect artifacts."""
        return asdict(self)


def weights_sha(folder: Path) -> str:
    """sha256 over the sorted relative paths and bytes of every ``*.safetensors`` file under ``folder``.

    Only weights count: logs, figures and run.json differ between two runs that trained the same weights.

    Raises:
        FileNotFoundError: the folder holds no ``*.safetensors`` file (an empty hash would match anything).
    """
    folder = Path(folder)
    files = list(folder.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files to hash")
    return files_sha256(folder, files)


# ----------------------------------------------------------------------------------------------- helpers
def _client(cfg: PipelineConfig) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(configure_mlflow(cfg))


def _experiment_id(client: MlflowClient, cfg: PipelineConfig) -> str:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {cfg.tracking.experiment!r} on the tracking server")
    return experiment.experiment_id


def _info(mv: ModelVersion, created: bool) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        created=created,
        weights_sha=mv.tags.get("weights_sha", ""),
        run_id=mv.run_id,
    )


def _find_by_sha(client: MlflowClient, name: str, sha: str) -> ModelVersion | None:
    """The oldest version of ``name`` tagged with ``weights_sha == sha``, if any."""
    found = client.search_model_versions(f"name = '{name}' and tags.weights_sha = '{sha}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _version_tags(
    cfg: PipelineConfig, sha: str, run_id: str | None, metrics: Mapping[str, float], extra: Mapping[str, str]
) -> dict[str, str]:
    root = Path(cfg.paths.root)
    tags = {
        "weights_sha": sha,
        "data_version": data_version(root, cfg.paths.preferences).md5,
        "git_commit": git_commit(root),
        "training_run_id": run_id or "",
        **{f"{METRIC_TAG}{key}": repr(float(value)) for key, value in metrics.items()},
        **extra,
    }
    return {key: str(value) for key, value in tags.items()}


def _source_run(client: MlflowClient, cfg: PipelineConfig, run_id: str | None, what: str) -> str:
    """The training run to attach a model to; without one (tracking was off), a registration run.

    A model always gets a run so that it lands in the pipeline's experiment and artifact root, never in
    MLflow's default experiment under the working directory.
    """
    if run_id:
        return run_id
    run = client.create_run(
        _experiment_id(client, cfg), run_name=f"register_{what}", tags={"prefalign.stage": f"register_{what}"}
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _pip_requirements() -> list[str]:
    pins = []
    for package in _RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


# ---------------------------------------------------------------------------------------------- register
def register_policy(
    cfg: PipelineConfig,
    *,
    method: str,
    policy_dir: Path,
    base_dir: Path,
    run_id: str | None,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
) -> ModelVersionInfo:
    """Register a trained policy as a version of ``cfg.registry.policy_name`` unless its weights are.

    Args:
        cfg: config (tracking store, registry names, paths for the lineage tags).
        method: ``dpo`` or ``dro`` (version tag ``method``).
        policy_dir: the policy folder (LoRA file or ``unet/``), bundled as artifact ``policy``.
        base_dir: the base pipeline folder, bundled as artifact ``base``.
        run_id: the training run; the model is logged under it (None: a registration run is made).
        metrics: evaluation metrics, stored as ``metric.<key>`` version tags (promotion reads them).
        tags: extra version tags.

    Returns:
        The version; ``created`` is False when a version with the same ``weights_sha`` already existed.
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model, infer_signature

    from prefalign.policy_model import DEFAULT_PARAMS  # imported by MLflow anyway when it logs the file

    name = cfg.registry.policy_name
    sha = weights_sha(policy_dir)
    client = _client(cfg)
    if (existing := _find_by_sha(client, name, sha)) is not None:
        log.info("%s: weights %s already registered as version %s", name, sha[:12], existing.version)
        return _info(existing, created=False)
    source_run = _source_run(client, cfg, run_id, method)
    with warnings.catch_warnings():
        # No input example on purpose (next comment). MLflow's other warning here, "Add type hints to the
        # `predict` method", cannot be filtered from outside (MLflow resets the filter); see policy_model.py.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        # Explicit signature (no input example): an example would make MLflow load the whole pipeline at
        # log time, and params must be declared in the signature or pyfunc drops them at predict time.
        signature = infer_signature(["a prompt"], ["<base64 png>"], params=DEFAULT_PARAMS)
        # The LoggedModel is created here, in the pipeline's experiment: left to itself, Model.log would put
        # it in the *default* experiment ("0", artifacts under ./mlruns of the working directory) whenever
        # no fluent run is active. Model.log (not pyfunc.log_model) takes run_id and model_id, so the
        # finished training run is linked without being resumed.
        logged = client.create_logged_model(
            _experiment_id(client, cfg),
            name="policy",
            source_run_id=source_run,
            tags={"method": method, "weights_sha": sha},
        )
        info = Model.log(
            artifact_path=None,
            name="policy",
            flavor=mlflow.pyfunc,
            run_id=source_run,
            model_id=logged.model_id,
            python_model=str(POLICY_CODE),
            artifacts={"base": str(base_dir), "policy": str(policy_dir)},
            signature=signature,
            pip_requirements=_pip_requirements(),
        )
    version_tags = _version_tags(cfg, sha, run_id, metrics, {"method": method, **(tags or {})})
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    log.info("%s: registered %s as version %s (weights %s)", name, method, mv.version, sha[:12])
    return _info(client.get_model_version(name, mv.version), created=True)


def register_reward(
    cfg: PipelineConfig, *, model_dir: Path, run_id: str | None, metrics: Mapping[str, float]
) -> ModelVersionInfo:
    """Register the reward model folder as a version of ``cfg.registry.reward_name`` unless its weights are.

    The folder is stored as an MLflow 3 LoggedModel (no flavor: it is a stock CLIP folder, read by
    ``RewardScorer.load``); ``fetch_model_folder`` brings a version back.
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus

    name = cfg.registry.reward_name
    sha = weights_sha(model_dir)
    client = _client(cfg)
    if (existing := _find_by_sha(client, name, sha)) is not None:
        return _info(existing, created=False)
    source_run = _source_run(client, cfg, run_id, "reward")
    model = client.create_logged_model(
        _experiment_id(client, cfg), name="reward", source_run_id=source_run, tags={"weights_sha": sha}
    )
    client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    mv = mlflow.register_model(
        f"models:/{model.model_id}", name, tags=_version_tags(cfg, sha, run_id, metrics, {"kind": "reward"})
    )
    log.info("%s: registered version %s (weights %s)", name, mv.version, sha[:12])
    return _info(client.get_model_version(name, mv.version), created=True)


def reward_tags(cfg: PipelineConfig, model_dir: Path) -> dict[str, str]:
    """Run tags naming the reward model a stage used: its weights sha, and its registered version if any.

    A stage that scores with the reward model (DRO's expert selection, evaluation) records these, so a
    policy's lineage names the exact reward version; under plain ``dvc repro`` (no flow, nothing
    registered) the sha alone still identifies the weights.
    """
    sha = weights_sha(model_dir)
    tags = {"prefalign.reward_weights_sha": sha}
    if cfg.tracking.enabled:
        try:
            mv = _find_by_sha(_client(cfg), cfg.registry.reward_name, sha)
        except Exception as err:  # noqa: BLE001 - a registry outage must not stop training; the sha is enough
            log.warning("could not look up the reward version of %s: %s", sha[:12], err)
            mv = None
        if mv is not None:
            tags["prefalign.reward_version"] = f"{mv.name}/{mv.version}"
    return tags


def fetch_model_folder(ref: str, cfg: PipelineConfig, dst: Path) -> Path:
    """Download a registered version's files (``name@alias`` or ``name/version``) into ``dst``."""
    import mlflow.artifacts

    mv = _resolve(_client(cfg), ref)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(dst)))


# ----------------------------------------------------------------------------------------------- promote
def _resolve(client: MlflowClient, ref: str) -> ModelVersion:
    """``name@alias``, ``name/version`` (optionally prefixed ``models:/``) -> the model version."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, sep, version = ref.rpartition("/")
    if not sep or not version.isdigit():
        raise ValueError(f"model reference {ref!r} is neither name@alias nor name/version")
    return client.get_model_version(name, version)


def _current(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or no such model) yet
        return None


def _ref(mv: ModelVersion | None) -> dict[str, str] | None:
    return None if mv is None else {"name": mv.name, "version": str(mv.version), "method": mv.tags.get("method", "")}


def _rank(
    cfg: PipelineConfig, candidates: Mapping[str, ModelVersionInfo], report: Mapping[str, Any], metric: str
) -> list[dict[str, Any]]:
    """One row per candidate with its score and whether it qualifies, best qualifying first."""
    rows = []
    for method, info in candidates.items():
        score = float(report["models"][method][f"{metric}_mean"])
        ci_low = float(report["win_rates"][f"{method}_vs_base"][metric]["ci_low"])
        qualifies = ci_low > 0.5 or not cfg.registry.require_beats_base
        rows.append(
            {
                "method": method,
                "name": info.name,
                "version": info.version,
                "score": score,
                "ci_low_vs_base": ci_low,
                "qualifies": qualifies,
            }
        )
    return sorted(rows, key=lambda r: (not r["qualifies"], -r["score"]))


def _decide(best: dict[str, Any] | None, champion: ModelVersion | None, metric: str) -> tuple[bool, str]:
    if best is None:
        return False, f"no candidate beats base on {metric} (win-rate ci_low > 0.5)"
    if champion is None:
        return True, f"{best['method']} v{best['version']} is the first champion ({metric}_mean {best['score']:.4f})"
    if str(champion.version) == best["version"]:
        return False, f"{best['method']} v{best['version']} is already champion"
    recorded = champion.tags.get(f"{METRIC_TAG}{metric}_mean")
    if recorded is None:
        return False, f"champion v{champion.version} has no recorded {metric}_mean; not replaced automatically"
    if best["score"] > float(recorded):
        return (
            True,
            (
                f"{best['method']} v{best['version']} {metric}_mean {best['score']:.4f} > champion "
                f"v{champion.version} {float(recorded):.4f}"
            ),
        )
    return (
        False,
        (
            f"{best['method']} v{best['version']} {metric}_mean {best['score']:.4f} does not beat champion "
            f"v{champion.version} {float(recorded):.4f}"
        ),
    )


def promote(
    cfg: PipelineConfig, candidates: Mapping[str, ModelVersionInfo], eval_report: Mapping[str, Any]
) -> dict[str, Any]:
    """Move ``champion`` to the best qualifying candidate if it beats the current champion.

    Candidates are ranked by ``eval_report["models"][method]["<judge>_mean"]`` (``judge``: the deciding judge). With
    ``registry.require_beats_base`` only those whose win rate against the base has ``ci_low > 0.5``
    qualify. The alias moves only when the best one is strictly better than the champion's recorded
    ``metric.<metric>_mean`` tag (or there is no champion); the replaced champion is first written into
    the new one's ``previous_champion`` tag. ``challenger`` goes to the best qualifying candidate that is
    not champion afterwards.

    Returns:
        ``{"promoted", "champion", "previous_champion", "challenger", "reason", "metric", "candidates"}``
        (JSON-able; ``champion`` is the champion after the decision).
    """
    client = _client(cfg)
    name, alias = cfg.registry.policy_name, cfg.registry.champion_alias
    metric = eval_report["judge"]
    rows = _rank(cfg, candidates, eval_report, metric)
    qualifying = [r for r in rows if r["qualifies"]]
    champion = _current(client, name, alias)
    promoted, reason = _decide(qualifying[0] if qualifying else None, champion, metric)
    previous = None
    if promoted:
        new = qualifying[0]["version"]
        if champion is not None:
            client.set_model_version_tag(name, new, "previous_champion", str(champion.version))
            previous = _ref(champion)
        client.set_model_version_tag(name, new, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        client.set_registered_model_alias(name, alias, new)
        champion = client.get_model_version(name, new)
    others = [r for r in qualifying if champion is None or r["version"] != str(champion.version)]
    challenger = None
    if others:
        client.set_registered_model_alias(name, "challenger", others[0]["version"])
        challenger = _ref(client.get_model_version(name, others[0]["version"]))
    log.info("promotion: %s", reason)
    return {
        "promoted": promoted,
        "champion": _ref(champion),
        "previous_champion": previous,
        "challenger": challenger,
        "reason": reason,
        "metric": metric,
        "candidates": rows,
    }


def rollback(cfg: PipelineConfig) -> dict[str, Any]:
    """Point ``champion`` back at the version named in the current champion's ``previous_champion`` tag.

    Raises:
        ValueError: there is no champion, or it records no previous one.
    """
    client = _client(cfg)
    name, alias = cfg.registry.policy_name, cfg.registry.champion_alias
    champion = _current(client, name, alias)
    if champion is None or not champion.tags.get("previous_champion"):
        raise ValueError(f"{name}@{alias}: nothing to roll back to")
    back = champion.tags["previous_champion"]
    client.set_registered_model_alias(name, alias, back)
    return {"champion": _ref(client.get_model_version(name, back)), "replaced": _ref(champion)}


# ----------------------------------------------------------------------------------------------- lineage
def _walk_runs(
    client: MlflowClient, run_id: str, depth: int, seen: set[str], lines: list[str], found: dict[str, list[Any]]
) -> None:
    """Depth-first over ``prefalign.upstream_run``; one indented line per run, each run once."""
    from mlflow.exceptions import MlflowException

    seen.add(run_id)
    pad = "  " * (depth + 1)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        lines.append(f"{pad}run {run_id}: not found in this tracking store")
        return
    tags = run.data.tags
    stage = tags.get("prefalign.stage", "?")
    found.setdefault(stage, []).append(run)
    lines.append(
        f"{pad}{'training' if depth == 0 else 'upstream'} run {run_id} [{stage}] {run.info.status}: "
        f"git {tags.get('prefalign.git_commit', '?')}, params {tags.get('prefalign.params_sha', '?')}, "
        f"data {tags.get('prefalign.data_version', '?')}"
    )
    for upstream in filter(None, tags.get("prefalign.upstream_run", "").split(",")):
        if upstream not in seen:
            _walk_runs(client, upstream, depth + 1, seen, lines, found)


def _validation_run(client: MlflowClient, training: Any, md5: str) -> Any | None:
    """The validate run of the same pipeline run, else the latest one on the same data version."""
    filters = []
    if parent := training.data.tags.get("mlflow.parentRunId"):
        filters.append(f"tags.`mlflow.parentRunId` = '{parent}'")
    filters.append(f"tags.`prefalign.data_version` = '{md5}'")
    for extra in filters:
        runs = client.search_runs(
            [training.info.experiment_id],
            f"tags.`prefalign.stage` = 'validate' and {extra}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if runs:
            return runs[0]
    return None


def _reward_line(client: MlflowClient, cfg: PipelineConfig, training: Any, found: Mapping[str, list[Any]]) -> str:
    if ref := training.data.tags.get("prefalign.reward_version"):
        return f"reward model {ref} (training run tag)"
    for run in found.get("train_reward", []):
        query = f"name = '{cfg.registry.reward_name}' and run_id = '{run.info.run_id}'"
        versions = client.search_model_versions(query)
        if versions:
            mv = min(versions, key=lambda v: int(v.version))
            return f"reward model {mv.name} v{mv.version} (run {run.info.run_id})"
        return f"reward model: run {run.info.run_id} (not registered)"
    return "reward model: none upstream"


def lineage(ref: str, cfg: PipelineConfig) -> list[str]:
    """The chain from a registered version back to its data, one line per link.

    policy version -> training run (+ tags) -> upstream runs (``prefalign.upstream_run``, recursively)
    -> reward model version -> data version -> validation report.

    Args:
        ref: ``prefalign-policy@champion`` or ``prefalign-policy/3`` (``models:/`` prefix allowed).
        cfg: config (tracking store and registry names).
    """
    client = _client(cfg)
    mv = _resolve(client, ref)
    tags = mv.tags
    lines = [
        (
            f"model {mv.name} v{mv.version} aliases={list(mv.aliases)} method={tags.get('method', '?')} "
            f"weights_sha={tags.get('weights_sha', '?')[:16]} source={mv.source}"
        )
    ]
    run_id = tags.get("training_run_id") or mv.run_id
    if not run_id:
        return [*lines, "  training run: none recorded"]
    found: dict[str, list[Any]] = {}
    _walk_runs(client, run_id, 0, set(), lines, found)
    training = next((r for runs in found.values() for r in runs if r.info.run_id == run_id), None)
    if training is None:
        return lines
    md5 = tags.get("data_version") or training.data.tags.get("prefalign.data_version", "?")
    lines.append(_reward_line(client, cfg, training, found))
    commit = tags.get("git_commit") or training.data.tags.get("prefalign.git_commit")
    lines.append(f"data version {md5} (git {commit})")
    validation = _validation_run(client, training, md5)
    lines.append(
        f"validation report {validation.info.artifact_uri}/validation.json (run {validation.info.run_id})"
        if validation
        else "validation report: no validate run found"
    )
    return lines
