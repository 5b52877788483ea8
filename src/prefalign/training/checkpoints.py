"""Resumable training state of every trainer (policy and reward): atomic step folders, identified by a fingerprint.

A run's checkpoints live in one folder (``<paths.checkpoints>/<stage>``), outside the stage's DVC output:
DVC deletes a stage's outputs before it reruns, which would throw away exactly what a resume needs.

Layout of one checkpoint::

    <root>/step_<N>/
        checkpoint.json          step, fingerprint and its parts, trainer state (written last; its presence = complete)
        history.json             per-step metrics so far (the stage summarises the whole run)
        trainable.safetensors    the trainable (LoRA) parameters by name, bit-exact
        pytorch_lora_weights.safetensors   the same adapter in the diffusers format (load_lora_weights)
        shared.safetensors       extra tensors identical on every process (EMA, sampler copy)
        local_<rank>.safetensors extra tensors of one process (DRO's recorded trajectories)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   accelerate's own state (pickles)

A folder is written as ``.tmp-step_<N>`` and renamed once complete, so a kill at any moment leaves
either a complete ``step_<N>`` or a temporary folder that is ignored and later replaced. accelerate's
pickles are only ever loaded from the run's own folder, after its fingerprint matched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

META_FILE = "checkpoint.json"
HISTORY_FILE = "history.json"
TRAINABLE_FILE = "trainable.safetensors"
SHARED_FILE = "shared.safetensors"
STEP_DIR = re.compile(r"^step_(\d+)$")

# Fields that change how a run is carried out but not what it computes: a resume may change them.
RESUME_NEUTRAL_FIELDS = frozenset({"checkpoint_every", "gradient_checkpointing", "compile"})


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to a run with another config, seed, data, model or process count."""


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed; each part is compared and named on mismatch."""

    config_sha: str
    seed: int
    data_sha: str
    init_sha: str
    num_processes: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainingState:
    """What ``load_training_state`` restores beside what accelerate restores in place."""

    step: int
    history: dict[str, list[float]] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)
    local: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def config_sha(section: BaseModel) -> str:
    """sha256 of a config section without the fields a resume may change."""
    dump = section.model_dump(mode="json", exclude=set(RESUME_NEUTRAL_FIELDS))
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def strings_sha(*columns: Iterable[str]) -> str:
    """sha256 of ordered string columns (the pair list, the expert list): the data a run trains on."""
    digest = hashlib.sha256()
    for column in columns:
        for value in column:
            digest.update(value.encode())
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def weights_sha(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names and raw bytes): the initial weights a run starts from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _mismatch_message(root: Path, folder: Path, stored: Mapping[str, object], identity: RunIdentity) -> str:
    differs = [key for key, value in asdict(identity).items() if stored.get(key) != value]
    names = {
        "config_sha": "training config",
        "seed": "seed",
        "data_sha": "training data",
        "init_sha": "initial model weights",
        "num_processes": "number of processes",
    }
    what = ", ".join(names[key] for key in differs) or "fingerprint"
    return (
        f"checkpoint folder {root} holds {folder.name} from a different run (differs in: {what}); "
        f"resuming it would silently mix two configurations. Delete {root} to start afresh, or set "
        f"paths.checkpoints to another folder."
    )


def resumable_checkpoint(root: Path, identity: RunIdentity) -> Path | None:
    """The latest complete checkpoint of ``root`` if it was written by this run, else None if there is none.

    Raises:
        CheckpointMismatchError: ``root`` holds checkpoints with another fingerprint; names the folder and
            what differs, and says to delete it or change ``paths.checkpoints``.
    """
    checkpoints = complete_checkpoints(root)
    for _, folder in checkpoints:
        stored = json.loads((folder / META_FILE).read_text())
        if stored.get("fingerprint") != identity.fingerprint:
            raise CheckpointMismatchError(_mismatch_message(root, folder, stored.get("identity", {}), identity))
    return checkpoints[-1][1] if checkpoints else None


def register_trainable_hooks(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Make ``save_state``/``load_state`` store only the trainable parameters, as safetensors.

    accelerate would otherwise write the whole UNet (3.4 GB for SD1.5) into every checkpoint, though
    only the adapter changes; the frozen weights are re-derived from the run's inputs on resume.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(Path(output_dir) / TRAINABLE_FILE))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        stored = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in stored.items():
                params[name].copy_(value.to(params[name].device))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _fsync_tree(folder: Path) -> None:
    # A rename is atomic, but only fsynced contents survive a power cut with the folder that names them.
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(tmp: Path, final: Path) -> Path:
    """Make the complete folder ``tmp`` the checkpoint ``final``: fsync its contents, then one rename.

    A folder named ``final`` can only be left by a run that crashed after writing this same step (never a
    newer one), so it is replaced.
    """
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("checkpoint %s written", final)
    return final


def save_training_state(
    accelerator: Accelerator,
    root: Path,
    step: int,
    identity: RunIdentity,
    *,
    history: dict[str, list[float]],
    shared: Mapping[str, Tensor] | None = None,
    local: Mapping[str, Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
    export: Callable[[Path], object] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``<root>/step_<step>`` atomically (temporary sibling, then rename). Call on every process.

    Args:
        accelerator: its ``save_state`` writes model (through the hooks), optimizer, scheduler and RNG.
        root: the run's checkpoint folder.
        step: optimizer steps done.
        identity: stored with the checkpoint; a resume must match it.
        history: per-step metrics so far.
        shared: tensors equal on every process, written once.
        local: this process's own tensors.
        state: JSON-serialisable trainer state beside the tensors (early stopping, EMA step count).
        export: called by the main process with the temporary folder, to add e.g. the diffusers LoRA file.
        keep_last: delete all but the newest ``keep_last`` complete checkpoints after publishing (None: keep
            all); a trainer whose checkpoints hold whole models keeps one.

    Returns:
        The final folder.
    """
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if local:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in local.items()},
            str(tmp / f"local_{accelerator.process_index}.safetensors"),
        )
    if accelerator.is_main_process:
        if shared:
            save_file({k: v.detach().cpu().contiguous() for k, v in shared.items()}, str(tmp / SHARED_FILE))
        if export is not None:
            export(tmp)
        (tmp / HISTORY_FILE).write_text(json.dumps(history))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "fingerprint": identity.fingerprint, "identity": asdict(identity), "state": state or {}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        publish_checkpoint(tmp, final)
        if keep_last is not None:
            for _, older in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator: Accelerator, folder: Path) -> TrainingState:
    """Restore model, optimizer, scheduler and RNG in place; return the step, history and extra tensors."""
    accelerator.load_state(str(folder))
    meta = json.loads((folder / META_FILE).read_text())
    local_path = folder / f"local_{accelerator.process_index}.safetensors"
    return TrainingState(
        step=int(meta["step"]),
        history=json.loads((folder / HISTORY_FILE).read_text()),
        shared=load_file(str(folder / SHARED_FILE)) if (folder / SHARED_FILE).is_file() else {},
        local=load_file(str(local_path)) if local_path.is_file() else {},
        state=meta.get("state", {}),
    )
