"""HPD v2-style JSON: a list of records, each a prompt and several image paths with their judgement.

A record holds ``prompt``, ``image_path`` (paths relative to the JSON file's folder) and exactly one
of ``rank`` (the rank of each listed image, lower is better, as in HPD v2's test file) or
``human_preference`` (one 0/1 flag per image, 1 on the preferred one, as in its train file). A
``rank`` record gives a ranking (when its ranks are distinct) and the pairs it implies; a
``human_preference`` record gives the preferred image against each of the others. An optional
``user_hash`` becomes the (pseudonymised) annotator of the pairs.

The file is parsed whole (HPD ships one JSON list, not lines); images are read one record at a time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefalign.data.importers.common import ImportSession, PendingRow, annotator_of
from prefalign.data.importers.errors import FileRejected, ImportAbortedError, RowRejected

log = logging.getLogger(__name__)

SOURCE = "hpd"


def import_hpd(input_path: Path, session: ImportSession) -> None:
    """Import the records of the JSON file ``input_path``; an unreadable file is quarantined whole."""
    if not input_path.is_file():
        raise ImportAbortedError(f"{input_path}: expected the HPD JSON file, not a folder")
    try:
        records = _load_records(input_path)
    except FileRejected as err:
        session.file_unreadable(input_path, err)
        return
    session.file_opened(input_path)
    base_dir = input_path.parent
    for index, record in enumerate(tqdm(records, desc=input_path.name, unit="record", disable=None)):
        with session.row(input_path, index) as pending:
            _import_record(record, base_dir, pending, session)


def _load_records(path: Path) -> list[Any]:
    """The JSON list of records.

    Raises:
        FileRejected: empty, not UTF-8 JSON, or not a list.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FileRejected("unreadable file", f"cannot read the file as UTF-8 text: {err}") from None
    if not text.strip():
        raise FileRejected("unreadable file", "the file is empty")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileRejected("invalid JSON", f"{err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise FileRejected("invalid JSON", "nested too deeply to parse") from None
    if not isinstance(records, list):
        raise FileRejected("invalid JSON", f"expected a JSON list of records, got a {type(records).__name__}")
    return records


def _import_record(record: object, base_dir: Path, pending: PendingRow, session: ImportSession) -> None:
    if not isinstance(record, dict):
        raise RowRejected("invalid record", f"expected a JSON object, got {type(record).__name__}")
    prompt = session.prompt(record.get("prompt"))
    paths = record.get("image_path")
    if not isinstance(paths, list) or len(paths) < 2:
        raise RowRejected("invalid record", f"image_path must list at least two images, got {paths!r:.80}")
    if ("rank" in record) == ("human_preference" in record):
        raise RowRejected("invalid record", "a record needs exactly one of rank or human_preference")
    # Judgement fields are checked before any image is read: a bad record costs no decoding.
    if "rank" in record:
        ranks = _ranks(record["rank"], len(paths))
        images = session.image_files(base_dir, paths, "image_path")
        pending.add_ranked(prompt, images, ranks, annotator=annotator_of(record.get("user_hash")))
        return
    winner = _preferred_index(record["human_preference"], len(paths))
    images = session.image_files(base_dir, paths, "image_path")
    if len(set(images)) != len(images):
        raise RowRejected("identical images", "the record lists the same stored image more than once")
    annotator = annotator_of(record.get("user_hash"))
    for index, image in enumerate(images):
        if index != winner:
            pending.add_pair(prompt, images[winner], image, annotator=annotator)


def _ranks(value: object, n_images: int) -> list[int]:
    """One integer rank per image.

    Raises:
        RowRejected: not a list of integers as long as image_path.
    """
    if (
        not isinstance(value, list)
        or len(value) != n_images
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in value)
    ):
        raise RowRejected("invalid record", f"rank must list one integer per image ({n_images}), got {value!r:.80}")
    return value


def _preferred_index(value: object, n_images: int) -> int:
    """The index of the one image flagged 1.

    Raises:
        RowRejected: not one 0/1 flag per image with exactly one 1.
    """
    if (
        not isinstance(value, list)
        or len(value) != n_images
        or not all(v in (0, 1) and not isinstance(v, float | str) for v in value)
    ):
        raise RowRejected(
            "invalid record", f"human_preference must list one 0/1 flag per image ({n_images}), got {value!r:.80}"
        )
    winners = [i for i, v in enumerate(value) if v == 1]
    if len(winners) != 1:
        raise RowRejected("invalid record", f"human_preference must flag exactly one image, got {value!r:.80}")
    return winners[0]
