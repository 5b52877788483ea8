"""The reward trainer across processes: killed with SIGKILL between checkpoints it resumes to the weights of
an uninterrupted run; under ``accelerate launch`` two processes train like one with the same global batch,
and only process 0 selects DRO's experts, which both processes then hold.

The in-process test in ``test_reward_training`` raises an exception; the SIGKILL test kills a real process,
so nothing gets to run a ``finally`` or flush a buffer, as on a preempted machine.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_policy_processes import free_port, job_env, max_relative_difference, run_job

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


def _relative_difference_of_trained_weights(a: Path, b: Path) -> float:
    """``max_relative_difference`` without the attention key biases: their gradient is zero up to rounding
    (softmax ignores a constant added to every key), and AdamW turns that rounding, which differs with the
    order of a sum, into full-size steps of a parameter that starts at zero."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys() and left
    return max(
        float((left[k].double() - right[k].double()).norm() / left[k].double().norm().clamp_min(1e-12))
        for k in left
        if not k.endswith("k_proj.bias")
    )


def _untrained_state() -> dict:
    from prefalign.models.reward_model import load_backbone
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)
    return {k: v.contiguous() for k, v in scorer.model.state_dict().items()}


def _expert_pool(root: Path) -> Path:
    """A preference folder of 40 demo prompts, an untrained tiny reward model and params naming them."""
    from test_reward_training import _build_demo_pairs

    from prefalign.data.schema import PAIRS_SCHEMA, ImageStore, write_table
    from prefalign.models.reward_model import load_backbone
    from prefalign.models.text import build_tokenizer
    from prefalign.world.grammar import vocabulary_words

    demo = _build_demo_pairs()
    pairs = demo.pairs[demo.pairs.prompt.isin(demo.pairs.prompt.unique()[:40])]
    store = ImageStore(root / "prefs")
    stored = {sha: store.put_array(demo.images[sha]) for sha in {*pairs.image_w, *pairs.image_l}}
    table = pairs.assign(image_w=pairs.image_w.map(stored), image_l=pairs.image_l.map(stored), split="train")
    write_table(table.assign(source="demo"), store.root / "pairs.parquet", PAIRS_SCHEMA)
    load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), seed=5).save(root / "reward")
    params = root / "params.yaml"
    params.write_text("paths:\n  preferences: prefs\n  reward: reward\ndro:\n  top_k: 30\n  per_prompt_cap: 1\n")
    return params


def test_two_processes_train_like_one_and_share_process_zeros_experts(tmp_path):
    """2 processes x 16 pairs, images decoded on demand (each process only its share) == 1 process x 32 pairs
    held on the device; process 0 alone scores the expert candidates and both processes get its list."""
    params = _expert_pool(tmp_path)
    common = ["--steps", "6", "--eval-every", "3", "--experts-params", str(params)]
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
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    # --cpu with --num_processes 2 silently runs one process; --multi_gpu + ACCELERATE_USE_CPU runs two on gloo
    launched = run_job(
        [str(JOB), "--out", str(two), "--batch-size", "16", "--on-demand", "--expect-processes", "2", *common],
        launcher=launcher,
        env=dict(job_env(), ACCELERATE_USE_CPU="true"),
    )
    single = run_job([str(JOB), "--out", str(one), "--batch-size", "32", *common])
    assert _relative_difference_of_trained_weights(one, two) <= 1e-4
    untrained = tmp_path / "untrained.safetensors"
    save_file(_untrained_state(), str(untrained))
    assert _relative_difference_of_trained_weights(one, untrained) > 1e-2  # the runs did move the weights

    selected = re.findall(r"expert selection: process (\d+) scores (\d+) candidate images", launched.stderr)
    assert [rank for rank, _ in selected] == ["0"], launched.stderr[-3000:]
    received = [json.loads(Path(f"{two}.experts.rank{rank}.json").read_text()) for rank in (0, 1)]
    alone = json.loads(Path(f"{one}.experts.rank0.json").read_text())
    assert received[0] == received[1] == alone
    assert len(alone["image"]) == 30 and len(set(alone["prompt"])) == 30
    assert "expert selection: process 0 scores" in single.stderr
