"""Options of the data-quality tests: ``pytest tests/data --data-path PATH`` checks a real dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_PATH = REPO / "data" / "preferences"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-path",
        action="store",
        default=str(DEFAULT_DATA_PATH),
        help="Canonical preference folder checked by tests/data/test_dataset_quality.py "
        "(default: data/preferences under the repo; the test is skipped when it does not exist).",
    )


@pytest.fixture(scope="session")
def data_path(request: pytest.FixtureRequest) -> Path:
    # getoption's default covers runs where this conftest was not an initial one (option unregistered).
    return Path(request.config.getoption("--data-path", default=str(DEFAULT_DATA_PATH))).expanduser().resolve()
