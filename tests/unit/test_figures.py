"""Report figures are written as real, non-trivial PNG files."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prefalign.evaluation.figures import (
    accuracy_bars,
    accuracy_grouped_bars,
    calibration_plot,
    comparison_grid,
    image_grid,
    loss_curve,
    win_rate_bars,
)
from prefalign.world.grammar import all_attributes
from prefalign.world.render import render_batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes: int = 3000) -> Image.Image:
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size >= min_bytes
    image = Image.open(path)
    image.load()
    return image


def test_image_grid(tmp_path):
    images = render_batch(all_attributes()[::45][:12], 16)
    out = image_grid(images, ["base", "dpo", "dro"], 4, tmp_path / "sub" / "grid.png", title="three prompts")
    png = _check_png(out)
    assert png.width >= 4 * 16 * 4 and png.height >= 3 * 16 * 4  # upscaled, not thumbnails
    with pytest.raises(ValueError):
        image_grid(images, ["base", "dpo"], 4, tmp_path / "bad.png")


def test_loss_curve(tmp_path):
    rng = np.random.default_rng(0)
    history = {
        "loss": list(0.7 * np.exp(-np.arange(200) / 80) + rng.normal(0, 0.03, 200)),
        "implicit_acc": list(rng.random(200)),
        "empty": [],
    }
    _check_png(loss_curve(history, tmp_path / "loss.png", title="dpo"))
    _check_png(loss_curve({}, tmp_path / "none.png", title="nothing yet"), min_bytes=1000)


def test_win_rate_bars(tmp_path):
    rates = {
        "dpo_vs_base (oracle)": {"rate": 0.62, "ci_low": 0.55, "ci_high": 0.69, "n": 256},
        "dro_vs_base (oracle)": {"rate": 0.48, "ci_low": 0.41, "ci_high": 0.55, "n": 256},
    }
    _check_png(win_rate_bars(rates, tmp_path / "wr.png", title="win rates"))


def test_calibration_plot(tmp_path):
    rng = np.random.default_rng(1)
    pred = rng.random(1000)
    observed = (rng.random(1000) < pred).astype(float)
    _check_png(calibration_plot(pred, observed, tmp_path / "cal.png", n_bins=8))
    with pytest.raises(ValueError):
        calibration_plot(pred, observed[:10], tmp_path / "bad.png")


def test_importing_figures_does_not_import_matplotlib():
    code = "import sys, prefalign.evaluation.figures, prefalign.evaluation; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_loss_curve_places_sparse_series_at_their_steps(tmp_path):
    history = {"loss": [1.0 - 0.001 * i for i in range(300)], "val_accuracy": [0.6, 0.65, 0.7]}
    _check_png(loss_curve(history, tmp_path / "val.png", title="reward", steps={"val_accuracy": [100, 200, 300]}))
    with pytest.raises(ValueError, match="val_accuracy: 3 values but 2 steps"):
        loss_curve(history, tmp_path / "bad.png", title="reward", steps={"val_accuracy": [100, 200]})


def test_accuracy_bars(tmp_path):
    out = accuracy_bars(
        {"reward model": [0.681], "perception ceiling": [0.694, 0.699, 0.701]},
        tmp_path / "acc.png",
        title="reward accuracy",
        reference=0.728,
        target=0.698,
    )
    png = _check_png(out)
    assert png.width > png.height


def _accuracy(models=("base", "dpo", "dro"), attrs=("found", "color", "position", "all")):
    rng = np.random.default_rng(2)
    out = {}
    for m in models:
        means = rng.random(len(attrs))
        out[m] = {
            a: {"mean": v, "ci_low": max(v - 0.1, 0.0), "ci_high": min(v + 0.1, 1.0)}
            for a, v in zip(attrs, means, strict=True)
        }
    return out


def test_accuracy_grouped_bars(tmp_path):
    png = _check_png(accuracy_grouped_bars(_accuracy(), tmp_path / "acc.png", title="strict accuracy"))
    assert png.width > png.height
    bad = _accuracy()
    del bad["dro"]["color"]
    with pytest.raises(ValueError, match="'dro' has attributes"):
        accuracy_grouped_bars(bad, tmp_path / "bad.png", title="x")
    with pytest.raises(ValueError, match="at least one model"):
        accuracy_grouped_bars({}, tmp_path / "bad.png", title="x")


def test_comparison_grid(tmp_path):
    prompts, seeds, models = 5, 2, 3
    images = render_batch(all_attributes()[: prompts * seeds * models], 16).reshape(prompts, seeds, models, 16, 16, 3)
    captions = [[[f"{0.1 * (p + s + m):.2f}" for m in range(models)] for s in range(seeds)] for p in range(prompts)]
    marks = [
        [["" if m else "\u2717col \u2717pos\n\u2717size" for m in range(models)] for s in range(seeds)]
        for p in range(prompts)
    ]
    out = comparison_grid(
        images,
        [f"prompt {p}" for p in range(prompts)],
        ["base", "dpo", "dro"],
        tmp_path / "cmp.png",
        captions=captions,
        marks=marks,
        title="two lines\nof title",
    )
    png = _check_png(out)
    # Two column groups of 2 seeds x 3 models, each tile upscaled 5x (80 px): at least 12 tiles wide, 3 rows high.
    assert png.width >= 12 * 80 and png.height >= 3 * 80
    _check_png(comparison_grid(images, [f"p{p}" for p in range(prompts)], ["a", "b", "c"], tmp_path / "plain.png"))


@pytest.mark.parametrize("shape", [(5, 2, 3, 16, 16, 4), (5, 2, 2, 16, 16, 3), (4, 2, 3, 16, 16, 3), (30, 16, 16, 3)])
def test_comparison_grid_bad_shape(tmp_path, shape):
    with pytest.raises(ValueError, match="got array of shape"):
        comparison_grid(np.zeros(shape, np.uint8), [f"p{p}" for p in range(5)], ["a", "b", "c"], tmp_path / "x.png")


def test_comparison_grid_bad_captions(tmp_path):
    images = np.zeros((2, 1, 3, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"captions must be \(prompts, seeds, models\) = \(2, 1, 3\)"):
        comparison_grid(images, ["p0", "p1"], ["a", "b", "c"], tmp_path / "x.png", captions=[[["1", "2", "3"]]])
