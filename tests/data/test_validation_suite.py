"""The GX gate on tiny canonical folders: a valid one passes; each defect fails, naming its expectation.

One valid folder is built per module (GX import and image encoding happen once); every test copies it
and breaks one thing the way an external producer would (plain ``DataFrame.to_parquet``, bypassing
``write_table``'s own checks), so the gate is tested on what it will really meet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prefalign.config import DataConfig, Validation
from prefalign.data import schema
from prefalign.data.prepare import assign_split, pair_id
from prefalign.data.validation import DataUnreadableError, main_exit_code, validate_preferences

N_PROMPTS, PAIRS_PER_PROMPT = 30, 4  # 120 pairs
CFG = Validation(min_pairs=100)
UNICODE_PROMPTS = ["un chat rouge ☕ sur fond bleu", "a small 🐱 at the top left", "красный круг 円 ✨"]


def _prompts() -> list[str]:
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle"]
    plain = [f"a {c} {s} number {i}" for i, (c, s) in enumerate((c, s) for c in colours for s in shapes)]
    return (plain + UNICODE_PROMPTS + [f"prompt {i}" for i in range(N_PROMPTS)])[:N_PROMPTS]


def _build_valid(folder: Path) -> None:
    store = schema.ImageStore(folder)
    rng = np.random.default_rng(0)
    shas = [store.put_array(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(8)]
    pairs, rankings, feedback = [], [], []
    for p_index, prompt in enumerate(_prompts()):
        split = assign_split(prompt, train=0.8, val=0.1)
        for k in range(PAIRS_PER_PROMPT):
            w, lo = shas[(p_index + k) % 8], shas[(p_index + 2 * k + 1) % 8]
            tie = (p_index * PAIRS_PER_PROMPT + k) % 10 == 0  # 10% ties, under the 30% limit
            pairs.append(
                {
                    "pair_id": pair_id(prompt, w, lo, tie=tie),
                    "prompt": prompt,
                    "image_w": w,
                    "image_l": lo,
                    "label": 0.5 if tie else 1.0,
                    "source": "test",
                    "split": split,
                }
            )
        images = [shas[(p_index + j) % 8] for j in range(3)]
        rankings.append(
            {"ranking_id": f"r{p_index}", "prompt": prompt, "images": images, "source": "test", "split": split}
        )
        feedback.append(
            {
                "feedback_id": f"f{p_index}",
                "prompt": prompt,
                "image": images[0],
                "desirable": bool(p_index % 2),
                "source": "test",
                "split": split,
            }
        )
    schema.write_table(pd.DataFrame(pairs), folder / "pairs.parquet", schema.PAIRS_SCHEMA)
    schema.write_table(pd.DataFrame(rankings), folder / "rankings.parquet", schema.RANKINGS_SCHEMA)
    schema.write_table(pd.DataFrame(feedback), folder / "feedback.parquet", schema.FEEDBACK_SCHEMA)
    schema.write_table(
        schema.empty_table(schema.QUARANTINE_SCHEMA), folder / "quarantine.parquet", schema.QUARANTINE_SCHEMA
    )


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("valid") / "preferences"
    _build_valid(folder)
    return folder


@pytest.fixture
def folder(valid_folder, tmp_path) -> Path:
    """A private copy of the valid folder, to break."""
    return Path(shutil.copytree(valid_folder, tmp_path / "preferences"))


def _pairs(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder / "pairs.parquet")


def _save_pairs(folder: Path, df: pd.DataFrame) -> None:
    df.to_parquet(folder / "pairs.parquet", index=False)


def _run(folder: Path, cfg: Validation = CFG, **kwargs):
    return validate_preferences(folder, cfg, report_path=folder.parent / "report.json", **kwargs)


def _failed(report, expectation: str, table: str = "pairs.parquet") -> str:
    """The failure line of ``expectation`` on ``table``; fails the test when absent."""
    assert not report.success
    assert main_exit_code(report) == 1
    lines = [line for line in report.failures() if line.startswith(f"{table}: {expectation}")]
    assert lines, f"{expectation} on {table} not in failures:\n" + "\n".join(report.failures())
    return lines[0]


# ------------------------------------------------------------------------------------------------ valid
def test_valid_folder_passes_and_writes_report_and_docs(folder, tmp_path):
    report = _run(folder, docs_dir=tmp_path / "docs")
    assert report.success, report.failures()
    assert main_exit_code(report) == 0 and report.failures() == []
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["success"] is True
    assert on_disk["statistics"]["rows"]["pairs"] == N_PROMPTS * PAIRS_PER_PROMPT
    assert on_disk["statistics"]["images_checked"] == 8
    assert {r["table"] for r in on_disk["results"]} >= {
        "pairs",
        "rankings",
        "feedback",
        "prompts",
        "images",
        "dataset",
        "ranking_lists",
    }
    assert Path(on_disk["docs_index"]).is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_unicode_prompts_are_valid(valid_folder):
    assert set(UNICODE_PROMPTS) <= set(_pairs(valid_folder).prompt)  # the valid folder holds them and passes


def test_split_matches_hash_assignment_when_data_config_given(folder):
    assert _run(folder, data=DataConfig()).success
    report = _run(folder, data=DataConfig(split_train=0.3, split_val=0.3))
    _failed(report, "expect_column_pair_values_to_be_equal(splits, expected_split)", "prompts (derived)")


# -------------------------------------------------------------------------------------------- defects
def test_label_outside_set(folder):
    df = _pairs(folder)
    df.loc[17, "label"] = 0.7
    _save_pairs(folder, df)
    line = _failed(_run(folder), "expect_column_values_to_be_in_set(label)")
    assert "1 rows" in line and "row 17 label=0.7" in line


def test_nan_label(folder):
    df = _pairs(folder)
    df.loc[3, "label"] = np.nan
    _save_pairs(folder, df)
    assert "row 3" in _failed(_run(folder), "expect_column_values_to_not_be_null(label)")


def test_winner_equals_loser(folder):
    df = _pairs(folder)
    df.loc[5, "image_l"] = df.loc[5, "image_w"]
    _save_pairs(folder, df)
    assert "row 5" in _failed(_run(folder), "expect_select_column_values_to_be_unique_within_record(image_w, image_l)")


def test_duplicated_judgement(folder):
    df = _pairs(folder)
    copy = df.iloc[[7]].assign(pair_id="f" * 64)
    _save_pairs(folder, pd.concat([df, copy], ignore_index=True))
    _failed(_run(folder), "expect_compound_columns_to_be_unique(prompt, image_w, image_l)")


def test_duplicated_pair_id(folder):
    df = _pairs(folder)
    df.loc[9, "pair_id"] = df.loc[8, "pair_id"]
    _save_pairs(folder, df)
    _failed(_run(folder), "expect_column_values_to_be_unique(pair_id)")


def test_prompt_in_two_splits(folder):
    df = _pairs(folder)
    prompt = df.loc[0, "prompt"]
    df.loc[0, "split"] = "test" if df.loc[0, "split"] != "test" else "train"
    _save_pairs(folder, df)
    line = _failed(_run(folder), "expect_column_values_to_be_between(n_splits)", "prompts (derived)")
    assert prompt[:10] in line


def test_unknown_split(folder):
    df = _pairs(folder)
    df.loc[2, "split"] = "holdout"
    _save_pairs(folder, df)
    _failed(_run(folder), "expect_column_values_to_be_in_set(split)")


@pytest.mark.parametrize(
    ("prompt", "expectation"),
    [
        ("", "expect_column_value_lengths_to_be_between(prompt)"),
        ("   \t", "expect_column_values_to_match_regex(prompt)"),
        ("x" * 2001, "expect_column_value_lengths_to_be_between(prompt)"),
    ],
)
def test_bad_prompt(folder, prompt, expectation):
    df = _pairs(folder)
    df.loc[11, "prompt"] = prompt
    _save_pairs(folder, df)
    assert "row 11" in _failed(_run(folder), expectation)


def test_missing_image_file(folder):
    sha = _pairs(folder).loc[0, "image_w"]
    schema.ImageStore(folder).path(sha).unlink()
    line = _failed(_run(folder), "expect_column_values_to_be_in_set(exists)", "images (derived)")
    assert sha[:12] in line


def test_image_with_garbage_bytes(folder):
    store = schema.ImageStore(folder)
    bad = store.put_bytes(b"\x89PNG\r\n\x1a\n this is not an image", "png")
    df = _pairs(folder)
    df.loc[4, "image_l"] = bad
    _save_pairs(folder, df)
    line = _failed(_run(folder), "expect_column_values_to_be_in_set(decodes)", "images (derived)")
    assert bad[:12] in line


def test_image_below_min_side(folder):
    tiny = schema.ImageStore(folder).put_array(np.zeros((4, 4, 3), dtype=np.uint8))
    df = _pairs(folder)
    df.loc[6, "image_w"] = tiny
    _save_pairs(folder, df)
    report = _run(folder)
    assert tiny[:12] in _failed(report, "expect_column_values_to_be_between(width)", "images (derived)")
    _failed(report, "expect_column_values_to_be_between(height)", "images (derived)")


def test_decompression_bomb_fails_the_size_bound_without_decoding(folder, tmp_path):
    from PIL import Image

    # 1-bit and all zero: a few kB on disk that would decode to 1.2 GB of RGB.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    bomb = schema.ImageStore(folder).put_bytes((tmp_path / "bomb.png").read_bytes(), "png")
    df = _pairs(folder)
    df.loc[2, "image_w"] = bomb
    _save_pairs(folder, df)
    line = _failed(_run(folder), "expect_column_values_to_be_in_set(decodes)", "images (derived)")
    assert bomb[:12] in line and "decompression bomb" in line


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_non_rgb_images_are_valid(folder, tmp_path, mode):
    """Training decodes with ``convert("RGB")``, so a producer's grayscale or RGBA file is usable as stored."""
    from PIL import Image

    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (16, 16)).save(path)
    sha = schema.ImageStore(folder).put_bytes(path.read_bytes(), path.suffix)
    df = _pairs(folder)
    df.loc[3, "image_l"] = sha
    _save_pairs(folder, df)
    assert _run(folder).success


def test_too_many_ties(folder):
    df = _pairs(folder)
    df.loc[: len(df) // 2, "label"] = 0.5
    _save_pairs(folder, df)
    line = _failed(_run(folder), "expect_column_values_to_be_between(tie_fraction)", "dataset (derived)")
    assert "tie_fraction=0.5" in line


def test_too_many_quarantined(folder):
    rows = pd.DataFrame({"source_file": ["shard.jsonl"] * 40, "source_row": range(40), "reason": ["bad json"] * 40})
    schema.write_table(rows, folder / "quarantine.parquet", schema.QUARANTINE_SCHEMA)
    _failed(_run(folder), "expect_column_values_to_be_between(quarantine_fraction)", "dataset (derived)")


def test_too_few_pairs(folder):
    _failed(_run(folder, Validation(min_pairs=500)), "expect_table_row_count_to_be_between")


def test_ranking_of_one_image(folder):
    rankings = pd.read_parquet(folder / "rankings.parquet")
    lists = [list(v) for v in rankings.images]
    rankings["images"] = [lists[0][:1], *lists[1:]]
    rankings.to_parquet(folder / "rankings.parquet", index=False)
    _failed(_run(folder), "expect_column_values_to_be_between(n_images)", "ranking lists (derived)")


def test_missing_column_is_a_report_failure(folder):
    """Documented choice: a readable table with a missing column is invalid data (exit 1), not unreadable."""
    _save_pairs(folder, _pairs(folder).drop(columns=["split"]))
    report = _run(folder)
    assert "missing" in _failed(report, "expect_table_columns_to_match_set")
    assert "could not run" in _failed(report, "expect_column_values_to_not_be_null(split)")


# ----------------------------------------------------------------------------------------- unreadable
def test_corrupt_parquet_is_unreadable(folder):
    (folder / "pairs.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(DataUnreadableError, match="pairs.parquet"):
        _run(folder)


def test_corrupt_optional_table_is_unreadable(folder):
    (folder / "feedback.parquet").write_bytes(b"garbage")
    with pytest.raises(DataUnreadableError, match="feedback.parquet"):
        _run(folder)


def test_missing_pairs_or_folder_is_unreadable(folder, tmp_path):
    with pytest.raises(DataUnreadableError, match="not found"):
        _run(tmp_path / "nowhere")
    (folder / "pairs.parquet").unlink()
    with pytest.raises(DataUnreadableError, match="pairs.parquet"):
        _run(folder)
    assert issubclass(DataUnreadableError, ValueError)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_exit_codes_are_0_valid_1_invalid_2_unreadable(folder, tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    report = tmp_path / "out" / "validation.json"

    def validate(target: Path):
        return CliRunner().invoke(
            app, ["data", "validate", "--input", str(target), "--report", str(report), "--params", str(params)]
        )

    ok = validate(folder)
    assert ok.exit_code == 0, ok.output
    assert json.loads(report.read_text())["success"] is True

    df = _pairs(folder)
    df.loc[0, "label"] = 0.7
    _save_pairs(folder, df)
    bad = validate(folder)
    assert bad.exit_code == 1
    assert "expect_column_values_to_be_in_set(label)" in bad.output
    assert json.loads(report.read_text())["success"] is False

    unreadable = validate(tmp_path / "nowhere")
    assert unreadable.exit_code == 2
    assert "nowhere" in unreadable.output and "Traceback" not in unreadable.output
