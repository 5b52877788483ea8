"""The MLflow model registry: register candidates, promote a champion, roll back, trace lineage.

- ``prefalign-policy`` versions are MLflow pyfuncs (``prefalign/policy_model.py``, "models from code")
  whose artifacts are the base pipeline folder and the policy folder; ``mlflow.pyfunc.load_model(
  "models:/prefalign-policy@champion")`` gives prompts -> base64 PNGs in any process with prefalign.
- ``prefalign-reward`` versions are MLflow 3 LoggedModels holding the reward folder as saved by
  ``RewardScorer.save``; ``fetch_model_folder`` downloads one for ``RewardScorer.load``.
- Registration is keyed by ``weights_sha`` (content hash of the ``*.safetensors`` files): re-running an
  unchanged pipeline returns the existing version and registers nothing (docs/design.md, "MLflow").
- Promotion moves the ``champion`` alias only to a strictly better candidate; MLflow keeps no alias
  history, so the old champion is written into the new one's ``previous_champion`` tag first, and every
  move (promotion or rollback) is recorded on the version it made champion, as one JSON tag
  ``champion_move.<n>`` (``n`` counts the moves of the registered model); ``history`` reads them back.
- ``check_candidates`` validates the candidate folders and ``eval.json`` before anything is written, so a
  bad input leaves the registry as it was; every error a person can cause is a one-line ``RegistryError``.

mlflow is imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.config import PipelineConfig
from prefalign.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, configure_mlflow
from prefalign.versioning import data_version, files_sha256, git_commit

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

POLICY_CODE = Path(__file__).with_name("policy_model.py")
METRIC_TAG = "metric."  # version tag prefix: metric.oracle_mean = "0.71"
MOVE_TAG = "champion_move."  # version tag prefix: champion_move.3 = one JSON record of the registry's 3rd move
POLICY_METHODS = ("dpo", "dro")
# What the policy pyfunc needs at load time besides prefalign itself: prefalign is on no public index, so
# an image that serves the model (`mlflow models serve`, a container) must install it next to these.
_RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "peft", "accelerate", "pillow", "numpy")


class RegistryError(ValueError):
    """A bad input or a registry state a person can fix; the message is one line naming the thing."""


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


# ---------------------------------------------------------------------------------------------- validate
def _tensor_shapes(folder: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the headers of every ``*.safetensors`` file in ``folder`` (no weights read).

    Opening a file checks its header and that its size matches the header, so a truncated copy fails here.
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RegistryError(f"{what}: no *.safetensors file in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise RegistryError(f"{path}: not a readable safetensors file ({err})") from None
    return shapes


def _check_full_unet(method: str, unet_dir: Path, base: Mapping[str, tuple[int, ...]]) -> None:
    config = unet_dir / "config.json"
    try:
        loaded = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{config}: not a readable JSON UNet config ({err})") from None
    if not isinstance(loaded, dict) or loaded.get("_class_name") != "UNet2DConditionModel":
        raise RegistryError(f"{config}: _class_name is not UNet2DConditionModel")
    shapes = _tensor_shapes(unet_dir, f"{method} candidate {unet_dir}")
    if missing := sorted(set(base) - set(shapes)):
        raise RegistryError(f"{unet_dir}: {len(missing)} tensor(s) of the base UNet missing, e.g. {missing[0]}")
    if extra := sorted(set(shapes) - set(base)):
        raise RegistryError(f"{unet_dir}: {len(extra)} tensor(s) the base UNet does not have, e.g. {extra[0]}")
    for key, shape in shapes.items():
        if shape != base[key]:
            raise RegistryError(f"{unet_dir}: tensor {key} has shape {list(shape)}, the base UNet {list(base[key])}")


def _check_lora(lora_file: Path, base: Mapping[str, tuple[int, ...]]) -> None:
    """Every key adapts a layer of the base UNet, with its input (lora_A) and output (lora_B) sizes.

    The keys are those ``save_lora`` writes and ``load_lora_weights`` reads: ``unet.<module>.lora_A.weight``
    / ``lora_B``, a conv layer's as ``[r, in, k, k]`` / ``[out, r, 1, 1]``, a linear one's as ``[r, in]`` /
    ``[out, r]``, so dimension 1 of A and dimension 0 of B are those of the base weight.
    """
    shapes = _tensor_shapes(lora_file.parent, f"LoRA {lora_file}")
    for key, shape in shapes.items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        if not key.startswith("unet.") or kind not in ("A.weight", "B.weight"):
            raise RegistryError(f"{lora_file}: key {key} is not unet.<module>.lora_A/B.weight")
        target = base.get(f"{module}.weight")
        if target is None:
            raise RegistryError(f"{lora_file}: key {key} adapts {module}, which the base UNet does not have")
        axis = 1 if kind == "A.weight" else 0
        if len(shape) <= axis or len(target) <= axis or shape[axis] != target[axis]:
            raise RegistryError(
                f"{lora_file}: key {key} has shape {list(shape)}, which does not fit {module} {list(target)}"
            )


def check_policy_folder(method: str, folder: Path, base_dir: Path) -> str:
    """Check that ``folder`` is a policy the base pipeline can load, from file headers only.

    The same two forms ``load_policy_pipeline`` reads, in its order: a full ``unet/`` folder (a
    ``UNet2DConditionModel`` config, and exactly the base UNet's tensor names and shapes) or a diffusers
    LoRA file (each key adapts a layer the base UNet has, with its sizes). No weights are loaded, so the
    check costs the same for SD1.5 as for the demo.

    Returns:
        ``"unet"`` or ``"lora"``.

    Raises:
        RegistryError: naming the folder or file and what is wrong with it.
    """
    from prefalign.models.diffusion import LORA_FILE, check_pipeline_folder

    folder, base_dir = Path(folder), Path(base_dir)
    if not folder.is_dir():
        raise RegistryError(f"{method} candidate {folder}: folder not found (run the train_{method} stage first)")
    try:
        check_pipeline_folder(base_dir)
    except ValueError as err:
        raise RegistryError(str(err)) from None
    base = _tensor_shapes(base_dir / "unet", f"base model {base_dir}")
    if (folder / "unet").is_dir():
        _check_full_unet(method, folder / "unet", base)
        return "unet"
    if (folder / LORA_FILE).is_file():
        _check_lora(folder / LORA_FILE, base)
        return "lora"
    raise RegistryError(f"{method} candidate {folder}: neither a unet/ folder nor {LORA_FILE}")


def _number(report: Mapping[str, Any], keys: Sequence[str], path: Path) -> float:
    node: Any = report
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            raise RegistryError(f"{path}: key {'.'.join(keys[: depth + 1])} is missing")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        raise RegistryError(f"{path}: key {'.'.join(keys)} is {node!r}, not a finite number")
    return float(node)


def load_eval_report(path: Path, methods: Sequence[str] = POLICY_METHODS) -> dict[str, Any]:
    """``reports/eval.json`` with every key ``promote`` reads present and numeric for each method.

    Those keys: ``judge``; ``models.<method>.<judge>_mean``; ``win_rates.<method>_vs_base.<judge>.ci_low``.

    Raises:
        RegistryError: the file is missing, not JSON, or a key is missing or not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: evaluation report not found (run the evaluate stage first)")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(report, dict):
        raise RegistryError(f"{path}: top level is not a JSON object")
    judge = report.get("judge")
    if not isinstance(judge, str) or not judge:
        raise RegistryError(f"{path}: key judge is missing or not a judge name")
    for method in methods:
        _number(report, ("models", method, f"{judge}_mean"), path)
        _number(report, ("win_rates", f"{method}_vs_base", judge, "ci_low"), path)
    return report


def check_candidates(cfg: PipelineConfig, methods: Sequence[str] = POLICY_METHODS) -> dict[str, Any]:
    """Validate everything promotion reads before its first registry write; returns the eval report.

    Checks the evaluation report, the base pipeline folder and each candidate's policy folder, so that a
    failure leaves the registry exactly as it was (nothing registered for one method but not the other).

    Raises:
        RegistryError: the first bad input, named.
    """
    report = load_eval_report(cfg.paths.resolve("reports") / "eval.json", methods)
    for method in methods:
        check_policy_folder(method, cfg.paths.resolve(method), cfg.base_model_dir())
    return report


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
def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``[models:/]name@alias`` or ``[models:/]name/version`` -> (name, alias, version), one of them None."""
    body = ref.strip().removeprefix("models:/")
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "@" not in alias and "/" not in alias:
            return name, alias, None
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, None, str(int(version))
    raise RegistryError(
        f"model reference {ref!r} is neither NAME@ALIAS nor NAME/VERSION (e.g. prefalign-policy@champion)"
    )


def _registered_model(client: MlflowClient, name: str, ref: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model reference {ref!r}: no registered model {name!r}") from None
        raise


def _resolve(client: MlflowClient, ref: str) -> ModelVersion:
    """``name@alias``, ``name/version`` (optionally prefixed ``models:/``) -> the model version.

    Raises:
        RegistryError: the reference is malformed, or names a model, alias or version that does not exist.
    """
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_ref(ref)
    model = _registered_model(client, name, ref)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    if alias is not None:
        known = ", ".join(sorted(model.aliases)) or "none"
        raise RegistryError(f"model reference {ref!r}: {name} has no alias {alias!r} (its aliases: {known})")
    raise RegistryError(f"model reference {ref!r}: {name} has no version {version}")


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _moves(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every recorded move of ``name``'s champion alias, oldest first (read from all its versions' tags)."""
    moves = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        for key, value in mv.tags.items():
            if not key.startswith(MOVE_TAG) or not key[len(MOVE_TAG) :].isdigit():
                continue
            try:
                record = json.loads(value)
            except ValueError:
                record = {"unreadable": value}
            moves.append({**record, "seq": int(key[len(MOVE_TAG) :]), "version": str(mv.version)})
    return sorted(moves, key=lambda move: move["seq"])


def _record_move(client: MlflowClient, name: str, version: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Tag ``version`` with one more move of the champion alias: what, why, its numbers, when, which run.

    Written after the alias has moved, so a record always describes a move that happened; the sequence
    number continues the registered model's count.
    """
    seq = max((move["seq"] for move in _moves(client, name)), default=0) + 1
    move = {
        "seq": seq,
        "at": _now(),
        "version": str(version),
        **record,
        "flow_run": os.environ.get(FLOW_RUN_ENV),
        "pipeline_run": os.environ.get(PARENT_RUN_ENV),
    }
    client.set_model_version_tag(name, str(version), f"{MOVE_TAG}{seq}", json.dumps(move, sort_keys=True))
    return move


def promote(
    cfg: PipelineConfig, candidates: Mapping[str, ModelVersionInfo], eval_report: Mapping[str, Any]
) -> dict[str, Any]:
    """Move ``champion`` to the best qualifying candidate if it beats the current champion.

    Candidates are ranked by ``eval_report["models"][method]["<judge>_mean"]`` (``judge``: the deciding judge). With
    ``registry.require_beats_base`` only those whose win rate against the base has ``ci_low > 0.5``
    qualify. The alias moves only when the best one is strictly better than the champion's recorded
    ``metric.<metric>_mean`` tag (or there is no champion); the replaced champion is first written into
    the new one's ``previous_champion`` tag. ``challenger`` goes to the best qualifying candidate that is
    not champion afterwards. A move is recorded on the new champion (``champion_move.<n>``, see ``history``).

    Returns:
        ``{"promoted", "champion", "previous_champion", "challenger", "reason", "metric", "candidates",
        "move"}`` (JSON-able; ``champion`` is the champion after the decision; ``move`` the recorded move or
        None).
    """
    client = _client(cfg)
    name, alias = cfg.registry.policy_name, cfg.registry.champion_alias
    metric = eval_report["judge"]
    rows = _rank(cfg, candidates, eval_report, metric)
    qualifying = [r for r in rows if r["qualifies"]]
    champion = _current(client, name, alias)
    promoted, reason = _decide(qualifying[0] if qualifying else None, champion, metric)
    previous, move = None, None
    if promoted:
        best = qualifying[0]
        new = best["version"]
        replaced_score = None
        if champion is not None:
            client.set_model_version_tag(name, new, "previous_champion", str(champion.version))
            previous = _ref(champion)
            replaced_score = champion.tags.get(f"{METRIC_TAG}{metric}_mean")
        client.set_model_version_tag(name, new, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        client.set_registered_model_alias(name, alias, new)
        move = _record_move(
            client,
            name,
            new,
            {
                "action": "promote",
                "method": best["method"],
                "previous": None if champion is None else str(champion.version),
                "reason": reason,
                "metric": metric,
                "score": best["score"],
                "previous_score": None if replaced_score is None else float(replaced_score),
                "ci_low_vs_base": best["ci_low_vs_base"],
            },
        )
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
        "move": move,
    }


def register_and_promote(cfg: PipelineConfig, methods: Sequence[str] = POLICY_METHODS) -> dict[str, Any]:
    """What ``prefalign promote`` does: validate every input, register each candidate, then ``promote``.

    Nothing is written to the registry unless ``check_candidates`` passed for all of ``methods``.

    Raises:
        RegistryError: a bad input (the registry is unchanged).
    """
    from prefalign.tracking import read_run_id

    report = check_candidates(cfg, methods)
    candidates = {
        method: register_policy(
            cfg,
            method=method,
            policy_dir=cfg.paths.resolve(method),
            base_dir=cfg.base_model_dir(),
            run_id=read_run_id(cfg.paths.resolve(method)),
            metrics={k: v for k, v in report["models"][method].items() if isinstance(v, float)},
        )
        for method in methods
    }
    return promote(cfg, candidates, report)


def rollback(cfg: PipelineConfig) -> dict[str, Any]:
    """Point ``champion`` back at the version named in the current champion's ``previous_champion`` tag.

    The restored version keeps its own ``previous_champion``, so rolling back again goes one further back;
    the move is recorded on the restored version. Everything is checked before the alias moves.

    Raises:
        RegistryError: there is no champion, it records no previous one, or that version no longer exists.
    """
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name, alias = cfg.registry.policy_name, cfg.registry.champion_alias
    champion = _current(client, name, alias)
    if champion is None:
        raise RegistryError(f"{name}@{alias}: no champion, nothing to roll back")
    back = champion.tags.get("previous_champion")
    if not back:
        raise RegistryError(f"{name}@{alias}: v{champion.version} was the first champion, no previous one to restore")
    try:
        restored = client.get_model_version(name, back)
    except MlflowException:
        raise RegistryError(
            f"{name}@{alias}: previous champion {name}/{back} (tag previous_champion of v{champion.version}) "
            "no longer exists"
        ) from None
    client.set_registered_model_alias(name, alias, back)
    move = _record_move(
        client,
        name,
        back,
        {
            "action": "rollback",
            "method": restored.tags.get("method", ""),
            "previous": str(champion.version),
            "reason": f"rollback: v{champion.version} replaced by the champion before it, v{back}",
        },
    )
    return {"champion": _ref(client.get_model_version(name, back)), "replaced": _ref(champion), "move": move}


def history(cfg: PipelineConfig) -> dict[str, Any]:
    """The champion alias's moves, oldest first, as recorded on the versions (``champion_move.<n>`` tags).

    Returns:
        ``{"name", "alias", "champion", "moves", "consistent"}``; ``champion`` is the version the alias
        points at now (None: no champion); ``consistent`` is False when that is not the version of the last
        recorded move (the alias was moved by something other than promote/rollback, or a record was lost).

    Raises:
        RegistryError: the registered model does not exist.
    """
    client = _client(cfg)
    name, alias = cfg.registry.policy_name, cfg.registry.champion_alias
    _registered_model(client, name, f"{name}@{alias}")
    moves = _moves(client, name)
    champion = _current(client, name, alias)
    current = None if champion is None else str(champion.version)
    last = moves[-1]["version"] if moves else None
    return {"name": name, "alias": alias, "champion": current, "moves": moves, "consistent": current == last}


def _score_text(move: Mapping[str, Any]) -> str:
    if move.get("score") is None:
        return ""
    against = move.get("previous_score")
    versus = "" if against is None else f" vs {float(against):.4f}"
    return f" {move.get('metric')}_mean {float(move['score']):.4f}{versus}"


def history_lines(record: Mapping[str, Any]) -> list[str]:
    """``history``'s record as text: the current champion, then one line per move, oldest first."""
    head = f"{record['name']}@{record['alias']}: " + (
        f"v{record['champion']}" if record["champion"] else "no champion"
    )
    lines = [head]
    if not record["moves"]:
        lines.append("  no recorded moves")
    for move in record["moves"]:
        replaced = f"replacing v{move['previous']}" if move.get("previous") else "first champion"
        run = f" (flow run {move['flow_run']})" if move.get("flow_run") else ""
        lines.append(
            f"  #{move['seq']} {move.get('at', '?')} {move.get('action', '?')} v{move['version']} "
            f"({move.get('method') or '?'}) {replaced}{_score_text(move)}: {move.get('reason', '')}{run}"
        )
    if record["moves"] and not record["consistent"]:
        lines.append(
            f"  note: the alias points at {'v' + record['champion'] if record['champion'] else 'no version'}, not at "
            f"v{record['moves'][-1]['version']} of the last recorded move (moved outside promote/rollback?)"
        )
    return lines


# ----------------------------------------------------------------------------------------------- lineage
def _walk_runs(client: MlflowClient, run_id: str, depth: int, seen: set[str], runs: list[dict[str, Any]]) -> None:
    """Depth-first over ``prefalign.upstream_run``; one entry per run, each run once."""
    from mlflow.exceptions import MlflowException

    seen.add(run_id)
    entry: dict[str, Any] = {"run_id": run_id, "role": "training" if depth == 0 else "upstream", "depth": depth}
    try:
        run = client.get_run(run_id)
    except MlflowException:
        runs.append({**entry, "found": False})
        return
    tags = run.data.tags
    runs.append(
        {
            **entry,
            "found": True,
            "stage": tags.get("prefalign.stage"),
            "status": run.info.status,
            "git_commit": tags.get("prefalign.git_commit"),
            "params_sha": tags.get("prefalign.params_sha"),
            "data_version": tags.get("prefalign.data_version"),
            "run": run,  # dropped from the record; kept while walking for the reward and validation look-ups
        }
    )
    for upstream in filter(None, tags.get("prefalign.upstream_run", "").split(",")):
        if upstream not in seen:
            _walk_runs(client, upstream, depth + 1, seen, runs)


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


def _reward_model(
    client: MlflowClient, cfg: PipelineConfig, training: Any, runs: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    if ref := training.data.tags.get("prefalign.reward_version"):
        name, _, version = ref.rpartition("/")
        return {"name": name, "version": version, "run_id": None, "registered": True, "via": "training_run_tag"}
    for entry in runs:
        if entry.get("stage") != "train_reward":
            continue
        run_id = entry["run_id"]
        versions = client.search_model_versions(f"name = '{cfg.registry.reward_name}' and run_id = '{run_id}'")
        if not versions:
            return {"name": None, "version": None, "run_id": run_id, "registered": False, "via": "upstream_run"}
        mv = min(versions, key=lambda v: int(v.version))
        return {
            "name": mv.name,
            "version": str(mv.version),
            "run_id": run_id,
            "registered": True,
            "via": "upstream_run",
        }
    return None


def lineage_record(ref: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The chain from a registered version back to its data, as one JSON-able object.

    policy version -> training run (+ tags) -> upstream runs (``prefalign.upstream_run``, recursively)
    -> reward model version -> data version -> validation report. A link that cannot be followed is None
    (``training_run`` None: the version records no run; a run not in this store has ``found: false``).

    Args:
        ref: ``prefalign-policy@champion`` or ``prefalign-policy/3`` (``models:/`` prefix allowed).
        cfg: config (tracking store and registry names).

    Raises:
        RegistryError: the reference is malformed or names a model, alias or version that does not exist.
    """
    client = _client(cfg)
    mv = _resolve(client, ref)
    tags = mv.tags
    record: dict[str, Any] = {
        "ref": ref,
        "model": {
            "name": mv.name,
            "version": str(mv.version),
            "aliases": list(mv.aliases),
            "method": tags.get("method"),
            "weights_sha": tags.get("weights_sha"),
            "source": mv.source,
        },
        "training_run": tags.get("training_run_id") or mv.run_id or None,
        "runs": [],
        "reward_model": None,
        "data": None,
        "validation_report": None,
    }
    if record["training_run"] is None:
        return record
    runs: list[dict[str, Any]] = []
    _walk_runs(client, record["training_run"], 0, set(), runs)
    record["runs"] = [{k: v for k, v in entry.items() if k != "run"} for entry in runs]
    training = runs[0].get("run")
    if training is None:
        return record
    md5 = tags.get("data_version") or training.data.tags.get("prefalign.data_version", "?")
    record["reward_model"] = _reward_model(client, cfg, training, runs)
    commit = tags.get("git_commit") or training.data.tags.get("prefalign.git_commit")
    record["data"] = {"version": md5, "git_commit": commit}
    if validation := _validation_run(client, training, md5):
        record["validation_report"] = {
            "uri": f"{validation.info.artifact_uri}/validation.json",
            "run_id": validation.info.run_id,
        }
    return record


def _run_line(entry: Mapping[str, Any]) -> str:
    pad = "  " * (entry["depth"] + 1)
    if not entry["found"]:
        return f"{pad}run {entry['run_id']}: not found in this tracking store"
    return (
        f"{pad}{entry['role']} run {entry['run_id']} [{entry['stage'] or '?'}] {entry['status']}: "
        f"git {entry['git_commit'] or '?'}, params {entry['params_sha'] or '?'}, data {entry['data_version'] or '?'}"
    )


def _reward_text(reward: Mapping[str, Any] | None) -> str:
    if reward is None:
        return "reward model: none upstream"
    if reward["via"] == "training_run_tag":
        return f"reward model {reward['name']}/{reward['version']} (training run tag)"
    if not reward["registered"]:
        return f"reward model: run {reward['run_id']} (not registered)"
    return f"reward model {reward['name']} v{reward['version']} (run {reward['run_id']})"


def lineage_lines(record: Mapping[str, Any]) -> list[str]:
    """``lineage_record`` as text, one line per link (the same facts; the weights sha shortened)."""
    model = record["model"]
    lines = [
        (
            f"model {model['name']} v{model['version']} aliases={model['aliases']} method={model['method'] or '?'} "
            f"weights_sha={(model['weights_sha'] or '?')[:16]} source={model['source']}"
        )
    ]
    if record["training_run"] is None:
        return [*lines, "  training run: none recorded"]
    lines += [_run_line(entry) for entry in record["runs"]]
    if record["data"] is None:  # the training run is not in this store: nothing further to follow
        return lines
    lines.append(_reward_text(record["reward_model"]))
    lines.append(f"data version {record['data']['version']} (git {record['data']['git_commit']})")
    validation = record["validation_report"]
    lines.append(
        f"validation report {validation['uri']} (run {validation['run_id']})"
        if validation
        else "validation report: no validate run found"
    )
    return lines


def lineage(ref: str, cfg: PipelineConfig) -> list[str]:
    """The chain from a registered version back to its data, one line per link (see ``lineage_record``)."""
    return lineage_lines(lineage_record(ref, cfg))
