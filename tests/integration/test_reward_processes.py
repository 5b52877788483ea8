"""The reward trainer killed with SIGKILL between checkpoints resumes to the weights of an uninterrupted run.

The in-process test in ``test_reward_training`` raises an exception; this one kills a real process, so
nothing gets to run a ``finally`` or flush a buffer, as on a preempted machine.
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_policy_processes import job_env, max_relative_difference

JOB = Path(__file__).with_name("reward_job.py")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_reward_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight.safetensors"
    subprocess.run(
        [sys.executable, str(JOB), "--out", str(straight)],
        env=job_env(),
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    checkpoints, resumed = tmp_path / "checkpoints", tmp_path / "resumed.safetensors"
    args = [sys.executable, str(JOB), "--out", str(resumed), "--checkpoints", str(checkpoints)]
    with subprocess.Popen(
        [*args, "--step-delay", "0.2"], env=job_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + 240
        while not (checkpoints / "step_20").is_dir():
            assert proc.poll() is None, f"job ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        time.sleep(1.0)  # a few steps past the checkpoint: they are lost and must be redone
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not resumed.exists(), "the job finished before it was killed"
    done = subprocess.run(args, env=job_env(), cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    resumed_at = re.search(r"reward training resumes at step (\d+)", done.stderr)
    assert resumed_at and int(resumed_at.group(1)) >= 20, done.stderr[-2000:]
    assert max_relative_difference(straight, resumed) <= 1e-6
    assert load_file(str(straight)).keys() == load_file(str(resumed)).keys()
