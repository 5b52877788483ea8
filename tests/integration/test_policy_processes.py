"""The policy trainer across processes: SIGKILL then resume, and two processes vs one (CPU, gloo).

Each test runs ``policy_job.py`` (tiny config, synthetic features) in subprocesses and compares the final
LoRA weights. Deterministic algorithms and one thread per process make the runs comparable bit for bit.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("policy_job.py")
TINY = {
    "model.unet_channels": "[32,64]",
    "model.vae_channels": "[32,32]",
    "model.text_hidden": "32",
    "trainer.lora.rank": "2",
}

pytestmark = pytest.mark.slow


def job_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def job_args(out: Path, overrides: dict[str, str], *extra: str) -> list[str]:
    sets = [arg for key, value in {**TINY, **overrides}.items() for arg in ("--set", f"{key}={value}")]
    return [str(JOB), "--out", str(out), *sets, *extra]


def run_job(
    args: list[str], *, launcher: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), *args]
    done = subprocess.run(
        cmd, env=env or job_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def max_relative_difference(a: Path, b: Path) -> float:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys() and left
    return max(float((left[k] - right[k]).norm() / left[k].norm().clamp_min(1e-12)) for k in left)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert proc.poll() is None, f"job ended before {path.name}: {proc.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = {"dpo.steps": "10", "dpo.batch_size": "4", "trainer.checkpoint_every": "2", "dpo.warmup_steps": "3"}
    run_job(job_args(tmp_path / "straight.safetensors", {**overrides, "trainer.checkpoint_every": "0"}))

    checkpoints = tmp_path / "checkpoints"
    args = job_args(tmp_path / "resumed.safetensors", overrides, "--checkpoints", str(checkpoints))
    proc = subprocess.Popen(
        [sys.executable, *args, "--step-delay", "0.5"],
        env=job_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(checkpoints / "step_4", proc, timeout=240)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.safetensors").exists(), "the job finished before it was killed"

    done = run_job(args)
    resumed = re.search(r"resuming from \S*step_(\d+)", done.stderr)
    assert resumed and int(resumed.group(1)) >= 4, done.stderr[-2000:]
    assert max_relative_difference(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors") <= 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("method", ["dpo", "dro"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, method):
    steps = {
        "dpo": {"dpo.steps": "4", "dpo.batch_size": "2", "trainer.checkpoint_every": "0"},
        "dro": {
            "dro.steps": "3",
            "dro.batch_size": "2",
            "dro.reuse": "2",
            "dro.sync_every": "2",
            "dro.sample_steps": "3",
            "dro.timestep_jitter": "20",
            "trainer.checkpoint_every": "0",
        },
    }[method]
    # 2 processes x 2 samples x 1 micro-batch == 1 process x 2 samples x 2 micro-batches: 4 per update
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    # --cpu with --num_processes 2 silently runs one process; --multi_gpu + ACCELERATE_USE_CPU runs two on gloo
    env = dict(job_env(), ACCELERATE_USE_CPU="true")
    two = tmp_path / "two.safetensors"
    run_job(
        job_args(two, {**steps, f"{method}.grad_accum": "1"}, "--method", method, "--expect-processes", "2"),
        launcher=launcher,
        env=env,
    )
    one = tmp_path / "one.safetensors"
    run_job(job_args(one, {**steps, f"{method}.grad_accum": "2"}, "--method", method))
    assert max_relative_difference(one, two) <= 1e-4
    if method == "dpo":  # and the comparison can fail: half the global batch trains to other weights
        half = tmp_path / "half.safetensors"
        run_job(job_args(half, {**steps, "dpo.grad_accum": "1"}))
        assert max_relative_difference(one, half) > 1e-3
