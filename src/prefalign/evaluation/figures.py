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
    history: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "step",
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
    axes: list[Any] = list(fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]) if series else []
    for ax, (name, values) in zip(axes, series.items(), strict=False):
        at = (steps or {}).get(name)
        if at is not None and len(at) != len(values):
            raise ValueError(f"{name}: {len(values)} values but {len(at)} steps")
        xs = np.asarray(at, np.float64) if at is not None else np.arange(1, len(values) + 1)
        window = max(1, len(values) // 20)
        ax.plot(
            xs, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw", marker="." if at is not None else None
        )
        ax.plot(
            xs, _moving_average(values, window), color="tab:blue", linewidth=1.8, label=f"moving average ({window})"
        )
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
    accuracies: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    reference: float | None = None,
    target: float | None = None,
) -> Path:
    """Horizontal bars of accuracies, each the mean of its values with their range as whiskers.

    Args:
        accuracies: Name (e.g. "reward model", "perception ceiling") to one or more measured values.
        path: Output PNG.
        title: Figure title.
        reference: Drawn as a solid line (e.g. the Bayes rate).
        target: Drawn as a dashed line (e.g. the perception ceiling minus 1.5 points).

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


def accuracy_grouped_bars(
    accuracy: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, *, title: str
) -> Path:
    """Grouped vertical bars of per-attribute accuracies: one group per attribute, one bar per model.

    Args:
        accuracy: Model (e.g. "base", "dpo", "dro") to attribute to ``{"mean", "ci_low", "ci_high"}``;
            every model must have the same attributes. Bars follow the mapping orders.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ValueError: If there are no models or the models' attributes differ.
    """
    models = list(accuracy)
    if not models:
        raise ValueError("accuracy_grouped_bars needs at least one model")
    attrs = list(accuracy[models[0]])
    for name in models:
        if list(accuracy[name]) != attrs:
            raise ValueError(f"model {name!r} has attributes {list(accuracy[name])}, {models[0]!r} has {attrs}")
    fig = _figure(1.6 + 0.35 * len(attrs) * (len(models) + 1), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(attrs))
    for k, name in enumerate(models):
        mean = np.array([float(accuracy[name][a]["mean"]) for a in attrs])
        low = np.array([float(accuracy[name][a]["ci_low"]) for a in attrs])
        high = np.array([float(accuracy[name][a]["ci_high"]) for a in attrs])
        xs = x - 0.4 + width * (k + 0.5)
        err = np.vstack([np.maximum(mean - low, 0), np.maximum(high - mean, 0)])
        ax.bar(
            xs,
            mean,
            width * 0.92,
            yerr=err,
            capsize=2,
            label=name,
            color=f"C{k}",
            alpha=0.85,
            error_kw={"linewidth": 0.8},
        )
        for xi, m, hi in zip(xs, mean, high, strict=True):
            # In the bar's foot (above the bar the error bar would cross the number); over the interval
            # when the bar is too short to hold it.
            if m >= 0.15:
                ax.text(xi, 0.02, f"{m:.2f}", ha="center", va="bottom", rotation=90, fontsize=7, color="white")
            else:
                ax.text(xi, hi + 0.02, f"{m:.2f}", ha="center", va="bottom", rotation=90, fontsize=7)
    ax.set_xticks(x, labels=attrs)
    ax.set_ylim(0, 1.03)  # a little headroom, so intervals that end at 1 keep their caps visible
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy (strict reading)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # Outside the axes: bars reach 1.0 in every corner, so any legend inside would cover one.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def comparison_grid(
    images: np.ndarray,
    prompts: Sequence[str],
    models: Sequence[str],
    path: str | Path,
    *,
    captions: Sequence[Sequence[Sequence[str]]] | None = None,
    marks: Sequence[Sequence[Sequence[str]]] | None = None,
    title: str | None = None,
    upscale: int = 5,
    column_groups: int = 2,
) -> Path:
    """Models side by side on the same prompts and seeds: one block per prompt, headed by its text.

    Each block is one row: for each seed, the models' images next to each other (same initial noise, so
    the difference between neighbours is the model's doing). Blocks fill ``column_groups`` columns, top
    to bottom, so many prompts stay on one readable page.

    Args:
        images: uint8 (prompts, seeds, models, H, W, 3).
        prompts: One header per prompt.
        models: One column label per model.
        path: Output PNG.
        captions: Optional (prompts, seeds, models) short texts under each image (e.g. its score).
        marks: Optional (prompts, seeds, models) red texts under the caption (e.g. the attributes it gets
            wrong; a 16 px tile at 5x holds about 12 characters a line); an empty string draws a green check
            mark instead.
        title: Optional title (a few lines at most, e.g. a legend of the marks).
        upscale: Nearest-neighbour magnification, so 16 px images stay crisp.
        column_groups: Side-by-side columns of prompt blocks.

    Returns:
        The written path.

    Raises:
        ValueError: If the shapes of ``images``, ``captions`` or ``marks`` do not match the prompts and models.
    """
    images = np.asarray(images)
    n_prompts, n_models = len(prompts), len(models)
    if images.ndim != 6 or images.shape[-1] != 3 or images.shape[0] != n_prompts or images.shape[2] != n_models:
        raise ValueError(
            f"expected images (prompts={n_prompts}, seeds, models={n_models}, H, W, 3), "
            f"got array of shape {images.shape}"
        )
    n_seeds, h, w = images.shape[1], images.shape[3], images.shape[4]
    for name, given in (("captions", captions), ("marks", marks)):
        if given is not None and np.shape(np.asarray(given, dtype=object)) != (n_prompts, n_seeds, n_models):
            raise ValueError(
                f"{name} must be (prompts, seeds, models) = {(n_prompts, n_seeds, n_models)}, "
                f"got {np.shape(np.asarray(given, dtype=object))}"
            )
    groups = max(1, min(column_groups, n_prompts))
    rows = -(-n_prompts // groups)
    # Layout in output pixels (the axes map one data unit to one pixel at DPI).
    th, tw = h * upscale + 2, w * upscale + 2  # tile with its 1 px outline
    model_gap, seed_gap, group_gap = 4, 18, 40
    lines = [str(t).count("\n") + 1 for row in marks or [] for seed in row for t in seed]
    mark_lines = max(lines, default=1) if marks is not None else 0
    header, caption_h, block_gap = 18, 6 + 12 * int(captions is not None) + 11 * mark_lines, 10
    block_w = n_seeds * (n_models * tw + (n_models - 1) * model_gap) + (n_seeds - 1) * seed_gap
    block_h = header + th + caption_h + block_gap
    title_lines = 0 if not title else title.count("\n") + 1
    top = 8 + 17 * title_lines + 36  # title, then the seed and model labels
    width = groups * block_w + (groups - 1) * group_gap
    height = top + rows * block_h
    canvas = np.full((height, width, 3), 255, np.uint8)

    seed_w = n_models * tw + (n_models - 1) * model_gap

    def tile_x(g: int, s: int, m: int) -> int:
        return g * (block_w + group_gap) + s * (seed_w + seed_gap) + m * (tw + model_gap)

    fig = _figure(width / DPI, height / DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    texts: list[tuple[float, float, str, dict[str, Any]]] = []
    for p in range(n_prompts):
        g, r = divmod(p, rows)
        y = top + r * block_h
        texts.append((g * (block_w + group_gap), y + header - 4, prompts[p], {"fontsize": 8.5, "va": "bottom"}))
        for s in range(n_seeds):
            for m in range(n_models):
                x = tile_x(g, s, m)
                canvas[y + header : y + header + th, x : x + tw] = FRAME
                tile = np.repeat(np.repeat(images[p, s, m].astype(np.uint8), upscale, 0), upscale, 1)
                canvas[y + header + 1 : y + header + th - 1, x + 1 : x + tw - 1] = tile
                cy = y + header + th + 3
                if captions is not None:
                    style: dict[str, Any] = {"fontsize": 8, "ha": "center", "va": "top"}
                    texts.append((x + tw / 2, cy, str(captions[p][s][m]), style))
                    cy += 12
                if marks is not None:
                    mark = str(marks[p][s][m])
                    style = {
                        "fontsize": 7.5,
                        "ha": "center",
                        "va": "top",
                        "color": "#c00000" if mark else "#008000",
                        "linespacing": 1.0,
                    }
                    texts.append((x + tw / 2, cy, mark or "\u2713", style))
    for g in range(groups):
        for s in range(n_seeds):
            x0 = tile_x(g, s, 0)
            texts.append(
                (
                    x0 + seed_w / 2,
                    top - 20,
                    f"seed {s}",
                    {"fontsize": 8, "ha": "center", "va": "bottom", "color": "dimgray"},
                )
            )
            for m, name in enumerate(models):
                texts.append(
                    (
                        tile_x(g, s, m) + tw / 2,
                        top - 4,
                        name,
                        {"fontsize": 9, "ha": "center", "va": "bottom", "weight": "bold"},
                    )
                )
    if title:
        texts.append((0, 4, title, {"fontsize": 9, "va": "top", "linespacing": 1.3}))
    ax.imshow(canvas, interpolation="nearest")
    for tx, ty, text, text_style in texts:
        ax.text(tx - 0.5, ty - 0.5, text, **text_style)  # imshow puts pixel i's centre at i
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    return _save(fig, path)
