"""git commit with the dirty flag, and the DVC md5 read from dvc.lock."""

import subprocess
from pathlib import Path

import pytest

from prefalign.versioning import DataVersion, data_version, dvc_push, git_commit, lock_md5

SAMPLE_LOCK = """\
schema: '2.0'
stages:
  ingest:
    cmd: prefalign stage ingest
    deps:
    - path: data/world
      hash: md5
      md5: 11111111111111111111111111111111.dir
    outs:
    - path: data/preferences
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 123
      nfiles: 4
  train_reward:
    cmd: prefalign stage train_reward
    outs:
    - path: models/reward
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
    - path: reports/reward.json
      hash: md5
      md5: aaaabbbbccccddddeeeeffff00001111
"""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def test_git_commit_is_head_and_clean(repo):
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_git_commit_is_dirty_after_a_tracked_change_only(repo):
    (repo / "untracked.txt").write_text("outputs are not code\n")
    assert not git_commit(repo).endswith("-dirty")
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_git_commit_outside_a_repo(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"


def test_lock_md5_finds_the_output_in_any_stage(tmp_path):
    (tmp_path / "dvc.lock").write_text(SAMPLE_LOCK)
    assert lock_md5(tmp_path, "data/preferences") == "0123456789abcdef0123456789abcdef.dir"
    assert lock_md5(tmp_path, "./data/preferences/") == "0123456789abcdef0123456789abcdef.dir"
    assert lock_md5(tmp_path, "reports/reward.json") == "aaaabbbbccccddddeeeeffff00001111"
    assert lock_md5(tmp_path, "data/world") == "unversioned"  # a dep, not an output


def test_data_version_without_dvc(tmp_path):
    version = data_version(tmp_path)
    assert version == DataVersion(md5="unversioned", git_commit="unknown", remote_url=None, path="data/preferences")


def test_data_version_reads_lock_and_tolerates_missing_remote(repo):
    # dvc.lock but no DVC project: the md5 still comes from the lock; the URL lookup fails quietly.
    (repo / "dvc.lock").write_text(SAMPLE_LOCK)
    version = data_version(repo)
    assert version.md5 == "0123456789abcdef0123456789abcdef.dir"
    assert version.remote_url is None
    assert version.git_commit.startswith(_git(repo, "rev-parse", "HEAD"))


def test_dvc_push_failure_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="dvc push.*failed"):
        dvc_push(tmp_path)


def test_data_version_and_push_in_a_dvc_project(repo, tmp_path_factory):
    """A real DVC project: md5 from the lock, URL on the default remote, and `dvc push` fills that URL."""
    import sys

    store = tmp_path_factory.mktemp("store")

    def dvc(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True, text=True)

    dvc("init", "-q")
    dvc("remote", "add", "-d", "local", str(store))
    dvc(
        "stage",
        "add",
        "-n",
        "ingest",
        "-o",
        "data/preferences",
        "mkdir -p data/preferences && echo pair > data/preferences/pairs.txt",
    )
    dvc("repro", "-q")
    version = data_version(repo)
    assert version.md5.endswith(".dir") and len(version.md5) == 36
    assert version.remote_url == str(store / "files" / "md5" / version.md5[:2] / version.md5[2:])
    assert "pushed" in dvc_push(repo)
    assert Path(version.remote_url).is_file()
