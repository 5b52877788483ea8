"""The ingest stage on a team's own feedback (``data.source: jsonl``), then the validation gate on it."""

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prefalign.config import load_config
from prefalign.stages import DataValidationError, run_stage

ROOT = Path(__file__).resolve().parents[2]


def _png(rng: np.random.Generator) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def team_root(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    source = tmp_path / "data" / "source"
    source.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [
        {
            "type": "pair",
            "prompt": f"a product photo number {i}",
            "image_w": {"base64": _png(rng)},
            "image_l": {"base64": _png(rng)},
            "annotator": f"user-{i % 7}",
        }
        for i in range(40)
    ]
    lines.append({"type": "pair", "prompt": "   ", "image_w": {"base64": _png(rng)}, "image_l": {"base64": _png(rng)}})
    (source / "feedback.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return tmp_path


def _cfg(root: Path, **extra):
    return load_config(
        root / "params.yaml", {"data.source": "jsonl", "validation.min_pairs": 10, "tracking.enabled": False, **extra}
    )


def test_ingest_imports_the_source_folder_and_the_gate_passes(team_root):
    cfg = _cfg(team_root)
    summary = run_stage("ingest", cfg)
    assert summary["imported_pairs"] == 40 and summary["quarantined"] == 1
    prefs = team_root / "data" / "preferences"
    pairs = pd.read_parquet(prefs / "pairs.parquet")
    assert len(pairs) == 40 and set(pairs.source) == {"jsonl"}
    assert not pairs.annotator.str.startswith("user-").any()
    assert len(pd.read_parquet(prefs / "quarantine.parquet")) == 1
    assert run_stage("validate", cfg)["success"]


def test_gate_stops_a_source_with_too_much_quarantined(team_root):
    cfg = _cfg(team_root, **{"validation.max_quarantine_fraction": 0.01})
    run_stage("ingest", cfg)
    with pytest.raises(DataValidationError, match="quarantine_fraction"):
        run_stage("validate", cfg)


def test_single_file_formats_need_exactly_one_file(team_root):
    shutil.copy(team_root / "data" / "source" / "feedback.jsonl", team_root / "data" / "source" / "more.jsonl")
    with pytest.raises(ValueError, match="exactly one"):
        run_stage("ingest", _cfg(team_root))
