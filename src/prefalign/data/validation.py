"""The Great Expectations gate on a canonical preference folder (GX Core 1.x, imported lazily).

One suite is defined in code (``build_preference_suite``): a list of GX expectations, each tagged in
its ``meta`` with the frame it runs on. GX binds a suite to one batch, so at run time the list is
split by frame into GX suites ``prefalign_<frame>``, each run by its own Checkpoint (one pandas data
source, one dataframe asset per frame, whole-dataframe batches) that also renders Data Docs.

Frames:

- ``pairs``, ``rankings``, ``feedback``: the parquet tables as stored (rankings and feedback only
  when non-empty).
- ``prompts`` (derived): one row per prompt with the number of distinct splits it appears in across
  all three tables (``n_splits``); leakage between splits is ``n_splits > 1``, which
  ``ExpectColumnValuesToBeBetween(max_value=1)`` reports with the offending prompts.
- ``images`` (derived): one row per distinct referenced sha: ``exists`` in the store, ``decodes``
  with Pillow, ``width``/``height``; expectations on it name the offending shas.
- ``ranking_lists`` (derived): list length and distinct images per ranking.
- ``dataset`` (derived, one row): tie share and quarantine share, checked against the thresholds.

Failure lines name the file, the expectation and its column(s), and up to three offending rows: for
the stored tables, ``row N`` is the 0-based row position in the parquet file; derived frames show
their key (prompt, sha, ...). The JSON report keeps up to five offending rows per expectation.

A missing column is a *report* failure (``expect_table_columns_to_match_set``; expectations on that
column are listed as "could not run"), not an exception: the folder could be read, it is just
invalid. Only input that cannot be read at all raises ``DataUnreadableError``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from prefalign.config import DataConfig, Validation
from prefalign.data.prepare import SPLITS, assign_split, is_tie, split_counts
from prefalign.data.schema import (
    FEEDBACK_SCHEMA,
    PAIRS_SCHEMA,
    RANKINGS_SCHEMA,
    TABLE_FILES,
    ImageStore,
)

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

log = logging.getLogger(__name__)

DOCS_SITE = "prefalign_docs"  # the ephemeral context already owns "local_site"
MAX_EXAMPLES = 5
# Images up to this many pixels are fully decoded (cheap for thumbnails); larger ones get a header
# read plus Pillow's verify(), so a 20k-image store of real 1024 px images is still checked in seconds.
FULL_DECODE_MAX_PIXELS = 1024 * 1024
NUMERIC_TYPES = ["float64", "float32", "int64", "int32"]
SHA_REGEX = r"^[0-9a-f]{64}$"
RAW_FRAMES = ("pairs", "rankings", "feedback")
FRAME_LABELS = {
    "pairs": "pairs.parquet",
    "rankings": "rankings.parquet",
    "feedback": "feedback.parquet",
    "prompts": "prompts (derived)",
    "images": "images (derived)",
    "ranking_lists": "ranking lists (derived)",
    "dataset": "dataset (derived)",
}
# Columns that identify a row of a derived frame in reports (raw tables are identified by row index).
KEY_COLUMNS = {
    "prompts": ["prompt", "splits"],
    "images": ["sha", "referenced_by", "error"],
    "ranking_lists": ["ranking_id"],
    "dataset": ["n_pairs", "n_ties", "n_imported", "n_quarantined"],
}


class DataUnreadableError(ValueError):
    """The folder or one of its tables cannot be read at all (the CLI exits 2)."""


@dataclass
class ValidationReport:
    """What the gate found: overall success, one entry per expectation, statistics."""

    success: bool
    results: list[dict[str, Any]]
    statistics: dict[str, Any]
    docs_index: str | None = None
    folder: str | None = None

    def failures(self) -> list[str]:
        """One human-readable line per failed expectation, naming table, expectation and examples."""
        return [_failure_line(r) for r in self.results if not r["success"]]

    def to_json(self) -> str:
        """The report as JSON (NaN and numpy values made plain)."""
        return json.dumps(_jsonable(asdict(self)), indent=2, ensure_ascii=False)


def main_exit_code(report: ValidationReport) -> int:
    """Process exit code of a validation: 0 valid, 1 invalid (unreadable input is 2, by the caller)."""
    return 0 if report.success else 1


# --------------------------------------------------------------------------------------------- the suite
def _tag(table: str, why: str, expectation: Expectation) -> Expectation:
    expectation.meta = {"table": table, "why": why}
    return expectation


def _text_checks(gxe: Any, table: str, cfg: Validation) -> list[Expectation]:
    """Prompt and split checks shared by the three tables."""
    return [
        _tag(
            table,
            "prompt length in [1, max_prompt_chars]",
            gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1, max_value=cfg.max_prompt_chars),
        ),
        _tag(table, "prompt is not whitespace-only", gxe.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S")),
        _tag(table, "split is train, val or test", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS)),
    ]


def _not_null(gxe: Any, table: str, columns: Iterable[str]) -> list[Expectation]:
    return [_tag(table, f"{c} is never null", gxe.ExpectColumnValuesToNotBeNull(column=c)) for c in columns]


def _pairs_expectations(gxe: Any, cfg: Validation) -> list[Expectation]:
    t = "pairs"
    return [
        _tag(
            t,
            "exactly the canonical columns",
            gxe.ExpectTableColumnsToMatchSet(column_set=PAIRS_SCHEMA.names, exact_match=True),
        ),
        _tag(
            t,
            "row count in [min_pairs, max_pairs]",
            gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_pairs, max_value=cfg.max_pairs),
        ),
        *_not_null(gxe, t, ["pair_id", "prompt", "image_w", "image_l", "label", "source", "split"]),
        _tag(t, "label is numeric", gxe.ExpectColumnValuesToBeInTypeList(column="label", type_list=NUMERIC_TYPES)),
        _tag(
            t,
            "label is 1.0 (image_w preferred) or 0.5 (tie)",
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0.5, 1.0]),
        ),
        _tag(
            t,
            "winner and loser differ",
            gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=["image_w", "image_l"]),
        ),
        _tag(
            t, "no judgement twice", gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "image_w", "image_l"])
        ),
        _tag(t, "pair_id is unique", gxe.ExpectColumnValuesToBeUnique(column="pair_id")),
        *(
            _tag(t, f"{c} is a sha256", gxe.ExpectColumnValuesToMatchRegex(column=c, regex=SHA_REGEX))
            for c in ("image_w", "image_l")
        ),
        *_text_checks(gxe, t, cfg),
    ]


def _rankings_expectations(gxe: Any, cfg: Validation) -> list[Expectation]:
    t = "rankings"
    return [
        _tag(
            t,
            "exactly the canonical columns",
            gxe.ExpectTableColumnsToMatchSet(column_set=RANKINGS_SCHEMA.names, exact_match=True),
        ),
        *_not_null(gxe, t, ["ranking_id", "prompt", "images", "source", "split"]),
        _tag(t, "ranking_id is unique", gxe.ExpectColumnValuesToBeUnique(column="ranking_id")),
        *_text_checks(gxe, t, cfg),
        _tag(
            "ranking_lists",
            "a ranking orders at least two images",
            gxe.ExpectColumnValuesToBeBetween(column="n_images", min_value=2),
        ),
        _tag(
            "ranking_lists",
            "no image twice in one ranking",
            gxe.ExpectColumnPairValuesToBeEqual(column_A="n_images", column_B="n_distinct"),
        ),
    ]


def _feedback_expectations(gxe: Any, cfg: Validation) -> list[Expectation]:
    t = "feedback"
    return [
        _tag(
            t,
            "exactly the canonical columns",
            gxe.ExpectTableColumnsToMatchSet(column_set=FEEDBACK_SCHEMA.names, exact_match=True),
        ),
        *_not_null(gxe, t, ["feedback_id", "prompt", "image", "desirable", "source", "split"]),
        _tag(t, "feedback_id is unique", gxe.ExpectColumnValuesToBeUnique(column="feedback_id")),
        _tag(
            t,
            "desirable is boolean",
            gxe.ExpectColumnValuesToBeInTypeList(column="desirable", type_list=["bool", "boolean"]),
        ),
        _tag(t, "image is a sha256", gxe.ExpectColumnValuesToMatchRegex(column="image", regex=SHA_REGEX)),
        *_text_checks(gxe, t, cfg),
    ]


def _derived_expectations(gxe: Any, cfg: Validation, data: DataConfig | None) -> list[Expectation]:
    side = {"min_value": cfg.min_image_side, "max_value": cfg.max_image_side}
    checks = [
        _tag(
            "prompts",
            "a prompt is in one split only (no leakage)",
            gxe.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),
        ),
        _tag(
            "images",
            "referenced image is in the store",
            gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
        ),
        _tag("images", "stored image decodes", gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True])),
        _tag(
            "images",
            "image width in [min_image_side, max_image_side]",
            gxe.ExpectColumnValuesToBeBetween(column="width", **side),
        ),
        _tag(
            "images",
            "image height in [min_image_side, max_image_side]",
            gxe.ExpectColumnValuesToBeBetween(column="height", **side),
        ),
        _tag(
            "dataset",
            "tie share <= max_tie_fraction",
            gxe.ExpectColumnValuesToBeBetween(column="tie_fraction", min_value=0.0, max_value=cfg.max_tie_fraction),
        ),
        _tag(
            "dataset",
            "quarantined share <= max_quarantine_fraction",
            gxe.ExpectColumnValuesToBeBetween(
                column="quarantine_fraction", min_value=0.0, max_value=cfg.max_quarantine_fraction
            ),
        ),
    ]
    if data is not None:
        checks.insert(
            1,
            _tag(
                "prompts",
                "split equals the prompt-hash assignment of data.split_*",
                gxe.ExpectColumnPairValuesToBeEqual(column_A="splits", column_B="expected_split"),
            ),
        )
    return checks


def build_preference_suite(cfg: Validation, *, data: DataConfig | None = None) -> list[Expectation]:
    """The one suite: every expectation of the gate, ``meta["table"]`` naming the frame it runs on.

    Args:
        cfg: thresholds (``params.yaml`` ``validation``).
        data: when given, also expect every prompt's split to equal ``assign_split`` under
            ``data.split_train``/``data.split_val``.
    """
    _quiet_gx()  # before the import: GX logs INFO lines while it imports
    import great_expectations.expectations as gxe

    return [
        *_pairs_expectations(gxe, cfg),
        *_rankings_expectations(gxe, cfg),
        *_feedback_expectations(gxe, cfg),
        *_derived_expectations(gxe, cfg, data),
    ]


# ---------------------------------------------------------------------------------------------- reading
def _read_frame(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas().reset_index(drop=True)
    except (OSError, pa.ArrowException, ValueError, TypeError) as err:
        raise DataUnreadableError(f"{path}: not a readable parquet file: {err}") from None


def load_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """The four tables of ``folder`` as stored; absent rankings/feedback/quarantine read as empty.

    Raises:
        DataUnreadableError: the folder or pairs.parquet is missing, or a present table is unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataUnreadableError(f"{folder}: preference folder not found")
    tables: dict[str, pd.DataFrame] = {}
    for name, file in TABLE_FILES.items():
        path = folder / file
        if path.exists():
            tables[name] = _read_frame(path)
        elif name == "pairs":
            raise DataUnreadableError(f"{path}: not found (every canonical folder has pairs.parquet)")
        else:
            log.info("%s absent: treated as empty", path)
            tables[name] = pd.DataFrame()
    return tables


# ------------------------------------------------------------------------------------------ derived frames
def _inspect_image(path: Path, max_side: int) -> tuple[bool, float, float, str | None]:
    """(decodes, width, height, error) of one stored file; never raises on bad bytes."""
    from PIL import Image

    width = height = math.nan
    try:
        with Image.open(path) as img:  # lazy: reads the header only
            width, height = img.size
            if max(width, height) > max_side:
                img.verify()  # too large anyway (the size check fails): do not spend a decode on it
            elif width * height <= FULL_DECODE_MAX_PIXELS:
                img.load()
            else:
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return False, width, height, f"decompression bomb guard: {err}"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...) on bad bytes
        return False, width, height, f"{type(err).__name__}: {err}"
    return True, float(width), float(height), None


def referenced_images(tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Every sha the tables reference, in first-seen order, with the file that first references it."""
    refs: dict[str, str] = {}
    columns = {"pairs": ["image_w", "image_l"], "rankings": ["images"], "feedback": ["image"]}
    for name, cols in columns.items():
        frame = tables.get(name, pd.DataFrame())
        for col in (c for c in cols if c in frame.columns):
            values = frame[col].dropna()
            if col == "images":  # lists: one ranking names several images
                values = pd.Series([v for lst in values if isinstance(lst, Iterable) for v in lst], dtype=object)
            for sha in values:
                if isinstance(sha, str):
                    refs.setdefault(sha, TABLE_FILES[name])
    return refs


def image_check_frame(store: ImageStore, refs: dict[str, str], *, max_side: int) -> pd.DataFrame:
    """One row per referenced sha: sha, referenced_by, exists, decodes, width, height, error."""
    from PIL import Image

    stored = store.index()  # one directory scan instead of a glob per sha
    rows: list[tuple[str, str, bool, bool, float, float, str | None]] = []
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat it as a failed decode.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for sha, table in refs.items():
            path = stored.get(sha)
            if path is None:
                rows.append((sha, table, False, False, math.nan, math.nan, "not in the image store"))
                continue
            decodes, width, height, error = _inspect_image(path, max_side)
            rows.append((sha, table, True, decodes, width, height, error))
    columns = ["sha", "referenced_by", "exists", "decodes", "width", "height", "error"]
    return pd.DataFrame(rows, columns=columns).astype({"exists": bool, "decodes": bool})


def prompt_split_frame(tables: dict[str, pd.DataFrame], data: DataConfig | None) -> pd.DataFrame:
    """One row per prompt: n_splits (distinct splits over all tables), splits, expected_split."""
    parts = [
        t[["prompt", "split"]]
        for t in (tables.get(n, pd.DataFrame()) for n in RAW_FRAMES)
        if {"prompt", "split"} <= set(t.columns)
    ]
    both = pd.concat(parts, ignore_index=True).dropna() if parts else pd.DataFrame(columns=["prompt", "split"])
    both = both.astype({"prompt": str, "split": str})
    grouped = both.groupby("prompt", sort=True)["split"]
    frame = pd.DataFrame(
        {"n_splits": grouped.nunique(), "splits": grouped.agg(lambda s: ",".join(sorted(set(s))))}
    ).reset_index()
    if data is not None:
        frame["expected_split"] = [assign_split(p, train=data.split_train, val=data.split_val) for p in frame.prompt]
    return frame


def ranking_list_frame(rankings: pd.DataFrame) -> pd.DataFrame:
    """One row per ranking: ranking_id, n_images, n_distinct."""
    lists = rankings["images"] if "images" in rankings.columns else pd.Series([None] * len(rankings))
    sizes = [len(list(v)) if isinstance(v, Iterable) and not isinstance(v, str) else 0 for v in lists]
    distinct = [len(set(v)) if isinstance(v, Iterable) and not isinstance(v, str) else 0 for v in lists]
    ids = rankings["ranking_id"] if "ranking_id" in rankings.columns else pd.Series(range(len(rankings)))
    return pd.DataFrame({"ranking_id": ids.to_numpy(), "n_images": sizes, "n_distinct": distinct})


def dataset_frame(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row: tie share of pairs and quarantined share of all rows read by the importer.

    The quarantine share is quarantined / (imported + quarantined), where imported counts the rows of
    pairs, rankings and feedback: every source row ends in one of the four tables.
    """
    pairs = tables["pairs"]
    n_pairs = len(pairs)
    labels = pd.to_numeric(pairs["label"], errors="coerce") if "label" in pairs.columns else pd.Series(dtype=float)
    n_ties = int(is_tie(labels).sum()) if len(labels) else 0
    n_imported = sum(len(tables.get(n, pd.DataFrame())) for n in RAW_FRAMES)
    n_quarantined = len(tables.get("quarantine", pd.DataFrame()))
    total = n_imported + n_quarantined
    return pd.DataFrame(
        [
            {
                "n_pairs": n_pairs,
                "n_ties": n_ties,
                "tie_fraction": n_ties / n_pairs if n_pairs else 0.0,
                "n_imported": n_imported,
                "n_quarantined": n_quarantined,
                "quarantine_fraction": n_quarantined / total if total else 0.0,
            }
        ]
    )


def build_frames(
    folder: Path, tables: dict[str, pd.DataFrame], cfg: Validation, data: DataConfig | None
) -> dict[str, pd.DataFrame]:
    """Every frame the suite runs on; rankings and feedback (and their derived frames) when non-empty."""
    frames = {"pairs": tables["pairs"]}
    if len(tables["rankings"]):
        frames["rankings"] = tables["rankings"]
        frames["ranking_lists"] = ranking_list_frame(tables["rankings"])
    if len(tables["feedback"]):
        frames["feedback"] = tables["feedback"]
    frames["prompts"] = prompt_split_frame(tables, data)
    frames["images"] = image_check_frame(ImageStore(folder), referenced_images(tables), max_side=cfg.max_image_side)
    frames["dataset"] = dataset_frame(tables)
    return frames


# ------------------------------------------------------------------------------------------------ GX run
def _quiet_gx() -> None:
    """GX logs INFO/WARNING lines about its own machinery; keep it to errors unless the user set a level."""
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.ERROR)
    # GX pins this one logger to INFO when it is imported; let it inherit the level above again.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.NOTSET)


def _gx_context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx()
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm "Calculating Metrics"
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        ctx.add_data_docs_site(
            site_name=DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def _run_frame(
    ctx: Any, source: Any, name: str, frame: pd.DataFrame, expectations: list[Expectation], docs: bool
) -> list[Any]:
    """Validate one frame with its part of the suite through a Checkpoint; GX results in suite order."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"prefalign_{name}"))
    order = {}
    for i, expectation in enumerate(expectations):
        order[suite.add_expectation(expectation).id] = i
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"prefalign_{name}", data=batch, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])] if docs else []
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"prefalign_{name}",
            validation_definitions=[vd],
            actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    results = [r for vr in run.run_results.values() for r in vr.results]
    return sorted(results, key=lambda r: order.get(r.expectation_config.id, len(order)))


def _run_suite(
    frames: dict[str, pd.DataFrame], suite: list[Expectation], docs_dir: Path | None
) -> tuple[list[dict[str, Any]], str | None]:
    ctx = _gx_context(docs_dir)
    source = ctx.data_sources.add_pandas(name="prefalign")
    summaries = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas/GX deprecation chatter, not findings about the data
        for name, frame in frames.items():
            mine = [e for e in suite if e.meta["table"] == name]
            if mine:
                results = _run_frame(ctx, source, name, frame, mine, docs_dir is not None)
                summaries += [_summarise(r, name, frame) for r in results]
    index = docs_dir / "index.html" if docs_dir is not None else None
    return summaries, str(index) if index is not None and index.exists() else None


# -------------------------------------------------------------------------------------------- reporting
def _exception_message(info: Any) -> str | None:
    """GX nests exception info per metric; return the first message of a raised exception."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        message = _exception_message(value)
        if message:
            return message
    return None


def _columns_of(kwargs: dict[str, Any]) -> list[str]:
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_list" in kwargs:
        return list(kwargs["column_list"])
    return [kwargs[k] for k in ("column_A", "column_B") if k in kwargs]


def _examples(frame: pd.DataFrame, name: str, columns: list[str], indices: list[Any]) -> list[dict[str, Any]]:
    shown = [c for c in dict.fromkeys([*KEY_COLUMNS.get(name, []), *columns]) if c in frame.columns]
    rows = []
    for index in indices[:MAX_EXAMPLES]:
        values = {c: frame.at[index, c] for c in shown} if index in frame.index else {}
        rows.append({"row": index, "values": values})
    return rows


def _summarise(result: Any, name: str, frame: pd.DataFrame) -> dict[str, Any]:
    """A plain dict of one GX result: what was expected, whether it held, a few offending rows."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    columns = _columns_of(kwargs)
    found = result.result or {}
    return _jsonable(
        {
            "table": name,
            "file": FRAME_LABELS.get(name, name),
            "expectation": config.type,
            "description": config.meta.get("why"),
            "columns": columns,
            "kwargs": {k: v for k, v in kwargs.items() if k not in ("column", "column_list")},
            "success": bool(result.success),
            "unexpected_count": found.get("unexpected_count"),
            "element_count": found.get("element_count"),
            "observed_value": found.get("observed_value"),
            "details": found.get("details"),
            "offending": _examples(frame, name, columns, list(found.get("partial_unexpected_index_list") or [])),
            "error": _exception_message(result.exception_info),
        }
    )


def _show(value: Any, width: int = 20) -> str:
    """A value as a failure line shows it: floats to 4 digits, long strings (shas) cut, quoted."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(value if len(value) <= width else value[: width - 1] + "…")
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _example(r: dict[str, Any], row: dict[str, Any]) -> str:
    # Context columns that are null (e.g. no decode error) say nothing; the checked columns always show.
    values = " ".join(
        f"{k}={_show(v, 60 if k == 'error' else 20)}"
        for k, v in row["values"].items()
        if v is not None or k in r["columns"]
    )
    return f"row {row['row']} {values}" if r["table"] in RAW_FRAMES else values


def _failure_line(r: dict[str, Any]) -> str:
    head = f"{r['file']}: {r['expectation']}" + (f"({', '.join(r['columns'])})" if r["columns"] else "")
    if r["error"]:
        return f"{head} could not run: {r['error']}"
    if r["unexpected_count"] is not None:
        examples = "; ".join(_example(r, row) for row in r["offending"][:3])
        return f"{head} failed: {r['unexpected_count']} rows, e.g. {examples}"
    mismatched = (r["details"] or {}).get("mismatched")
    if mismatched:
        return f"{head} failed: " + ", ".join(f"{k} {v}" for k, v in mismatched.items())
    bounds = {k: r["kwargs"][k] for k in ("min_value", "max_value") if r["kwargs"].get(k) is not None}
    return f"{head} failed: observed {_show(r['observed_value'], 80)}" + (f", expected {bounds}" if bounds else "")


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf to None, arrays and tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | np.ndarray | pd.Series):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _write_json(path: Path, text: str) -> None:
    """Write atomically, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------- entry point
def _statistics(
    results: list[dict[str, Any]], frames: dict[str, pd.DataFrame], tables: dict[str, pd.DataFrame], seconds: float
) -> dict[str, Any]:
    passed = sum(r["success"] for r in results)
    shares = frames["dataset"].iloc[0].to_dict()
    return _jsonable(
        {
            "evaluated_expectations": len(results),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(results) - passed,
            "rows": {name: len(t) for name, t in tables.items()},
            "frames_validated": list(frames),
            "images_checked": len(frames["images"]),
            "prompts": len(frames["prompts"]),
            "split_counts": split_counts(tables["pairs"]),
            "tie_fraction": shares["tie_fraction"],
            "quarantine_fraction": shares["quarantine_fraction"],
            "seconds": round(seconds, 3),
        }
    )


def validate_preferences(
    folder: Path, cfg: Validation, *, report_path: Path, docs_dir: Path | None = None, data: DataConfig | None = None
) -> ValidationReport:
    """Run the GX suite on a canonical preference folder; write the JSON report; return it.

    Args:
        folder: canonical folder (tables + ``images/``).
        cfg: thresholds of the gate.
        report_path: where the JSON report goes (always written, valid or not).
        docs_dir: when given, GX Data Docs HTML is rendered there (``index.html``).
        data: when given, prompt splits must also equal the hash assignment of ``data.split_*``.

    Raises:
        DataUnreadableError: the folder, pairs.parquet or another present table cannot be read.
    """
    start = time.perf_counter()
    folder = Path(folder)
    tables = load_tables(folder)
    frames = build_frames(folder, tables, cfg, data)
    results, docs_index = _run_suite(
        frames, build_preference_suite(cfg, data=data), Path(docs_dir) if docs_dir is not None else None
    )
    report = ValidationReport(
        success=all(r["success"] for r in results),
        results=results,
        statistics=_statistics(results, frames, tables, time.perf_counter() - start),
        docs_index=docs_index,
        folder=str(folder),
    )
    _write_json(Path(report_path), report.to_json())
    log.info(
        "validation of %s: %s (%d/%d expectations met, %.1f s)",
        folder,
        "valid" if report.success else "INVALID",
        report.statistics["successful_expectations"],
        len(results),
        report.statistics["seconds"],
    )
    for line in report.failures():
        log.warning("%s", line)
    return report
