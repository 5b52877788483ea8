"""Importers of Pick-a-Pic, HPD and JSONL preference data, and the `prefalign data import` command.

Every input is built here in tmp_path: Pick-a-Pic-shaped parquet shards with real JPEG bytes, HPD
JSON with image files beside it, JSONL logs. Images are 16x16 solid colours, so each is distinct.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from prefalign.config import load_config
from prefalign.data.importers import FORMATS, ImportAbortedError, import_preferences
from prefalign.data.importers.common import WHOLE_FILE_ROW
from prefalign.data.importers.images import ImageIngest
from prefalign.data.importers.pickapic import BATCH_ROWS
from prefalign.data.pseudonym import pseudonymise
from prefalign.data.schema import (
    FEEDBACK_SCHEMA,
    PAIRS_SCHEMA,
    QUARANTINE_SCHEMA,
    RANKINGS_SCHEMA,
    ImageStore,
    read_table,
)

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
RAW_USER_ID = 987654321012


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def cfg():
    return load_config(PARAMS, {"validation.min_pairs": 1})


def encode(colour, *, mode: str = "RGB", fmt: str = "JPEG", size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def colour_jpeg(index: int) -> bytes:
    """A distinct solid-colour 16x16 JPEG per index."""
    return encode(((index * 37) % 256, (index * 91 + 40) % 256, (index * 53 + 200) % 256))


def noise_jpeg(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    # Mode "1" packs 8 pixels a byte and the PNG of one colour compresses to a few kB on disk.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def pick_row(
    caption,
    jpg_0: bytes | None,
    jpg_1: bytes | None,
    label_0=1.0,
    label_1=0.0,
    *,
    has_label=True,
    user_id=RAW_USER_ID,
    created_at=datetime(2023, 5, 1, 12, 30),
) -> dict:
    """One row with the columns of a published Pick-a-Pic v2 shard."""
    return {
        "are_different": jpg_0 != jpg_1,
        "best_image_uid": "uid-0",
        "caption": caption,
        "created_at": created_at,
        "has_label": has_label,
        "image_0_uid": "uid-0",
        "image_0_url": "https://x/0",
        "image_1_uid": "uid-1",
        "image_1_url": "https://x/1",
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": "sd-a",
        "model_1": "sd-b",
        "ranking_id": 1,
        "user_id": user_id,
        "num_example_per_prompt": 1,
    }


PICK_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)


def write_shard(path: Path, rows: list[dict], *, drop: tuple[str, ...] = (), row_group_size: int = 4) -> Path:
    table = pa.Table.from_pylist(rows, schema=PICK_SCHEMA)
    if drop:
        table = table.drop_columns(list(drop))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def good_rows(start: int, n: int) -> list[dict]:
    """n clean strict pairs with distinct prompts and images."""
    return [
        pick_row(f"prompt number {i}", colour_jpeg(2 * i), colour_jpeg(2 * i + 1)) for i in range(start, start + n)
    ]


def run(fmt: str, input_path: Path, out: Path, cfg):
    return import_preferences(fmt, input_path, out, data=cfg.data, validation=cfg.validation)


def tables(out: Path) -> dict[str, pd.DataFrame]:
    schemas = {
        "pairs": PAIRS_SCHEMA,
        "rankings": RANKINGS_SCHEMA,
        "feedback": FEEDBACK_SCHEMA,
        "quarantine": QUARANTINE_SCHEMA,
    }
    return {name: read_table(out / f"{name}.parquet", s) for name, s in schemas.items()}


def quarantine_by_row(out: Path) -> dict[int, str]:
    q = read_table(out / "quarantine.parquet", QUARANTINE_SCHEMA)
    assert q["source_row"].is_unique, q
    return dict(zip(q["source_row"], q["reason"], strict=True))


# ------------------------------------------------------------------------------------------- Pick-a-Pic
def test_pickapic_winners_ties_and_one_quarantine_row_per_bad_row(tmp_path, cfg, bomb_png):
    red, green, blue, white = (encode(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)))
    truncated = noise_jpeg()[:600]
    gray = encode(128, mode="L")
    cmyk = encode((0, 255, 255, 0), mode="CMYK")  # red in CMYK
    rgba = encode((0, 0, 255, 255), mode="RGBA", fmt="PNG")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    palette_png = buffer.getvalue()
    rows = [
        pick_row("a red cube", red, green, 1.0, 0.0),  # 0 jpg_0 wins
        pick_row("a green cube", red, green, 0.0, 1.0),  # 1 jpg_1 wins
        pick_row("a blue cube", blue, white, 0.5, 0.5),  # 2 tie
        pick_row("unjudged", red, blue, float("nan"), float("nan"), has_label=False),  # 3 skipped
        pick_row("a broken file", truncated, red),  # 4 corrupt JPEG
        pick_row("a red cube", red, green, 1.0, 0.0),  # 5 duplicate of row 0
        pick_row("no label", red, blue, float("nan"), float("nan")),  # 6 NaN labels
        pick_row("two winners", red, blue, 1.0, 1.0),  # 7 sum != 1
        pick_row("odd label", red, blue, 0.3, 0.7),  # 8 outside {0, 0.5, 1}
        pick_row("same picture", red, red),  # 9 identical images
        pick_row("", red, blue),  # 10 empty prompt
        pick_row("  \n\t ", red, blue),  # 11 whitespace prompt
        pick_row("x" * 10_000, red, blue),  # 12 too long
        pick_row("un chat 🐱 sur un café ☕ 猫", green, blue),  # 13 emoji: valid
        pick_row("gray versus cmyk", gray, cmyk, 1.0, 0.0),  # 14 converted
        pick_row("rgba versus palette", rgba, palette_png, 0.0, 1.0),  # 15 converted
        pick_row("a bomb", red, bomb_png),  # 16 decompression bomb
        pick_row("a speck", encode((1, 2, 3), size=(4, 4)), red),  # 17 too small
        pick_row("not a picture", b"definitely not an image", red),  # 18 not an image
        pick_row("   a padded prompt  ", white, green),  # 19 prompt stripped
    ]
    shard = write_shard(tmp_path / "in" / "train-000.parquet", rows)
    out = tmp_path / "out"
    summary = run("pickapic", shard, out, cfg)

    assert summary.read == 20 and summary.files_read == 1 and summary.files_unreadable == 0
    assert summary.imported == {"pairs": 7, "rankings": 0, "feedback": 0}
    assert (summary.duplicates, summary.ties, summary.skipped, summary.quarantined) == (1, 1, 1, 11)
    assert summary.reasons == {
        "empty prompt": 2,
        "identical images": 1,
        "image too large": 1,
        "image too small": 1,
        "invalid label": 3,
        "prompt too long": 1,
        "unreadable image": 2,
    }
    assert summary.exit_code == 0

    reasons = quarantine_by_row(out)
    assert sorted(reasons) == [4, 6, 7, 8, 9, 10, 11, 12, 16, 17, 18]
    assert "unreadable image" in reasons[4] and "jpg_0" in reasons[4]
    assert "nan" in reasons[6].lower()
    assert "label_0=1.0" in reasons[7] and "label_1=1.0" in reasons[7] and "sum" in reasons[7]
    assert "0.3" in reasons[8] and "0.7" in reasons[8]
    assert "identical images" in reasons[9]
    assert reasons[10].startswith("empty prompt") and reasons[11].startswith("empty prompt")
    assert "prompt too long" in reasons[12] and "10000" in reasons[12]
    assert "decompression bomb" in reasons[16] and "jpg_1" in reasons[16]
    assert "image too small" in reasons[17] and "4x4" in reasons[17]
    assert "unreadable image" in reasons[18]
    q = read_table(out / "quarantine.parquet", QUARANTINE_SCHEMA)
    assert set(q["source_file"]) == {str(shard)}

    pairs = tables(out)["pairs"].set_index("prompt")
    assert len(pairs) == 7 and pairs["pair_id"].is_unique
    assert (pairs.loc["a red cube", "image_w"], pairs.loc["a red cube", "image_l"]) == (sha(red), sha(green))
    assert (pairs.loc["a green cube", "image_w"], pairs.loc["a green cube", "image_l"]) == (sha(green), sha(red))
    assert (pairs.loc["a green cube", "model_w"], pairs.loc["a green cube", "model_l"]) == ("sd-b", "sd-a")
    tie = pairs.loc["a blue cube"]
    assert tie["label"] == 0.5 and (tie["image_w"], tie["image_l"]) == (sha(blue), sha(white))
    assert "un chat 🐱 sur un café ☕ 猫" in pairs.index
    assert "a padded prompt" in pairs.index
    assert set(pairs["source"]) == {"pickapic"}

    store = ImageStore(out)
    for prompt, expected in (
        ("gray versus cmyk", [(128, 128, 128), (255, 0, 0)]),
        ("rgba versus palette", [(10, 200, 30), (0, 0, 255)]),
    ):
        for column, colour in zip(("image_w", "image_l"), expected, strict=True):
            stored = store.path(pairs.loc[prompt, column])
            assert stored.suffix == ".png" and sha(stored.read_bytes()) == pairs.loc[prompt, column]
            with Image.open(stored) as img:
                assert img.mode == "RGB"
            pixel = store.load_array(pairs.loc[prompt, column])[0, 0]
            assert np.abs(pixel.astype(int) - colour).max() <= 3, (prompt, column, pixel)
    assert store.path(sha(red)).suffix == ".jpg"


def test_splits_follow_the_prompt_hash_and_timestamps_are_utc(tmp_path, cfg):
    from prefalign.data.prepare import assign_split

    rows = good_rows(0, 6)
    rows[0]["created_at"] = datetime(2023, 5, 1, 12, 30)
    shard = write_shard(tmp_path / "s.parquet", rows)
    run("pickapic", shard, tmp_path / "out", cfg)
    pairs = tables(tmp_path / "out")["pairs"]
    expected = [assign_split(p, train=cfg.data.split_train, val=cfg.data.split_val) for p in pairs["prompt"]]
    assert pairs["split"].tolist() == expected
    assert pairs.loc[0, "created_at"] == pd.Timestamp("2023-05-01 12:30", tz="UTC")


def test_annotator_ids_are_pseudonymised_everywhere(tmp_path, cfg):
    shard = write_shard(tmp_path / "s.parquet", good_rows(0, 3) + [pick_row("", colour_jpeg(1), colour_jpeg(2))])
    out = tmp_path / "out"
    run("pickapic", shard, out, cfg)
    written = tables(out)
    assert set(written["pairs"]["annotator"]) == {pseudonymise(str(RAW_USER_ID))}
    for frame in written.values():
        for column in frame.columns:
            assert not frame[column].astype(str).str.contains(str(RAW_USER_ID)).any(), column
    for file in out.glob("*.parquet"):
        assert str(RAW_USER_ID).encode() not in file.read_bytes()


def test_folder_of_shards_with_corrupt_empty_and_incomplete_files(tmp_path, cfg):
    folder = tmp_path / "shards"
    write_shard(folder / "a.parquet", good_rows(0, 3))
    write_shard(folder / "b.parquet", good_rows(3, 2))
    (folder / "c-corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    (folder / "d-empty.parquet").write_bytes(b"")
    write_shard(folder / "e-no-jpg1.parquet", good_rows(10, 2), drop=("jpg_1",))
    (folder / "notes.txt").write_text("not a shard")
    out = tmp_path / "out"
    summary = run("pickapic", folder, out, cfg)

    assert (summary.files_read, summary.files_unreadable) == (2, 3)
    assert summary.imported["pairs"] == 5 and summary.read == 5 and summary.quarantined == 3
    assert summary.reasons == {"missing columns": 1, "unreadable file": 2}
    q = read_table(out / "quarantine.parquet", QUARANTINE_SCHEMA).set_index("source_file")
    assert (q["source_row"] == WHOLE_FILE_ROW).all()
    assert "parquet" in q.loc[str(folder / "c-corrupt.parquet"), "reason"]
    assert "empty" in q.loc[str(folder / "d-empty.parquet"), "reason"]
    assert "jpg_1" in q.loc[str(folder / "e-no-jpg1.parquet"), "reason"]


def test_shard_damaged_midway_keeps_the_rows_before_and_quarantines_the_rest(tmp_path, cfg):
    # Three row groups, each as long as the importer's record batches.
    shard = write_shard(tmp_path / "s.parquet", good_rows(0, 3 * BATCH_ROWS), row_group_size=BATCH_ROWS)
    damaged = bytearray(shard.read_bytes())
    third_group = pq.ParquetFile(shard).metadata.row_group(2).column(0).data_page_offset
    damaged[third_group : third_group + 600] = b"\xab" * 600
    shard.write_bytes(bytes(damaged))
    out = tmp_path / "out"
    summary = run("pickapic", shard, out, cfg)

    kept = summary.imported["pairs"]
    assert kept == 2 * BATCH_ROWS and summary.files_read == 1 and summary.files_unreadable == 1
    q = read_table(out / "quarantine.parquet", QUARANTINE_SCHEMA)
    assert q["source_row"].tolist() == [WHOLE_FILE_ROW]
    assert f"stopped at row {kept}" in q.loc[0, "reason"]


def test_reimport_adds_nothing_and_a_new_shard_appends_only_new_pairs(tmp_path, cfg):
    bad_rows = [
        pick_row("", colour_jpeg(1), colour_jpeg(2)),
        pick_row("junk", b"junk", colour_jpeg(2)),
        pick_row("cut", noise_jpeg()[:600], colour_jpeg(2)),
    ]
    first = write_shard(tmp_path / "a.parquet", good_rows(0, 4) + bad_rows)
    out = tmp_path / "out"
    run("pickapic", first, out, cfg)
    before = {name: (out / f"{name}.parquet").read_bytes() for name in ("pairs", "quarantine")}

    again = run("pickapic", first, out, cfg)
    assert again.imported["pairs"] == 0 and again.duplicates == 4 and again.status == "up to date"
    assert again.quarantined == 3  # counted again, but the identical quarantine rows are not written twice
    assert again.exit_code == 0
    assert {name: (out / f"{name}.parquet").read_bytes() for name in before} == before

    second = write_shard(tmp_path / "b.parquet", good_rows(2, 5))  # rows 2, 3 overlap the first shard
    more = run("pickapic", second, out, cfg)
    assert more.imported["pairs"] == 3 and more.duplicates == 2
    pairs = tables(out)["pairs"]
    assert len(pairs) == 7 and pairs["pair_id"].is_unique
    original = pd.read_parquet(io.BytesIO(before["pairs"]))
    pd.testing.assert_frame_equal(pairs.iloc[:4].reset_index(drop=True), original, check_dtype=False)
    assert len(read_table(out / "quarantine.parquet", QUARANTINE_SCHEMA)) == 3


def test_header_above_max_side_is_refused_without_decoding(tmp_path):
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # under Pillow's own limit, above ours
    ingest = ImageIngest(ImageStore(tmp_path), min_side=8, max_side=4096)
    with pytest.raises(Exception, match="decompression bomb guard: not decoded") as caught:
        ingest.put(buffer.getvalue(), "jpg_0")
    assert caught.value.category == "image too large"
    assert not (tmp_path / "images").exists()


# -------------------------------------------------------------------------------------------------- HPD
def hpd_folder(tmp_path: Path, records: list[dict], n_images: int = 4) -> tuple[Path, list[bytes]]:
    folder = tmp_path / "hpd"
    (folder / "images").mkdir(parents=True)
    images = [colour_jpeg(100 + i) for i in range(n_images)]
    for i, data in enumerate(images):
        (folder / "images" / f"{i}.jpg").write_bytes(data)
    (folder / "test.json").write_text(json.dumps(records))
    return folder / "test.json", images


def test_hpd_rank_and_human_preference_records(tmp_path, cfg):
    paths = [f"images/{i}.jpg" for i in range(4)]
    records = [
        {"prompt": "ranked", "image_path": paths[:3], "rank": [2, 1, 3], "user_hash": "u-1"},
        {"prompt": "ranked with a tie", "image_path": paths[:3], "rank": [1, 1, 2]},
        {"prompt": "preferred", "image_path": paths[:2], "human_preference": [0, 1]},
        {"prompt": "preferred of three", "image_path": paths[1:4], "human_preference": [1, 0, 0]},
        {"prompt": "two winners", "image_path": paths[:2], "human_preference": [1, 1]},
        {"prompt": "short rank", "image_path": paths[:3], "rank": [1, 2]},
        {"prompt": "both", "image_path": paths[:2], "rank": [1, 2], "human_preference": [1, 0]},
        {"prompt": "gone", "image_path": ["images/0.jpg", "images/missing.jpg"], "rank": [1, 2]},
        "not an object",
    ]
    json_file, images = hpd_folder(tmp_path, records)
    shas = [sha(b) for b in images]
    out = tmp_path / "out"
    summary = run("hpd", json_file, out, cfg)

    assert summary.read == 9 and summary.quarantined == 5
    assert summary.imported == {"pairs": 3 + 3 + 1 + 2, "rankings": 1, "feedback": 0}
    assert summary.ties == 1
    assert summary.reasons == {"invalid record": 4, "missing image file": 1}
    written = tables(out)
    rankings = written["rankings"]
    assert len(rankings) == 1 and list(rankings.loc[0, "images"]) == [shas[1], shas[0], shas[2]]
    assert rankings.loc[0, "source"] == "hpd"
    pairs = written["pairs"]
    by_prompt = {p: set(zip(g.image_w, g.image_l, g.label, strict=True)) for p, g in pairs.groupby("prompt")}
    assert by_prompt["ranked"] == {(shas[1], shas[0], 1.0), (shas[0], shas[2], 1.0), (shas[1], shas[2], 1.0)}
    assert by_prompt["ranked with a tie"] == {
        (shas[0], shas[1], 0.5),
        (shas[0], shas[2], 1.0),
        (shas[1], shas[2], 1.0),
    }
    assert by_prompt["preferred"] == {(shas[1], shas[0], 1.0)}
    assert by_prompt["preferred of three"] == {(shas[1], shas[2], 1.0), (shas[1], shas[3], 1.0)}
    ranked = pairs[pairs.prompt == "ranked"]
    assert set(ranked["annotator"]) == {pseudonymise("u-1")}
    reasons = quarantine_by_row(out)
    assert sorted(reasons) == [4, 5, 6, 7, 8]
    assert "exactly one" in reasons[4] and "rank" in reasons[5] and "exactly one of" in reasons[6]
    assert "missing.jpg" in reasons[7]


def test_hpd_paths_outside_the_folder_are_never_read(tmp_path, cfg, monkeypatch):
    outside = tmp_path / "secret"
    outside.mkdir()
    secret_png = encode((9, 9, 9), fmt="PNG")
    (outside / "secret.png").write_bytes(secret_png)
    paths = ["images/0.jpg", "images/1.jpg"]
    records = [
        {"prompt": "fine", "image_path": paths, "human_preference": [1, 0]},
        {"prompt": "escape", "image_path": ["images/0.jpg", "../../etc/passwd"], "human_preference": [1, 0]},
        {"prompt": "absolute", "image_path": [str(outside / "secret.png"), "images/1.jpg"], "rank": [1, 2]},
        {"prompt": "symlink", "image_path": ["images/link.png", "images/1.jpg"], "rank": [1, 2]},
        {"prompt": "sneaky dots", "image_path": ["images/../../secret/secret.png", "images/1.jpg"], "rank": [1, 2]},
    ]
    json_file, _ = hpd_folder(tmp_path, records, n_images=2)
    (json_file.parent / "images" / "link.png").symlink_to(outside / "secret.png")

    opened: list[Path] = []
    real_put_file = ImageIngest.put_file
    monkeypatch.setattr(
        ImageIngest, "put_file", lambda self, path, what: opened.append(path) or real_put_file(self, path, what)
    )
    out = tmp_path / "out"
    summary = run("hpd", json_file, out, cfg)

    assert summary.imported["pairs"] == 1 and summary.reasons == {"unsafe image path": 4}
    reasons = quarantine_by_row(out)
    assert "escapes" in reasons[1] and "../../etc/passwd" in reasons[1]
    assert "absolute" in reasons[2]
    assert "symlink" in reasons[3]
    assert "escapes" in reasons[4]
    assert all(p.resolve().is_relative_to(json_file.parent.resolve()) for p in opened)
    assert len(opened) == 2  # only the good record's two images; bad records open nothing
    assert sha(secret_png) not in ImageStore(out).index()


def test_unreadable_hpd_file_aborts_and_writes_nothing(tmp_path, cfg):
    bad = tmp_path / "test.json"
    bad.write_text('[{"prompt": "x", ')
    with pytest.raises(ImportAbortedError, match="nothing readable") as caught:
        run("hpd", bad, tmp_path / "out", cfg)
    assert str(bad) in str(caught.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ JSONL
def test_jsonl_records_paths_base64_and_bad_lines(tmp_path, cfg):
    folder = tmp_path / "logs"
    (folder / "img").mkdir(parents=True)
    images = [colour_jpeg(200 + i) for i in range(4)]
    for i, data in enumerate(images):
        (folder / "img" / f"{i}.jpg").write_bytes(data)
    inline = encode((3, 200, 100), fmt="PNG")
    b64 = base64.b64encode(inline).decode()
    lines = [
        {
            "type": "pair",
            "prompt": "paths",
            "image_w": "img/0.jpg",
            "image_l": {"path": "img/1.jpg"},
            "annotator": "alice@example.com",
            "model_w": "m1",
            "created_at": "2024-02-03T04:05:06+02:00",
        },
        {"type": "pair", "prompt": "inline", "image_w": {"base64": b64}, "image_l": "img/2.jpg", "label": 0.5},
        {"type": "ranking", "prompt": "ranked", "images": ["img/3.jpg", "img/0.jpg", {"base64": b64}]},
        {"type": "feedback", "prompt": "liked", "image": "img/1.jpg", "desirable": True},
        {"type": "pair", "prompt": "no loser", "image_w": "img/0.jpg"},  # schema
        {"type": "pair", "prompt": "typo", "image_w": "img/0.jpg", "image_l": "img/1.jpg", "lable": 0.5},
        {"type": "vote", "prompt": "unknown type"},  # schema
        {"type": "pair", "prompt": "bad b64", "image_w": {"base64": "!!!"}, "image_l": "img/1.jpg"},
        {"type": "pair", "prompt": "paths", "image_w": "img/0.jpg", "image_l": "img/1.jpg"},  # duplicate
    ]
    text = "\n".join(json.dumps(line) for line in lines[:4]) + "\n\n{not json}\n"
    text += "\n".join(json.dumps(line) for line in lines[4:]) + "\n"
    log_file = folder / "log.jsonl"
    log_file.write_text(text)
    out = tmp_path / "out"
    summary = run("jsonl", log_file, out, cfg)

    assert summary.read == 10  # the blank line is not a record
    assert summary.imported == {"pairs": 2 + 3, "rankings": 1, "feedback": 1}
    assert summary.duplicates == 1 and summary.ties == 1
    assert summary.reasons == {"invalid JSON": 1, "schema violation": 3, "unreadable image": 1}
    reasons = quarantine_by_row(out)
    assert sorted(reasons) == [5, 6, 7, 8, 9]  # 0-based line numbers
    assert "invalid JSON" in reasons[5]
    assert "image_l" in reasons[6] and "lable" in reasons[7] and "vote" in reasons[8]
    assert "base64" in reasons[9]

    written = tables(out)
    pairs = written["pairs"].set_index("prompt")
    assert (pairs.loc["paths", "image_w"], pairs.loc["paths", "image_l"]) == (sha(images[0]), sha(images[1]))
    assert pairs.loc["paths", "annotator"] == pseudonymise("alice@example.com")
    assert pairs.loc["paths", "created_at"] == pd.Timestamp("2024-02-03T02:05:06", tz="UTC")
    assert pairs.loc["inline", "image_w"] == sha(inline) and pairs.loc["inline", "label"] == 0.5
    assert list(written["rankings"].loc[0, "images"]) == [sha(images[3]), sha(images[0]), sha(inline)]
    feedback = written["feedback"]
    assert feedback.loc[0, "image"] == sha(images[1]) and bool(feedback.loc[0, "desirable"])
    assert set(written["pairs"]["source"]) | set(feedback["source"]) == {"jsonl"}


def test_jsonl_of_only_bad_lines_imports_nothing(tmp_path, cfg):
    log_file = tmp_path / "bad.jsonl"
    log_file.write_text("nope\n[1, 2]\n" + "[" * 100_000 + "\n")
    summary = run("jsonl", log_file, tmp_path / "out", cfg)
    assert summary.status == "nothing imported" and summary.exit_code == 1 and summary.quarantined == 3
    assert summary.reasons == {"invalid JSON": 2, "schema violation": 1}

    from prefalign.cli import app

    result = CliRunner().invoke(
        app,
        [
            "data",
            "import",
            "--format",
            "jsonl",
            "--input",
            str(log_file),
            "--output",
            str(tmp_path / "out"),
            "--params",
            str(PARAMS),
        ],
    )
    assert result.exit_code == 1 and "nothing imported" in result.stderr


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_import_prints_the_summary_and_exits_0(tmp_path):
    from prefalign.cli import app

    shard = write_shard(tmp_path / "s.parquet", good_rows(0, 3))
    out = tmp_path / "out"
    args = [
        "data",
        "import",
        "--format",
        "pickapic",
        "--input",
        str(shard),
        "--output",
        str(out),
        "--params",
        str(PARAMS),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first_line, _, rest = result.stdout.partition("\n")
    assert first_line.startswith("imported: 3 pairs")
    summary = json.loads(rest)
    assert summary["imported"]["pairs"] == 3 and summary["status"] == "imported"

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout.partition("\n")[2])["status"] == "up to date"


def test_cli_missing_input_exits_2_with_one_line(tmp_path):
    from prefalign.cli import app

    missing = tmp_path / "nowhere.parquet"
    result = CliRunner().invoke(
        app,
        [
            "data",
            "import",
            "--format",
            "pickapic",
            "--input",
            str(missing),
            "--output",
            str(tmp_path / "out"),
            "--params",
            str(PARAMS),
        ],
    )
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert str(missing) in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_formats_match_the_importers():
    from typing import get_args

    from prefalign.cli import ImportFormat

    assert get_args(ImportFormat) == FORMATS


# ------------------------------------------------------------------------------------------- validation
def test_imported_folder_passes_the_validation_gate(tmp_path, cfg):
    from prefalign.data.validation import validate_preferences

    out = tmp_path / "out"
    rows = good_rows(0, 8) + [
        pick_row("a tie", colour_jpeg(50), colour_jpeg(51), 0.5, 0.5),
        pick_row("unjudged", colour_jpeg(52), colour_jpeg(53), has_label=False),
    ]
    run("pickapic", write_shard(tmp_path / "s.parquet", rows), out, cfg)
    json_file, _ = hpd_folder(
        tmp_path,
        [{"prompt": "hpd ranked", "image_path": ["images/0.jpg", "images/1.jpg", "images/2.jpg"], "rank": [3, 1, 2]}],
    )
    run("hpd", json_file, out, cfg)
    log_file = json_file.parent / "log.jsonl"
    log_file.write_text(
        json.dumps({"type": "feedback", "prompt": "hpd ranked", "image": "images/3.jpg", "desirable": False}) + "\n"
    )
    run("jsonl", log_file, out, cfg)

    report = validate_preferences(out, cfg.validation, report_path=tmp_path / "report.json", data=cfg.data)
    assert report.success, report.failures()
    assert report.statistics["rows"] == {"pairs": 12, "rankings": 1, "feedback": 1, "quarantine": 0}


def test_every_written_timestamp_is_utc(tmp_path, cfg):
    rows = good_rows(0, 2)
    rows[1]["created_at"] = None
    shard = write_shard(tmp_path / "s.parquet", rows)
    run("pickapic", shard, tmp_path / "out", cfg)
    stamps = pq.read_table(tmp_path / "out" / "pairs.parquet").column("created_at")
    assert stamps.type == pa.timestamp("us", tz="UTC") and stamps.null_count == 1
    assert stamps[0].as_py() == datetime(2023, 5, 1, 12, 30, tzinfo=UTC)


def test_a_store_that_cannot_write_stops_the_import_instead_of_quarantining(tmp_path, cfg, monkeypatch):
    from prefalign.data.importers.images import IndexedImageStore

    def disk_full(self, data, ext):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(IndexedImageStore, "put_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run("pickapic", write_shard(tmp_path / "s.parquet", good_rows(0, 2)), tmp_path / "out", cfg)
    assert not (tmp_path / "out" / "quarantine.parquet").exists()
