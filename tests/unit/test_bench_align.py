"""benchmarks/bench_align.py on the demo model: every variant runs and the JSON has the agreed keys."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_align.py"
VARIANTS = ("ours", "diffusers_lora", "original")
VARIANT_KEYS = {"sec_per_pair", "peak_mem_mb", "tflops_per_s", "mfu", "gflop_per_pair", "trainable_params"}
RATIO_KEYS = {"diffusers_lora_over_ours_time", "original_over_ours_time", "ours_over_original_mem"}
DEMO_ARGS = ["--preset", "demo", "--steps", "1", "--batch", "2", "--threads", "1"]


def load_bench():
    """The script as a module (benchmarks/ is not a package); registered so its dataclasses resolve."""
    if "bench_align" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_align", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_align"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_align"]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        # In-process keeps this to a few seconds (three fresh interpreters cost ~5 s of imports each).
        load_bench().main([*DEMO_ARGS, "--warmup", "1", "--in-process", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own count; later tests expect theirs
    return json.loads(out.read_text())


def test_report_has_every_variant_and_ratio(demo_report):
    for variant in VARIANTS:
        assert VARIANT_KEYS <= demo_report[variant].keys(), variant
        assert demo_report[variant]["sec_per_pair"] > 0 and demo_report[variant]["peak_mem_mb"] > 0
    assert RATIO_KEYS <= demo_report["ratios"].keys()
    assert all(demo_report["ratios"][key] > 0 for key in RATIO_KEYS)
    assert {"device", "preset", "batch", "steps"} <= demo_report.keys()
    assert (demo_report["preset"], demo_report["batch"], demo_report["steps"]) == ("demo", 2, 1)
    assert demo_report["lora"]["targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert demo_report["lora"]["rank"] == 8


def test_structures_differ_where_they_should(demo_report):
    ours, lora, original = (demo_report[v] for v in VARIANTS)
    # Same LoRA in both adapter variants; the original trains the whole UNet.
    assert ours["trainable_params"] == lora["trainable_params"] < original["trainable_params"]
    # Only the cached variant skips the encoders; only the original pays for full weight gradients.
    assert ours["gflop_per_pair_encode"] == 0 < lora["gflop_per_pair_encode"] == original["gflop_per_pair_encode"]
    assert ours["gflop_per_pair_unet"] == lora["gflop_per_pair_unet"] < original["gflop_per_pair_unet"]


def test_cpu_attention_is_counted():
    bench = load_bench()
    bench.register_cpu_attention_flops()
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * 2 * (2 * 16 * 16 * 8)  # QK^T and AV, 2 FLOPs per MAC


@pytest.mark.slow
def test_variants_run_in_their_own_processes(tmp_path):
    """The real path: one interpreter per variant, memory read from each child's rusage (~10-20 s)."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCH),
            *DEMO_ARGS,
            "--warmup",
            "0",
            "--no-flops",
            "--variants",
            "ours",
            "original",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    assert report["memory_isolated"] is True
    for variant in ("ours", "original"):
        assert report[variant]["peak_mem_mb"] > report[variant]["baseline_rss_mb"] > 0
    assert report["ratios"]["ours_over_original_mem"] > 0


def test_compile_time_is_reported_apart_from_the_step_time(demo_report):
    for variant in VARIANTS:
        result = demo_report[variant]
        assert result["first_step_seconds"] > 0 and result["steady_step_seconds"] > 0, variant
        # the trainer never compiles on a CPU; a compiled step would report first minus steady here
        assert result["compiled"] is (variant == "ours" and torch.cuda.is_available())
        assert (result["compile_seconds"] is None) is not result["compiled"]
    assert demo_report["compile"] is True


def test_ours_runs_the_trainers_own_step(tmp_path, monkeypatch):
    """`ours` times prefalign.training.policy.DPOStep itself: every warm-up, timed and FLOP-counting step."""
    from prefalign.training import policy

    called = []
    trainer_step = policy.DPOStep.__call__

    def counted(self, step):
        called.append(step)
        return trainer_step(self, step)

    monkeypatch.setattr(policy.DPOStep, "__call__", counted)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        load_bench().main([*DEMO_ARGS, "--warmup", "1", "--variants", "ours", "--in-process", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert called == [0, 1, 2]  # warm-up, timed, FLOP count: consecutive trainer steps
    assert json.loads(out.read_text())["ours"]["gflop_per_pair_unet"] > 0
