"""The GX gate on a real dataset folder, with the repo's own thresholds (params.yaml ``validation``).

``pytest tests/data --data-path data/preferences`` checks a dataset; on a fresh clone (no data) the
test is skipped, so CI stays green without DVC-pulled data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prefalign.config import load_config
from prefalign.data.validation import validate_preferences

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.data
def test_dataset_passes_the_validation_suite(data_path: Path, tmp_path: Path) -> None:
    if not data_path.exists():
        pytest.skip(f"no canonical dataset at {data_path} (run `dvc pull` or the ingest stage, or pass --data-path)")
    cfg = load_config(REPO / "params.yaml")
    report = validate_preferences(data_path, cfg.validation, report_path=tmp_path / "validation.json", data=cfg.data)
    assert report.success, "dataset failed validation:\n" + "\n".join(report.failures())
