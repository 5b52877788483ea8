"""Report figures as PNG files: sample grids, training curves, win-rate bars, calibration.

matplotlib is imported inside each function (importing this module costs nothing) and only through its
object API with the Agg canvas, so no GUI backend and no global pyplot state are involved: figures can
be drawn from worker threads and headless machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def _figure(width: float, height: float) -> Figure:
    """A new Agg-backed figure (inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight", dpi=DPI)
    return out


FRAME = (150, 150, 150)  # tile outline: visible against white, black and gray backgrounds alike


def _mosaic(images: np.ndarray, rows: int, cols: int, upscale: int, gap: int) -> np.ndarray:
    """One uint8 picture of rows x cols tiles, upscaled by pixel repetition and outlined, on white."""
    n, h, w, _ = images.shape
    th, tw = h * upscale + 2, w * upscale + 2  # with a 1 px outline
    canvas = np.full((rows * (th + gap) - gap, cols * (tw + gap) - gap, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = r * (th + gap), c * (tw + gap)
        canvas[y : y + th, x : x + tw] = FRAME
        canvas[y + 1 : y + th - 1, x + 1 : x + tw - 1] = np.repeat(np.repeat(images[k], upscale, 0), upscale, 1)
    return canvas


def image_grid(
    images: np.ndarray,
    rows_labels: Sequence[str],
    cols: int,
    path: str | Path,
    *,
    title: str | None = None,
    upscale: int = 4,
) -> Path:
    """A PNG grid of images: one labelled row per model (or prompt), one column per sample.

    Args:
        images: uint8 (rows * cols, H, W, 3), row-major (row 0's samples first).
        rows_labels: One label per row, drawn on the left.
        cols: Images per row.
        path: Output PNG.
        title: Optional title (e.g. the prompts).
        upscale: Nearest-neighbour magnification, so 16 px images stay crisp and visible.

    Returns:
        The written path.
    """
    images = np.asarray(images)
    rows = len(rows_labels)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != rows * cols:
        raise ValueError(f"expected {rows} x {cols} RGB images, got array of shape {images.shape}")
    gap = max(1, upscale // 2)
    mosaic = _mosaic(images.astype(np.uint8), rows, cols, upscale, gap=gap)
    height, width = mosaic.shape[:2]
    fig = _figure(max(width / DPI, 2.0) + 0.5, max(height / DPI, 0.6) + 0.4)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    pitch = (height + gap) / rows  # tile + outline + gap; imshow puts pixel i's centre at i
    ax.set_yticks([r * pitch + (pitch - gap) / 2 - 0.5 for r in range(rows)], labels=list(rows_labels))
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0, labelsize=9)
    ax.set_frame_on(False)
    if title:
        ax.set_title(title, fontsize=10, loc="left", wrap=True)
    return _save(fig, path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start, so it has no lag artifacts there)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def loss_curve(
    history: Mapping[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str = "step",
    steps: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Training curves: one panel per key (keys have different scales), raw values and a moving average.

    Args:
        history: Series name (e.g. "loss", "implicit_acc") to one value per step.
        path: Output PNG.
        title: Figure title.
        xlabel: Label of the shared x axis.
        steps: x positions of a series recorded only now and then (e.g. validation every N steps);
            other series are at 1, 2, 3, ...

    Returns:
        The written path.
    """
    series = {k: np.asarray(v, np.float64) for k, v in history.items() if len(v)}
    fig = _figure(7.0, 1.0 + 1.8 * max(len(series), 1))
    if not series:
        fig.text(0.5, 0.5, "no data", ha="center", va="center")
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0] if series else []
    for ax, (name, values) in zip(axes, series.items(), strict=False):
        at = (steps or {}).get(name)
        if at is not None and len(at) != len(values):
            raise ValueError(f"{name}: {len(values)} values but {len(at)} steps")
        xs = np.asarray(at, np.float64) if at is not None else np.arange(1, len(values) + 1)
        window = max(1, len(values) // 20)
        ax.plot(xs, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw",
                marker="." if at is not None else None)
        ax.plot(xs, _moving_average(values, window), color="tab:blue", linewidth=1.8,
                label=f"moving average ({window})")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if series:
        axes[0].legend(loc="best", fontsize=8)
        axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    return _save(fig, path)


def win_rate_bars(win_rates: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str) -> Path:
    """Horizontal bars of win rates with their 95% intervals and a dashed line at one half.

    Args:
        win_rates: Comparison name to a :func:`prefalign.evaluation.metrics.win_rate` result.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    names = list(win_rates)
    rates = np.array([float(win_rates[k]["rate"]) for k in names])
    low = np.array([float(win_rates[k]["ci_low"]) for k in names])
    high = np.array([float(win_rates[k]["ci_high"]) for k in names])
    fig = _figure(7.0, 1.2 + 0.45 * max(len(names), 1))
    ax = fig.add_subplot()
    ypos = np.arange(len(names))[::-1]  # first comparison on top
    colors = ["tab:green" if lo > 0.5 else "tab:red" if hi < 0.5 else "tab:gray" for lo, hi in zip(low, high)]
    err = np.vstack([np.maximum(rates - low, 0), np.maximum(high - rates, 0)])
    ax.barh(ypos, rates, xerr=err, color=colors, alpha=0.8, capsize=4)
    for y, rate in zip(ypos, rates, strict=True):
        ax.text(0.01, y, f"{rate:.2f}", va="center", fontsize=8, color="white")
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(ypos, labels=names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (ties count half); green: CI above 0.5, red: below")
    ax.set_title(title)
    return _save(fig, path)


def calibration_plot(pred_prob: ArrayLike, observed: ArrayLike, path: str | Path, *, n_bins: int = 10) -> Path:
    """Reliability diagram: mean predicted probability vs observed win rate per bin, with the diagonal.

    Args:
        pred_prob: Predicted P(first image preferred), in [0, 1].
        observed: What happened (1 = first preferred, 0 = second, 0.5 = tie).
        path: Output PNG.
        n_bins: Equal-width bins over [0, 1]; empty bins are skipped, marker area follows the count.

    Returns:
        The written path.
    """
    pred = np.asarray(pred_prob, np.float64).ravel()
    obs = np.asarray(observed, np.float64).ravel()
    if pred.shape != obs.shape:
        raise ValueError(f"{pred.size} predictions but {obs.size} observations")
    bins = np.clip((pred * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    used = counts > 0
    mean_pred = np.bincount(bins, weights=pred, minlength=n_bins)[used] / counts[used]
    mean_obs = np.bincount(bins, weights=obs, minlength=n_bins)[used] / counts[used]
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    sizes = 20 + 200 * counts[used] / max(counts.max(), 1)
    ax.plot(mean_pred, mean_obs, color="tab:blue", linewidth=1)
    ax.scatter(mean_pred, mean_obs, s=sizes, color="tab:blue", zorder=3, label=f"bins (n={pred.size})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed win rate")
    ax.set_title("calibration")
    ax.legend(loc="upper left", fontsize=8, markerscale=0.5)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_bars(
    accuracies: Mapping[str, Sequence[float]], path: str | Path, *, title: str, reference: float | None = None,
    target: float | None = None,
) -> Path:
    """Horizontal bars of accuracies, each the mean of its values with their range as whiskers.

    Args:
        accuracies: Name (e.g. "reward model", "perception ceiling") to one or more measured values.
        path: Output PNG.
        title: Figure title.
        reference: Drawn as a solid line (e.g. the Bayes rate).
        target: Drawn as a dashed line (e.g. the Bayes rate minus 3 points).

    Returns:
        The written path.
    """
    names = list(accuracies)
    values = [np.asarray(accuracies[k], np.float64) for k in names]
    means = np.array([v.mean() for v in values])
    err = np.vstack([means - [v.min() for v in values], [v.max() for v in values] - means])
    fig = _figure(7.0, 1.4 + 0.45 * max(len(names), 1))
    ax = fig.add_subplot()
    ypos = np.arange(len(names))[::-1]
    ax.barh(ypos, means, xerr=err, color="tab:blue", alpha=0.75, capsize=4)
    for y, mean, v in zip(ypos, means, values, strict=True):
        label = f"{mean:.3f}" if len(v) == 1 else f"{mean:.3f} ({v.min():.3f}-{v.max():.3f}, n={len(v)})"
        ax.text(0.505, y, label, va="center", fontsize=8, color="white")
    lines = [(reference, "solid", "Bayes rate"), (target, "dashed", "target")]
    for x, style, label in lines:
        if x is not None:
            ax.axvline(x, color="black", linestyle=style, linewidth=1, label=f"{label} {x:.3f}")
    ax.set_yticks(ypos, labels=names)
    low = min(0.5, float(np.min([v.min() for v in values])) - 0.02) if values else 0.5
    ax.set_xlim(low, 1.0 if reference is None else min(1.0, max(reference, float(means.max())) + 0.04))
    ax.set_xlabel("held-out pairwise accuracy")
    if reference is not None or target is not None:
        # Outside the axes: bars reach the reference lines, so any corner inside would cover one.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)
    return _save(fig, path)
