"""The canonical tables of ``data/preferences/`` and its content-addressed image store.

A canonical folder holds ``pairs.parquet``, ``rankings.parquet``, ``feedback.parquet`` and
``quarantine.parquet`` (docs/design.md, "Canonical data") plus ``images/<sha[:2]>/<sha>.<ext>``.
Rows name images by the sha256 of their stored bytes, never by position, so tables and images can be
merged, re-imported and DVC-versioned without renumbering anything.

Non-nullable fields are required values; nullable fields (``model_w``, ``model_l``, ``annotator``,
``created_at``) may be null and may be left out of a frame given to ``write_table``, which adds them
as nulls, so every file on disk carries the full column set.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_STR = pa.string()

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", _STR, nullable=False),
        pa.field("prompt", _STR, nullable=False),
        pa.field("image_w", _STR, nullable=False),
        pa.field("image_l", _STR, nullable=False),
        pa.field("label", pa.float64(), nullable=False),  # 1.0: image_w preferred; 0.5: tie
        pa.field("source", _STR, nullable=False),
        pa.field("split", _STR, nullable=False),
        pa.field("model_w", _STR),
        pa.field("model_l", _STR),
        pa.field("annotator", _STR),  # keyed hash, never the person's id
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
RANKINGS_SCHEMA = pa.schema(
    [
        pa.field("ranking_id", _STR, nullable=False),
        pa.field("prompt", _STR, nullable=False),
        pa.field("images", pa.list_(_STR), nullable=False),  # best first
        pa.field("source", _STR, nullable=False),
        pa.field("split", _STR, nullable=False),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("feedback_id", _STR, nullable=False),
        pa.field("prompt", _STR, nullable=False),
        pa.field("image", _STR, nullable=False),
        pa.field("desirable", pa.bool_(), nullable=False),
        pa.field("source", _STR, nullable=False),
        pa.field("split", _STR, nullable=False),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file", _STR, nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("reason", _STR, nullable=False),
    ]
)

TABLE_FILES = {
    "pairs": "pairs.parquet",
    "rankings": "rankings.parquet",
    "feedback": "feedback.parquet",
    "quarantine": "quarantine.parquet",
}
SCHEMAS = {
    "pairs": PAIRS_SCHEMA,
    "rankings": RANKINGS_SCHEMA,
    "feedback": FEEDBACK_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
}


def empty_table(schema: pa.Schema) -> pd.DataFrame:
    """A zero-row frame with the schema's columns and dtypes."""
    return schema.empty_table().to_pandas()


def _arrow_column(series: pd.Series, field: pa.Field, path: Path) -> pa.Array:
    try:
        array = pa.array(series, type=field.type, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: column {field.name!r} cannot be stored as {field.type}: {err}") from None
    if not field.nullable and array.null_count:
        raise ValueError(f"{path}: column {field.name!r} has {array.null_count} null value(s) but is required")
    return array


def write_table(df: pd.DataFrame, path: Path, schema: pa.Schema) -> None:
    """Check ``df`` against ``schema`` and write it as parquet, atomically.

    Columns are reordered to the schema; absent nullable columns are added as nulls. The file appears
    complete or not at all (temp file in the same folder, then ``os.replace``), so a crash never leaves
    a truncated table behind for DVC to hash.

    Raises:
        ValueError: a required column is missing, an unknown column is present, a value cannot be
            cast to its field's type, or a required field holds nulls; the message names the file.
    """
    path = Path(path)
    missing = [f.name for f in schema if f.name not in df.columns and not f.nullable]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise ValueError(f"{path}: columns do not match the schema (missing {missing}, unexpected {extra})")
    arrays = [
        _arrow_column(df[f.name], f, path) if f.name in df.columns else pa.nulls(len(df), type=f.type) for f in schema
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("wrote %d rows to %s", len(df), path)


def read_table(path: Path, schema: pa.Schema) -> pd.DataFrame:
    """Read a canonical table, cast to ``schema``; unknown extra columns are dropped.

    Raises:
        ValueError: the file is missing or not readable parquet, a schema column is missing, or a
            column cannot be cast; the message names the file.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: not a readable parquet file: {err}") from None
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    # Nullability is checked on write and by the GX gate; casting only fixes types here.
    loose = pa.schema([f.with_nullable(True) for f in schema])
    try:
        table = table.select(schema.names).cast(loose)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise ValueError(f"{path}: columns do not have the schema's types: {err}") from None
    return table.to_pandas()


# ------------------------------------------------------------------------------------------ image store
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class ImageStore:
    """Content-addressed images under ``root/images/<sha[:2]>/<sha>.<ext>``.

    The sha256 is of the stored bytes, so storing the same image twice is a no-op and a row that
    names a sha names exactly one image, whoever wrote it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"

    def _target(self, sha: str, ext: str) -> Path:
        return self.images_dir / sha[:2] / f"{sha}.{ext}"

    def put_bytes(self, data: bytes, ext: str) -> str:
        """Store encoded image bytes as they are; returns their sha256 (idempotent)."""
        ext = ext.lower().lstrip(".")
        if not _EXT.match(ext):
            raise ValueError(f"image extension {ext!r} must be 1-8 lowercase letters or digits")
        sha = hashlib.sha256(data).hexdigest()
        if sha in self:
            return sha
        target = self._target(sha, ext)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return sha

    def put_array(self, arr: np.ndarray) -> str:
        """Store a uint8 ``(H, W, 3)`` RGB array as a lossless PNG; returns its sha256.

        The encoder settings are fixed and PNG carries no timestamp, so one array always gives the
        same bytes (and sha) with a given Pillow/zlib.
        """
        from PIL import Image

        arr = np.asarray(arr)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(
            buffer, format="PNG", optimize=False, compress_level=6
        )
        return self.put_bytes(buffer.getvalue(), "png")

    def path(self, sha: str) -> Path:
        """The stored file of ``sha``, whatever its extension.

        Raises:
            KeyError: no image with this sha is stored.
        """
        if isinstance(sha, str) and _SHA.match(sha):
            for candidate in sorted((self.images_dir / sha[:2]).glob(f"{sha}.*")):
                if not candidate.name.endswith(".tmp"):
                    return candidate
        raise KeyError(f"image {sha!r} not in store {self.images_dir}")

    def load_array(self, sha: str) -> np.ndarray:
        """Decode the image ``sha`` as a uint8 ``(H, W, 3)`` RGB array."""
        from PIL import Image

        with Image.open(self.path(sha)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()

    def index(self) -> dict[str, Path]:
        """Every stored sha and its file, from one scan of the store (for bulk checks)."""
        found: dict[str, Path] = {}
        if self.images_dir.is_dir():
            for file in self.images_dir.glob("??/*.*"):
                sha = file.name.split(".", 1)[0]
                if _SHA.match(sha) and not file.name.endswith(".tmp"):
                    found.setdefault(sha, file)
        return found

    def __contains__(self, sha: object) -> bool:
        try:
            self.path(sha)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True
