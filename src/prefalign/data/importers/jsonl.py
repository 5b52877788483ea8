"""prefalign's own JSONL format for teams' preference logs: one pair, ranking or feedback per line.

Each line is checked against ``jsonl.schema.json`` (shipped in this package, documented in
docs/data_formats.md) before anything else; images are paths relative to the file's folder or
inline base64. A ranking also yields the pairs it implies, exactly as an HPD ``rank`` record does.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefalign.data.importers.common import ImportSession, PendingRow, annotator_of, to_utc
from prefalign.data.importers.errors import FileRejected, ImportAbortedError, RowRejected
from prefalign.data.importers.images import resolve_inside

log = logging.getLogger(__name__)

SOURCE = "jsonl"
SCHEMA_FILE = "jsonl.schema.json"


@cache
def record_validator() -> Any:
    """The JSON Schema validator of one line (``jsonl.schema.json``), built once."""
    from jsonschema import Draft202012Validator

    schema = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def import_jsonl(input_path: Path, session: ImportSession) -> None:
    """Import every non-blank line of ``input_path``; source_row is the 0-based line number."""
    if not input_path.is_file():
        raise ImportAbortedError(f"{input_path}: expected a JSONL file, not a folder")
    try:
        size = input_path.stat().st_size
        handle = input_path.open("rb")
    except OSError as err:
        session.file_unreadable(input_path, FileRejected("unreadable file", str(err)))
        return
    with handle:
        if size == 0:
            session.file_unreadable(input_path, FileRejected("unreadable file", "the file is empty (0 bytes)"))
            return
        session.file_opened(input_path)
        base_dir = input_path.parent
        with tqdm(total=size, desc=input_path.name, unit="B", unit_scale=True, disable=None) as progress:
            for line_number, raw in enumerate(handle):
                progress.update(len(raw))
                if not raw.strip():
                    continue  # blank lines (a trailing newline, spacing) are not records
                with session.row(input_path, line_number) as pending:
                    _import_line(raw, base_dir, pending, session)


def _parse(raw: bytes) -> dict[str, Any]:
    """One line as a JSON object that satisfies the schema.

    Raises:
        RowRejected: not UTF-8 JSON, or a schema violation (the message names the field).
    """
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RowRejected("invalid JSON", f"the line is not UTF-8: {err}") from None
    except json.JSONDecodeError as err:
        raise RowRejected("invalid JSON", f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RowRejected("invalid JSON", "nested too deeply to parse") from None
    from jsonschema.exceptions import best_match

    error = best_match(record_validator().iter_errors(record))
    if error is not None:
        where = error.json_path if error.absolute_path else "the record"
        raise RowRejected("schema violation", f"{where}: {error.message:.200}")
    return record


def _import_line(raw: bytes, base_dir: Path, pending: PendingRow, session: ImportSession) -> None:
    record = _parse(raw)
    prompt = session.prompt(record["prompt"])
    kind = record["type"]
    if kind == "pair":
        image_w, image_l = _images([record["image_w"], record["image_l"]], ["image_w", "image_l"], base_dir, session)
        pending.add_pair(
            prompt,
            image_w,
            image_l,
            float(record.get("label", 1.0)),
            model_w=record.get("model_w"),
            model_l=record.get("model_l"),
            annotator=annotator_of(record.get("annotator")),
            created_at=to_utc(record.get("created_at")),
        )
    elif kind == "ranking":
        names = [f"images[{i}]" for i in range(len(record["images"]))]
        images = _images(record["images"], names, base_dir, session)
        pending.add_ranked(prompt, images, list(range(len(images))))
    else:
        (image,) = _images([record["image"]], ["image"], base_dir, session)
        pending.add_feedback(prompt, image, record["desirable"])


def _images(specs: list[str | dict[str, str]], names: list[str], base_dir: Path, session: ImportSession) -> list[str]:
    """Store the images a record names; every path is checked (and base64 decoded) before any file is read."""
    located = [_locate(spec, name, base_dir) for spec, name in zip(specs, names, strict=True)]
    return [
        session.image_file(source, name) if isinstance(source, Path) else session.image(source, name)
        for source, name in zip(located, names, strict=True)
    ]


def _locate(spec: str | dict[str, str], what: str, base_dir: Path) -> Path | bytes:
    """The safe file path of a path image, or the decoded bytes of a base64 image.

    Raises:
        RowRejected: an unsafe path or invalid base64.
    """
    if isinstance(spec, dict) and "base64" in spec:
        try:
            return base64.b64decode(spec["base64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise RowRejected("unreadable image", f"{what} is not valid base64: {err}") from None
    return resolve_inside(base_dir, spec["path"] if isinstance(spec, dict) else spec, what)
