"""What every importer shares: the import session, row bookkeeping, append-only tables, the summary.

A format module only walks its input and, for each row, calls ``session.row(file, index)`` and adds
pairs, rankings or feedback to the :class:`PendingRow` it yields. The session does the rest:

- A row is atomic: what it added is kept only if the whole row got through; a :class:`RowRejected`
  raised anywhere inside it becomes exactly one quarantine row, a :class:`RowSkipped` one count.
- Every id already in the output folder, or seen earlier in this input, is a duplicate: counted,
  never written twice, and existing rows are never changed (append-only, as ``prepare.dedupe_pairs``).
- New rows are buffered as Arrow record batches (compact, unlike Python dicts) and the tables are
  written once, atomically, by :meth:`ImportSession.finish`; images are stored as they are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from prefalign.config import DataConfig, Validation
from prefalign.data.importers.errors import FileRejected, ImportAbortedError, RowRejected, RowSkipped
from prefalign.data.importers.images import ImageIngest, IndexedImageStore, resolve_inside
from prefalign.data.prepare import TIE_LABEL, assign_split, pair_id
from prefalign.data.pseudonym import pseudonymise
from prefalign.data.schema import (
    FEEDBACK_SCHEMA,
    PAIRS_SCHEMA,
    QUARANTINE_SCHEMA,
    RANKINGS_SCHEMA,
    TABLE_FILES,
    read_table,
    write_table,
)

log = logging.getLogger(__name__)

WHOLE_FILE_ROW = -1  # source_row of a quarantine row that stands for a whole unreadable file
TABLE_NAMES = ("pairs", "rankings", "feedback")
# New rows are moved from Python dicts into an Arrow batch this often, to keep per-row memory small.
BUFFER_ROWS = 10_000
# Prompts whose split is remembered (hashing is cheap, but a prompt has many pairs); bounds memory.
SPLIT_CACHE_PROMPTS = 200_000


# ---------------------------------------------------------------------------------------------- summary
@dataclass
class ImportSummary:
    """What one import did. Every input row is counted once in ``read`` and ends as imported rows,
    duplicates, skipped or quarantined; ``reasons`` counts quarantine rows by problem category."""

    format: str
    input: str
    output: str
    files_read: int = 0
    files_unreadable: int = 0
    read: int = 0
    imported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_NAMES, 0))
    duplicates: int = 0
    ties: int = 0
    skipped: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_imported(self) -> int:
        """New rows over the three tables."""
        return sum(self.imported.values())

    @property
    def status(self) -> str:
        """``imported`` (something new), ``up to date`` (all of it already present) or ``nothing imported``."""
        if self.total_imported:
            return "imported"
        return "up to date" if self.duplicates else "nothing imported"

    @property
    def exit_code(self) -> int:
        """0 when something was imported or everything was already present, 1 when nothing was importable."""
        return 1 if self.status == "nothing imported" else 0

    def line(self) -> str:
        """One readable line for a person."""
        imported = ", ".join(f"{n} {name}" for name, n in self.imported.items())
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        quarantine = f"{self.quarantined} quarantined" + (f" ({reasons})" if reasons else "")
        return (
            f"{self.status}: {imported} from {self.read} {self.format} row(s) in {self.files_read} file(s) "
            f"into {self.output}; {self.duplicates} duplicate(s), {self.ties} tie(s), "
            f"{self.skipped} skipped, {quarantine}; {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``status``."""
        return {**asdict(self), "status": self.status}


# ------------------------------------------------------------------------------------------- row helpers
def clean_prompt(raw: object, *, max_chars: int) -> str:
    """The prompt with surrounding whitespace stripped.

    Raises:
        RowRejected: not a string, empty or whitespace-only, or longer than ``max_chars``.
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        raise RowRejected("empty prompt", "the prompt is missing")
    if not isinstance(raw, str):
        raise RowRejected("invalid record", f"the prompt is a {type(raw).__name__}, not text")
    prompt = raw.strip()
    if not prompt:
        raise RowRejected("empty prompt", f"the prompt is empty or whitespace-only ({raw!r})")
    if len(prompt) > max_chars:
        raise RowRejected(
            "prompt too long", f"{len(prompt)} characters, above validation.max_prompt_chars={max_chars}"
        )
    return prompt


def to_utc(value: object) -> datetime | None:
    """A timestamp as a UTC ``datetime`` (naive input is taken to be UTC); None stays None.

    Raises:
        RowRejected: the value is not a date-time.
    """
    if value is None:
        return None
    if isinstance(value, datetime) and not isinstance(value, pd.Timestamp):  # the common case, kept cheap
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError) as err:
        raise RowRejected("invalid timestamp", f"created_at {value!r} is not a date-time: {err}") from None
    if stamp is pd.NaT:
        return None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("us").to_pydatetime()


def annotator_of(raw_id: object) -> str | None:
    """The keyed hash of an annotator id (never the id itself); None when there is no id."""
    if raw_id is None or (isinstance(raw_id, float) and math.isnan(raw_id)) or raw_id == "":
        return None
    return pseudonymise(str(raw_id))


def _optional_text(value: object) -> str | None:
    # A source may type model names as numbers; a non-string here would only fail at the final write.
    return None if value is None else str(value)


def content_id(*fields: object) -> str:
    """sha256 of the JSON list of ``fields``: a deterministic id for rankings and feedback."""
    return hashlib.sha256(json.dumps(list(fields), ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------- table buffers
class TableAppender:
    """One canonical table of the output folder: what it already holds, and the new rows for it.

    Args:
        path: The parquet file (absent means empty).
        schema: Its canonical schema.
        key_columns: The columns that identify a row; a row whose key is known is a duplicate.

    Raises:
        ImportAbortedError: the existing file cannot be read as this table.
    """

    def __init__(self, path: Path, schema: pa.Schema, key_columns: tuple[str, ...]) -> None:
        self.path = path
        self.schema = schema
        self.key_columns = key_columns
        self.existing = self._read_existing()
        self._known: set[Hashable] = self._existing_keys()
        self._pending: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self.added = 0

    def _read_existing(self) -> pd.DataFrame | None:
        if not self.path.exists():
            return None
        try:
            return read_table(self.path, self.schema)
        except ValueError as err:
            raise ImportAbortedError(f"cannot append to the existing table: {err}") from None

    def _existing_keys(self) -> set[Hashable]:
        if self.existing is None or not len(self.existing):
            return set()
        columns = [self.existing[c].tolist() for c in self.key_columns]
        return set(columns[0]) if len(columns) == 1 else set(zip(*columns, strict=True))

    def _key(self, row: dict[str, Any]) -> Hashable:
        if len(self.key_columns) == 1:
            return row[self.key_columns[0]]
        return tuple(row[c] for c in self.key_columns)

    def add(self, row: dict[str, Any]) -> bool:
        """Queue ``row`` unless its key is known; returns whether it was new."""
        key = self._key(row)
        if key in self._known:
            return False
        self._known.add(key)
        self._pending.append(row)
        self.added += 1
        if len(self._pending) >= BUFFER_ROWS:
            self._flush()
        return True

    def _flush(self) -> None:
        if self._pending:
            self._batches.append(pa.RecordBatch.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def write(self) -> None:
        """Write existing rows followed by the new ones, atomically; untouched when nothing is new."""
        self._flush()
        if not self.added and self.existing is not None:
            return
        new = pa.Table.from_batches(self._batches, schema=self.schema).to_pandas()
        if self.existing is None or not len(self.existing):
            combined = new
        elif not len(new):
            combined = self.existing
        else:
            combined = pd.concat([self.existing, new], ignore_index=True)
        write_table(combined, self.path, self.schema)
        log.info("%s: %d row(s), %d new", self.path, len(combined), self.added)
        self._batches = []


# -------------------------------------------------------------------------------------------- the session
class PendingRow:
    """What one input row adds, kept until the row is through (see :meth:`ImportSession.row`)."""

    def __init__(self, session: ImportSession) -> None:
        self._session = session
        self.items: list[tuple[str, dict[str, Any]]] = []

    def add_pair(
        self,
        prompt: str,
        image_w: str,
        image_l: str,
        label: float = 1.0,
        *,
        model_w: object = None,
        model_l: object = None,
        annotator: str | None = None,
        created_at: datetime | None = None,
    ) -> None:
        """A pairwise judgement; ``label`` 1.0 (image_w preferred) or 0.5 (tie, images in source order).

        Raises:
            RowRejected: both images are the same stored image.
        """
        if image_w == image_l:
            raise RowRejected("identical images", f"winner and loser are the same image (sha {image_w[:12]}…)")
        tie = label == TIE_LABEL
        self.items.append(
            (
                "pairs",
                {
                    "pair_id": pair_id(prompt, image_w, image_l, tie=tie),
                    "prompt": prompt,
                    "image_w": image_w,
                    "image_l": image_l,
                    "label": float(label),
                    "source": self._session.source,
                    "split": self._session.split_of(prompt),
                    "model_w": _optional_text(model_w),
                    "model_l": _optional_text(model_l),
                    "annotator": annotator,
                    "created_at": created_at,
                },
            )
        )

    def add_ranking(self, prompt: str, images: Sequence[str]) -> None:
        """A strict ranking, images best first.

        Raises:
            RowRejected: fewer than two images, or one image twice.
        """
        if len(images) < 2:
            raise RowRejected("invalid record", f"a ranking needs at least two images, got {len(images)}")
        if len(set(images)) != len(images):
            raise RowRejected("identical images", "the ranking lists the same stored image more than once")
        self.items.append(
            (
                "rankings",
                {
                    "ranking_id": content_id(prompt, list(images)),
                    "prompt": prompt,
                    "images": list(images),
                    "source": self._session.source,
                    "split": self._session.split_of(prompt),
                },
            )
        )

    def add_ranked(
        self, prompt: str, images: Sequence[str], ranks: Sequence[float], *, annotator: str | None = None
    ) -> None:
        """A ranked list given as one rank per image (lower is better) and the pairs it implies.

        Distinct ranks give a ranking row (best first); equal ranks give no ranking row, since a
        ranking is a strict order. Every i<j pair (in source order) becomes a pair: the better-ranked
        image wins, equal ranks are a tie (label 0.5) in source order.

        Raises:
            RowRejected: one image twice.
        """
        if len(set(images)) != len(images):
            raise RowRejected("identical images", "the record lists the same stored image more than once")
        if len(set(ranks)) == len(ranks):
            order = sorted(range(len(images)), key=lambda i: ranks[i])
            self.add_ranking(prompt, [images[i] for i in order])
        for i, j in combinations(range(len(images)), 2):
            if ranks[i] == ranks[j]:
                self.add_pair(prompt, images[i], images[j], TIE_LABEL, annotator=annotator)
            elif ranks[i] < ranks[j]:
                self.add_pair(prompt, images[i], images[j], annotator=annotator)
            else:
                self.add_pair(prompt, images[j], images[i], annotator=annotator)

    def add_feedback(self, prompt: str, image: str, desirable: bool) -> None:
        """Binary feedback on one image."""
        self.items.append(
            (
                "feedback",
                {
                    "feedback_id": content_id(prompt, image, bool(desirable)),
                    "prompt": prompt,
                    "image": image,
                    "desirable": bool(desirable),
                    "source": self._session.source,
                    "split": self._session.split_of(prompt),
                },
            )
        )


class ImportSession:
    """One import of one input into one canonical folder.

    Args:
        output_dir: The canonical folder (created if absent; existing data is appended to).
        source: The format name, stored in every row's ``source``.
        input_path: The input as given (for the summary and error messages).
        data: Split fractions.
        validation: Image side and prompt length bounds.

    Raises:
        ImportAbortedError: the output folder is a file or holds a table that cannot be read.
    """

    def __init__(
        self, output_dir: Path, *, source: str, input_path: Path, data: DataConfig, validation: Validation
    ) -> None:
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ImportAbortedError(f"{self.output_dir}: output exists and is not a folder")
        self.source = source
        self.data = data
        self.validation = validation
        self.tables = {
            "pairs": TableAppender(self.output_dir / TABLE_FILES["pairs"], PAIRS_SCHEMA, ("pair_id",)),
            "rankings": TableAppender(self.output_dir / TABLE_FILES["rankings"], RANKINGS_SCHEMA, ("ranking_id",)),
            "feedback": TableAppender(self.output_dir / TABLE_FILES["feedback"], FEEDBACK_SCHEMA, ("feedback_id",)),
        }
        # Identical quarantine rows (the same bad row imported twice) are kept once.
        self.quarantine = TableAppender(
            self.output_dir / TABLE_FILES["quarantine"], QUARANTINE_SCHEMA, ("source_file", "source_row", "reason")
        )
        self.ingest = ImageIngest(
            IndexedImageStore(self.output_dir), min_side=validation.min_image_side, max_side=validation.max_image_side
        )
        self.summary = ImportSummary(format=source, input=str(input_path), output=str(self.output_dir))
        self._reasons: Counter[str] = Counter()
        self._unreadable: list[str] = []
        self._splits: dict[str, str] = {}
        self._started = time.perf_counter()

    # -- helpers for format modules
    def split_of(self, prompt: str) -> str:
        """The prompt's split (cached: one prompt has many pairs)."""
        split = self._splits.get(prompt)
        if split is None:
            split = assign_split(prompt, train=self.data.split_train, val=self.data.split_val)
            if len(self._splits) < SPLIT_CACHE_PROMPTS:
                self._splits[prompt] = split
        return split

    def prompt(self, raw: object) -> str:
        """See :func:`clean_prompt`, with ``validation.max_prompt_chars``."""
        return clean_prompt(raw, max_chars=self.validation.max_prompt_chars)

    def image(self, data: object, what: str) -> str:
        """Check and store encoded image bytes; the stored sha (see :meth:`ImageIngest.put`)."""
        return self.ingest.put(data, what)

    def image_file(self, path: Path, what: str) -> str:
        """Check and store an image file already known to be safe (see :func:`resolve_inside`)."""
        return self.ingest.put_file(path, what)

    def image_files(self, base_dir: Path, paths: Sequence[object], what: str) -> list[str]:
        """Store the images that ``paths`` name inside ``base_dir``; their shas, in order.

        Every path is checked before any file is opened, so a record with one unsafe path reads nothing.
        """
        files = [resolve_inside(base_dir, p, f"{what}[{i}]") for i, p in enumerate(paths)]
        return [self.image_file(f, f"{what}[{i}]") for i, f in enumerate(files)]

    # -- row and file bookkeeping
    @contextmanager
    def row(self, source_file: Path | str, source_row: int) -> Iterator[PendingRow]:
        """Import one input row: yields a :class:`PendingRow` to add to; commits it when the block ends.

        A :class:`RowRejected` inside the block becomes one quarantine row and a :class:`RowSkipped`
        one skip; neither propagates, and nothing the row added is kept.
        """
        self.summary.read += 1
        pending = PendingRow(self)
        try:
            yield pending
        except RowSkipped:
            self.summary.skipped += 1
            return
        except RowRejected as err:
            self._quarantine(source_file, source_row, err.category, err.reason)
            return
        self._commit(pending)

    def file_opened(self, path: Path) -> None:
        """Count a file that could be opened (its rows follow)."""
        self.summary.files_read += 1
        log.info("importing %s", path)

    def file_unreadable(self, path: Path, err: FileRejected) -> None:
        """Quarantine a whole file (source_row -1); the import goes on with the next one."""
        self.summary.files_unreadable += 1
        self._unreadable.append(f"{path}: {err}")
        log.warning("%s: skipped the whole file: %s", path, err)
        self._quarantine(path, WHOLE_FILE_ROW, err.category, f"{err.category}: {err.detail}")

    def _quarantine(self, source_file: Path | str, source_row: int, category: str, reason: str) -> None:
        self.summary.quarantined += 1
        self._reasons[category] += 1
        self.quarantine.add({"source_file": str(source_file), "source_row": int(source_row), "reason": reason})
        log.debug("quarantined %s row %d: %s", source_file, source_row, reason)

    def _commit(self, pending: PendingRow) -> None:
        for table, row in pending.items:
            if self.tables[table].add(row):
                self.summary.imported[table] += 1
                if table == "pairs" and row["label"] == TIE_LABEL:
                    self.summary.ties += 1
            else:
                self.summary.duplicates += 1

    def finish(self) -> ImportSummary:
        """Write the tables (existing rows first, then the new ones) and return the summary.

        Raises:
            ImportAbortedError: no input file was readable at all; nothing is written then.
        """
        if not self.summary.files_read:
            detail = "; ".join(self._unreadable) or "no input file found"
            raise ImportAbortedError(f"{self.summary.input}: nothing readable ({detail})")
        (self.output_dir / "images").mkdir(parents=True, exist_ok=True)  # the store exists even when empty
        for appender in (*self.tables.values(), self.quarantine):
            appender.write()
        self.summary.reasons = dict(sorted(self._reasons.items()))
        self.summary.seconds = round(time.perf_counter() - self._started, 3)
        log.info("%s", self.summary.line())
        return self.summary
