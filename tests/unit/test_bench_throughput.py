"""benchmarks/bench_throughput.py runs the pipeline's own featurize and sampler on a preset, end to end."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks/bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_featurize_and_evaluation_throughput_on_sd_mini(tmp_path):
    out = tmp_path / "throughput.json"
    _bench().main(
        ["--preset", "sd-mini", "--images", "6", "--featurize-batch", "4", "--eval-images", "2"]
        + ["--eval-batch", "2", "--eval-steps", "2", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["resolution"] == 128 and report["device"] == "cpu"
    assert report["featurize"]["images"] == 6 and report["featurize"]["images_per_s"] > 0
    assert report["evaluate"]["images"] == 2 and report["evaluate"]["steps"] == 2
