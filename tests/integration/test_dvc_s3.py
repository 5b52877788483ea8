"""The project's S3 DVC remote, for real: push, wipe the cache, pull, same md5, against a local S3 server.

moto's server mode speaks the S3 wire protocol on 127.0.0.1, so this exercises dvc-s3, s3fs and botocore
exactly as they run against MinIO or AWS; only the endpoint differs. The repository under test takes the
remote from this project's own ``.dvc/config`` (so a broken remote definition fails here), with the
endpoint overridden in ``.dvc/config.local`` as the README tells production users to do.
"""

import configparser
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefalign.versioning import data_version, dvc_pull, dvc_push

REPO = Path(__file__).resolve().parents[2]
BUCKET = "prefalign-dvc"


def _run(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _tree_md5(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def s3_endpoint(monkeypatch):
    pytest.importorskip("dvc_s3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Credentials reach DVC only through the environment, as in production.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def dvc_repo(tmp_path, s3_endpoint):
    root = tmp_path / "repo"
    root.mkdir()
    _run(root, "git", "init", "-q")
    _run(root, "git", "config", "user.email", "t@example.com")
    _run(root, "git", "config", "user.name", "t")
    _dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's remotes, as committed
    _dvc(root, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    _dvc(root, "remote", "default", "--local", "s3")
    (root / "make_data.py").write_text(
        "from pathlib import Path\n"
        "out = Path('data/preferences'); (out / 'images').mkdir(parents=True, exist_ok=True)\n"
        "(out / 'pairs.parquet').write_bytes(bytes(range(256)) * 40)\n"
        "(out / 'images' / 'ab.png').write_bytes(b'not really a png but bytes are bytes')\n"
    )
    (root / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: python make_data.py\n    deps: [make_data.py]\n    outs: [data/preferences]\n"
    )
    _dvc(root, "repro", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "data")
    return root


def test_committed_config_defines_an_s3_remote_without_credentials():
    parser = configparser.ConfigParser()
    parser.read(REPO / ".dvc" / "config")
    s3 = parser["'remote \"s3\"'"]  # DVC writes section names quoted
    assert s3["url"].startswith("s3://") and s3["endpointurl"]
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(s3)


def test_push_wipe_pull_round_trip_keeps_every_byte(dvc_repo):
    before = _tree_md5(dvc_repo / "data" / "preferences")
    assert "3 files pushed" in dvc_push(dvc_repo)  # two files and the folder's .dir listing
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    shutil.rmtree(dvc_repo / "data" / "preferences")

    dvc_pull(dvc_repo)
    assert _tree_md5(dvc_repo / "data" / "preferences") == before
    _dvc(dvc_repo, "status", "-q")  # exit 0: workspace, cache and dvc.lock agree


def test_data_version_names_the_md5_commit_and_s3_location(dvc_repo):
    dvc_push(dvc_repo)
    version = data_version(dvc_repo)
    assert version.md5.endswith(".dir")
    assert version.git_commit == _run(dvc_repo, "git", "rev-parse", "HEAD").strip()
    assert version.remote_url and version.remote_url.startswith(f"s3://{BUCKET}/dvcstore/")
