"""Canonical table schemas, atomic parquet I/O and the content-addressed image store."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from prefalign.data import schema
from prefalign.data.schema import ImageStore

SHA_A, SHA_B = "a" * 64, "b" * 64


def _pairs(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": ["un chat 🐱"] * n,
            "image_w": [SHA_A] * n,
            "image_l": [SHA_B] * n,
            "label": [1.0, 0.5, 1.0][:n],
            "source": ["test"] * n,
            "split": ["train"] * n,
        }
    )


def test_schemas_have_the_design_columns():
    assert schema.PAIRS_SCHEMA.names == [
        "pair_id",
        "prompt",
        "image_w",
        "image_l",
        "label",
        "source",
        "split",
        "model_w",
        "model_l",
        "annotator",
        "created_at",
    ]
    assert schema.RANKINGS_SCHEMA.names == ["ranking_id", "prompt", "images", "source", "split"]
    assert schema.FEEDBACK_SCHEMA.names == ["feedback_id", "prompt", "image", "desirable", "source", "split"]
    assert schema.QUARANTINE_SCHEMA.names == ["source_file", "source_row", "reason"]
    optional = {f.name for f in schema.PAIRS_SCHEMA if f.nullable}
    assert optional == {"model_w", "model_l", "annotator", "created_at"}


@pytest.mark.parametrize(
    "table", [schema.PAIRS_SCHEMA, schema.RANKINGS_SCHEMA, schema.FEEDBACK_SCHEMA, schema.QUARANTINE_SCHEMA]
)
def test_empty_table_round_trips(table, tmp_path):
    empty = schema.empty_table(table)
    assert list(empty.columns) == table.names and len(empty) == 0
    schema.write_table(empty, tmp_path / "t.parquet", table)
    assert len(schema.read_table(tmp_path / "t.parquet", table)) == 0


def test_pairs_round_trip_fills_optional_columns_with_nulls(tmp_path):
    path = tmp_path / "sub" / "pairs.parquet"
    schema.write_table(_pairs(), path, schema.PAIRS_SCHEMA)
    back = schema.read_table(path, schema.PAIRS_SCHEMA)
    assert list(back.columns) == schema.PAIRS_SCHEMA.names
    assert back.prompt[0] == "un chat 🐱" and back.label.tolist() == [1.0, 0.5, 1.0]
    assert back.annotator.isna().all() and back.created_at.isna().all()
    assert [p.name for p in path.parent.iterdir()] == ["pairs.parquet"]  # no temp file left behind


def test_timestamps_and_lists_round_trip(tmp_path):
    pairs = _pairs().assign(created_at=pd.Timestamp("2026-01-01T00:00:00Z") + pd.to_timedelta([0, 1, 2], "s"))
    schema.write_table(pairs, tmp_path / "pairs.parquet", schema.PAIRS_SCHEMA)
    back = schema.read_table(tmp_path / "pairs.parquet", schema.PAIRS_SCHEMA)
    assert back.created_at[2] == pd.Timestamp("2026-01-01T00:00:02Z")
    rankings = pd.DataFrame(
        {"ranking_id": ["r"], "prompt": ["p"], "images": [[SHA_A, SHA_B]], "source": ["s"], "split": ["val"]}
    )
    schema.write_table(rankings, tmp_path / "rankings.parquet", schema.RANKINGS_SCHEMA)
    assert list(schema.read_table(tmp_path / "rankings.parquet", schema.RANKINGS_SCHEMA).images[0]) == [SHA_A, SHA_B]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=["split"]), "missing"),
        (lambda df: df.assign(extra=1), "unexpected"),
        (lambda df: df.assign(label=["one", "half", "one"]), "label"),
        (lambda df: df.assign(prompt=["a", None, "c"]), "null"),
    ],
)
def test_write_table_rejects_bad_frames_and_writes_nothing(tmp_path, mutate, message):
    path = tmp_path / "pairs.parquet"
    with pytest.raises(ValueError, match=message) as err:
        schema.write_table(mutate(_pairs()), path, schema.PAIRS_SCHEMA)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_table_replaces_atomically(tmp_path):
    path = tmp_path / "pairs.parquet"
    schema.write_table(_pairs(3), path, schema.PAIRS_SCHEMA)
    with pytest.raises(ValueError):
        schema.write_table(_pairs(3).assign(label=["x", "y", "z"]), path, schema.PAIRS_SCHEMA)
    assert len(schema.read_table(path, schema.PAIRS_SCHEMA)) == 3  # the old file survives a failed write
    schema.write_table(_pairs(2), path, schema.PAIRS_SCHEMA)
    assert len(schema.read_table(path, schema.PAIRS_SCHEMA)) == 2


def test_read_table_names_the_file_when_unreadable_or_incomplete(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="corrupt.parquet"):
        schema.read_table(corrupt, schema.PAIRS_SCHEMA)
    with pytest.raises(ValueError, match="absent.parquet"):
        schema.read_table(tmp_path / "absent.parquet", schema.PAIRS_SCHEMA)
    partial = tmp_path / "partial.parquet"
    _pairs().drop(columns=["label"]).to_parquet(partial)
    with pytest.raises(ValueError, match=r"partial.parquet.*label"):
        schema.read_table(partial, schema.PAIRS_SCHEMA)


# ------------------------------------------------------------------------------------------ image store
def test_put_bytes_is_content_addressed_and_idempotent(tmp_path):
    store = ImageStore(tmp_path)
    data = b"some encoded image bytes"
    sha = store.put_bytes(data, ".PNG")
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == tmp_path / "images" / sha[:2] / f"{sha}.png"
    assert store.put_bytes(data, "png") == sha and store.put_bytes(data, "jpg") == sha
    assert len(store.index()) == 1 and sha in store and "0" * 64 not in store
    with pytest.raises(ValueError):
        store.put_bytes(data, "../png")


def test_put_array_is_lossless_and_deterministic(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    sha = ImageStore(tmp_path / "one").put_array(arr)
    assert ImageStore(tmp_path / "two").put_array(arr.copy()) == sha  # same pixels, same bytes, any store
    loaded = ImageStore(tmp_path / "one").load_array(sha)
    assert loaded.dtype == np.uint8 and loaded.shape == (16, 12, 3)
    np.testing.assert_array_equal(loaded, arr)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)]
)
def test_put_array_rejects_non_rgb_uint8(tmp_path, bad):
    with pytest.raises(ValueError):
        ImageStore(tmp_path).put_array(bad)


def test_unknown_sha_raises_key_error_naming_it(tmp_path):
    store = ImageStore(tmp_path)
    with pytest.raises(KeyError, match="c" * 64):
        store.path("c" * 64)
    with pytest.raises(KeyError):
        store.load_array("not-a-sha")


def test_core_imports_stay_light():
    """prefalign and its data modules must not pull in GX, MLflow, Prefect or DVC at import time."""
    code = (
        "import sys, prefalign, prefalign.data.schema, prefalign.data.prepare, prefalign.data.validation; "
        "heavy = [m for m in ('great_expectations', 'mlflow', 'prefect', 'dvc') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
