"""Importers of real preference data into the canonical folder (docs/design.md, "Canonical data").

One module per format (:mod:`.pickapic`, :mod:`.hpd`, :mod:`.jsonl`), the shared machinery in
:mod:`.common` and :mod:`.images`, and one entry point, :func:`import_preferences`, which the
``prefalign data import`` command calls. The formats are documented in docs/data_formats.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefalign.config import DataConfig, Validation
from prefalign.data.importers.common import ImportSession, ImportSummary
from prefalign.data.importers.errors import ImportAbortedError
from prefalign.data.importers.hpd import import_hpd
from prefalign.data.importers.jsonl import import_jsonl
from prefalign.data.importers.pickapic import import_pickapic

log = logging.getLogger(__name__)

IMPORTERS: dict[str, Callable[[Path, ImportSession], None]] = {
    "pickapic": import_pickapic,
    "hpd": import_hpd,
    "jsonl": import_jsonl,
}
FORMATS = tuple(IMPORTERS)

__all__ = ["FORMATS", "IMPORTERS", "ImportAbortedError", "ImportSummary", "import_preferences"]


def import_preferences(
    fmt: str, input_path: Path, output_dir: Path, *, data: DataConfig, validation: Validation
) -> ImportSummary:
    """Import ``input_path`` (format ``fmt``) into the canonical folder ``output_dir``, append-only.

    Args:
        fmt: One of :data:`FORMATS`.
        input_path: A Pick-a-Pic shard or folder of shards, an HPD JSON file or a JSONL file.
        output_dir: The canonical folder; created if absent, appended to if it holds data.
        data: Split fractions (``split_train``, ``split_val``).
        validation: Image side and prompt length bounds.

    Returns:
        What was read, imported, found duplicate, skipped and quarantined (and why).

    Raises:
        ValueError: an unknown format.
        ImportAbortedError: the input is missing or nothing of it is readable, or the output folder
            holds a table that cannot be read; nothing is written then.
    """
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown import format {fmt!r}; formats: {', '.join(FORMATS)}")
    input_path = Path(input_path)
    if not input_path.exists():
        raise ImportAbortedError(f"{input_path}: input not found")
    session = ImportSession(Path(output_dir), source=fmt, input_path=input_path, data=data, validation=validation)
    IMPORTERS[fmt](input_path, session)
    return session.finish()
