"""Process set-up for entrypoints (CLI, flows, tests): logging and offline/telemetry defaults.

Only entrypoints call these; importing the library changes nothing in the process.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

# Every tool here phones home or tries the hub unless told not to (docs/design.md, "Offline").
# Note DO_NOT_TRACK must be the literal "true": MLflow ignores "1".
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_defaults() -> None:
    """Set the offline and no-telemetry switches, keeping any value the user already set."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def configure_logging(level: int = logging.INFO) -> None:
    """Readable logs for prefalign; quieter third-party loggers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("great_expectations", "alembic", "urllib3", "mlflow", "httpx", "botocore", "diffusers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit_json(payload: dict, path: Path | None = None) -> str:
    """Print ``payload`` as indented JSON (a benchmark's or probe's result) and also write it to ``path``.

    Returns:
        The JSON text.
    """
    text = json.dumps(payload, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text
