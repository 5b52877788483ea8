"""Pick-a-Pic v2 parquet shards as published: one row is one pairwise judgement of two JPEGs.

``label_0 = 1`` means ``jpg_0`` won, ``label_0 = 0`` that ``jpg_1`` won and ``0.5 / 0.5`` a tie
(kept in source order: image_w is jpg_0). Rows with ``has_label`` false are skipped and counted.
Shards are streamed in record batches, so memory holds one batch of images at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from prefalign.data.importers.common import ImportSession, PendingRow, annotator_of, to_utc
from prefalign.data.importers.errors import FileRejected, ImportAbortedError, RowRejected, RowSkipped
from prefalign.data.prepare import TIE_LABEL

log = logging.getLogger(__name__)

SOURCE = "pickapic"
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label")
OPTIONAL_COLUMNS = ("model_0", "model_1", "user_id", "created_at")
# Real rows carry two ~0.5 MB JPEGs: 32 rows is ~32 MB of image bytes in memory at a time.
BATCH_ROWS = 32
VALID_LABELS = (0.0, TIE_LABEL, 1.0)


def shard_paths(input_path: Path) -> list[Path]:
    """The shards to import: the file itself, or the folder's ``*.parquet`` files in sorted order.

    Raises:
        ImportAbortedError: a folder without parquet files.
    """
    if input_path.is_file():
        return [input_path]
    shards = sorted(p for p in input_path.glob("*.parquet") if p.is_file())
    if not shards:
        raise ImportAbortedError(f"{input_path}: no *.parquet files in this folder")
    return shards


def import_pickapic(input_path: Path, session: ImportSession) -> None:
    """Import every shard of ``input_path`` into the session; unreadable shards are quarantined whole."""
    for shard in shard_paths(input_path):
        _import_shard(shard, session)


def _open_shard(path: Path) -> tuple[pq.ParquetFile, list[str]]:
    """The opened shard and the columns to read from it.

    Raises:
        FileRejected: empty, not parquet, or missing a required column.
    """
    if path.stat().st_size == 0:
        raise FileRejected("unreadable file", "the file is empty (0 bytes)")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise FileRejected("unreadable file", f"not a readable parquet file: {err}") from None
    names = set(parquet.schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise FileRejected("missing columns", f"required Pick-a-Pic column(s) {missing} are absent")
    return parquet, [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names]


def _import_shard(path: Path, session: ImportSession) -> None:
    try:
        parquet, columns = _open_shard(path)
    except FileRejected as err:
        session.file_unreadable(path, err)
        return
    session.file_opened(path)
    row_index = 0
    with tqdm(total=parquet.metadata.num_rows, desc=path.name, unit="row", disable=None) as progress:
        try:
            for batch in _read_batches(parquet, columns):
                for values in batch.to_pylist():
                    with session.row(path, row_index) as pending:
                        _import_row(values, pending, session)
                    row_index += 1
                progress.update(batch.num_rows)
        except FileRejected as err:
            # Rows before the damage are kept; the rest of the shard is one quarantine row.
            session.file_unreadable(path, FileRejected(err.category, f"stopped at row {row_index}: {err.detail}"))


def _read_batches(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The shard's record batches, created_at in UTC.

    Only reading is guarded here: an error while importing a row (a full disk under the image store)
    must stop the import, not be mistaken for a damaged shard.

    Raises:
        FileRejected: the shard's data cannot be read or decoded.
    """
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = _utc_timestamps(next(batches))
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as err:
            raise FileRejected("unreadable file", str(err)) from None
        yield batch


def _utc_timestamps(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``created_at`` as UTC microseconds (naive values are UTC), converted by Arrow for the whole batch.

    Pick-a-Pic stores naive nanosecond timestamps; converting them one by one through pandas cost
    about as much per row as decoding a thumbnail.
    """
    index = batch.schema.get_field_index("created_at")
    if index < 0 or not pa.types.is_timestamp(batch.schema.field(index).type):
        return batch
    utc = batch.column(index).cast(pa.timestamp("us", tz="UTC"), safe=False)  # drops sub-microseconds
    return batch.set_column(index, "created_at", utc)


def _import_row(row: dict[str, Any], pending: PendingRow, session: ImportSession) -> None:
    if row["has_label"] is not True:
        raise RowSkipped("unlabeled")
    prompt = session.prompt(row["caption"])
    label_0 = _labels(row["label_0"], row["label_1"])
    first = session.image(_image_bytes(row["jpg_0"]), "jpg_0")
    second = session.image(_image_bytes(row["jpg_1"]), "jpg_1")
    model_0, model_1 = row.get("model_0"), row.get("model_1")
    if label_0 == 0.0:  # jpg_1 won
        first, second, model_0, model_1 = second, first, model_1, model_0
    label = TIE_LABEL if label_0 == TIE_LABEL else 1.0
    pending.add_pair(
        prompt,
        first,
        second,
        label,
        model_w=model_0,
        model_l=model_1,
        annotator=annotator_of(row.get("user_id")),
        created_at=to_utc(row.get("created_at")),
    )


def _labels(label_0: object, label_1: object) -> float:
    """``label_0`` once the pair of labels is known to be one of (1, 0), (0, 1), (0.5, 0.5).

    Raises:
        RowRejected: a label is missing, NaN, outside {0, 0.5, 1}, or the two do not sum to 1.
    """
    shown = f"label_0={label_0!r}, label_1={label_1!r}"
    try:
        first, second = float(label_0), float(label_1)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RowRejected("invalid label", f"{shown}: labels must be numbers") from None
    if math.isnan(first) or math.isnan(second):
        raise RowRejected("invalid label", f"{shown}: NaN label on a row marked has_label")
    if first not in VALID_LABELS or second not in VALID_LABELS:
        raise RowRejected("invalid label", f"{shown}: each label must be 0, 0.5 or 1")
    if first + second != 1.0:
        raise RowRejected("invalid label", f"{shown}: labels sum to {first + second}, not 1")
    return first


def _image_bytes(value: object) -> object:
    # Hugging Face `Image` features store a struct {bytes, path}; the published shards store raw bytes.
    if isinstance(value, dict):
        return value.get("bytes")
    return value
