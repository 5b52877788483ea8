"""Code and data versions: the git commit, the DVC md5 of a dataset, and ``dvc push`` / ``dvc pull``.

These are the lineage keys every MLflow run carries (docs/design.md, "MLflow"). The md5 is read
from ``dvc.lock`` as plain YAML, so asking for a version costs no DVC import; ``dvc.api`` is imported
only to resolve the remote URL, and push/pull run the ``dvc`` command in a subprocess, exactly what a
person would type.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

log = logging.getLogger(__name__)

UNVERSIONED = "unversioned"
UNKNOWN_COMMIT = "unknown"


def files_sha256(folder: Path, files: Sequence[Path]) -> str:
    """sha256 over ``files`` (under ``folder``) in order of their relative paths: each path, a NUL, its bytes."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def git_commit(root: Path) -> str:
    """The HEAD commit of the repository holding ``root``, with ``-dirty`` when tracked files changed.

    Untracked files do not count (``--untracked-files=no``): outputs and caches are not code changes.

    Returns:
        The sha (``<sha>`` or ``<sha>-dirty``), or ``"unknown"`` outside a git repository or without git.
    """

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return UNKNOWN_COMMIT
        status = git("status", "--porcelain", "--untracked-files=no")
    except (FileNotFoundError, NotADirectoryError):  # no git binary, or root does not exist
        return UNKNOWN_COMMIT
    sha = head.stdout.strip()
    return f"{sha}-dirty" if status.returncode == 0 and status.stdout.strip() else sha


@dataclass(frozen=True)
class DataVersion:
    """Where a DVC-tracked dataset stands.

    Attributes:
        md5: the DVC hash from ``dvc.lock`` (a directory's ends in ``.dir``), or ``"unversioned"``.
        git_commit: the commit of the repository (``-dirty`` suffix possible).
        remote_url: the dataset's location on the default DVC remote, None when it cannot be resolved.
        path: the dataset path relative to the repository root.
    """

    md5: str
    git_commit: str
    remote_url: str | None
    path: str


def _norm(path: str) -> str:
    return str(PurePosixPath(path.strip().replace("\\", "/"))).removeprefix("./")


def lock_md5(root: Path, path: str) -> str:
    """The md5 that ``dvc.lock`` records for the output ``path`` of any stage, or ``"unversioned"``."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return UNVERSIONED
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    wanted = _norm(path)
    for stage in stages.values():
        for out in stage.get("outs") or []:
            if _norm(str(out.get("path", ""))) == wanted and out.get("md5"):
                return str(out["md5"])
    return UNVERSIONED


def _remote_url(root: Path, path: str) -> str | None:
    try:
        import dvc.api

        return dvc.api.get_url(path, repo=str(root))
    except Exception as err:  # noqa: BLE001 - no DVC repo, no remote, not tracked: lineage just lacks the URL
        log.debug("no DVC remote URL for %s in %s: %s", path, root, err)
        return None


def data_version(root: Path, path: str = "data/preferences") -> DataVersion:
    """The DVC version of the dataset at ``path`` (relative to ``root``).

    The remote URL is only looked up for a versioned path: an unversioned one has no remote copy, and
    skipping the lookup keeps DVC out of the process.
    """
    root = Path(root)
    md5 = lock_md5(root, path)
    url = _remote_url(root, path) if md5 != UNVERSIONED else None
    return DataVersion(md5=md5, git_commit=git_commit(root), remote_url=url, path=_norm(path))


def _dvc(command: str, root: Path, targets: Sequence[str] | None, remote: str | None) -> str:
    # `python -m dvc` of this interpreter: the dvc of this environment even when its bin/ is not on PATH.
    cmd = [sys.executable, "-m", "dvc", command, *(targets or [])]
    if remote:
        cmd += ["--remote", remote]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    log.info("%s (in %s)", " ".join(cmd[2:]), root)
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc {command}` failed in {root} (exit {done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def dvc_push(root: Path, targets: Sequence[str] | None = None, remote: str | None = None) -> str:
    """Push DVC-tracked data (all outputs, or ``targets``) to ``remote`` (default remote when None).

    Returns:
        DVC's output ("N files pushed").

    Raises:
        RuntimeError: ``dvc push`` failed; the message holds its stderr.
    """
    return _dvc("push", Path(root), targets, remote)


def dvc_pull(root: Path, targets: Sequence[str] | None = None, remote: str | None = None) -> str:
    """Pull DVC-tracked data (all outputs, or ``targets``) from ``remote`` (default remote when None).

    Raises:
        RuntimeError: ``dvc pull`` failed; the message holds its stderr.
    """
    return _dvc("pull", Path(root), targets, remote)


def machine_tags() -> dict[str, str]:
    """What a run ran on: float results differ between CPU types, so a difference must be traceable.

    CPU model, logical cores, torch's intra-op threads, and the torch and BLAS builds. torch is read only
    when the process already imported it (every training stage has), so recording costs no import.
    """
    import platform

    tags = {
        "prefalign.machine.cpu": _cpu_model(),
        "prefalign.machine.cores": str(os.cpu_count() or 0),
        "prefalign.machine.python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
        blas = found.group(1) if found else "unknown"
        tags |= {
            "prefalign.machine.torch": torch.__version__,
            "prefalign.machine.threads": str(torch.get_num_threads()),
            "prefalign.machine.blas": blas,
            "prefalign.machine.cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        }
    return tags


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
