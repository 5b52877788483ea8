"""The demo world's oracle: how well an image shows its prompt, measured from pixels alone.

The oracle must score generated samples, which are noisy, blurry and colour-shifted, not only clean
renderings; a fixed colour-distance threshold against the named background gives ~0.2 to samples that
look partly right (measured on the first demo base model). So every step is relative to what is
measured in the image itself:

1. background = per-channel median of the border pixels (the object never covers half the border);
2. object core = largest 4-connected component of the 3x3-median-filtered distance to that background,
   above half its peak (the median removes pixel noise); object colour = per-channel median of the
   core's most distinct raw pixels. No object when the peak or the object colour is too close to the
   background (pure noise has a peak, but its "object colour" stays near the background);
3. object mask = pixels near the core whose colour lies at least 40% of the way from the background
   to the object colour (a coverage threshold: a 3x3 box blur keeps a square's corners at 4/9 and
   puts the pixels outside a straight edge at 3/9, so the mask of a blurred shape keeps its outline);
4. position = centroid of the mask; size = its area; shape = soft IoU of the object's coverage map
   with centred templates of each shape (crisp and blurred, +-1 px shifts) at the nearer size. Template
   matching replaces a bounding-box fill ratio (square 1, disc pi/4, triangle 1/2), which a single stray
   noise pixel breaks; the named shape scores by how close its IoU comes to the best shape's;
5. cleanliness = RMS difference between the image and its two-colour reconstruction (background +
   mask x object colour): zero for a clean rendering, about sigma for pixel noise, larger for blur,
   texture or stray blobs.

Each term is a Gaussian of the distance between the measurement and what the prompt's clean
rendering gives, so the score is graded, not binary. The colour term forgives blending with up to 25%
background (the purest pixel of a blurred 16 px small triangle is 7/9 object). Weights (sum 1; see
``WEIGHTS``): colour 0.25, background 0.15, position 0.20, size 0.10, shape 0.15, clean 0.15. A missing
object scores 0 on the four object terms, so a plain background scores at most 0.30.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from prefalign.world.grammar import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, parse_prompt
from prefalign.world.render import SIZE_FRACTION, shape_mask

WEIGHTS: dict[str, float] = {
    "color": 0.25,
    "background": 0.15,
    "position": 0.20,
    "size": 0.10,
    "shape": 0.15,
    "clean": 0.15,
}
# Scales of the Gaussian terms. Colours: 50 RGB units, so the closest pair of object colours (~105 apart)
# scores ~0.1 for each other while a drift of 25 units keeps ~0.9.
COLOR_SCALE = 50.0
BACKGROUND_SCALE = 50.0
POSITION_SCALE = 0.10  # of the image side; neighbouring positions are >= 0.35 apart
SIZE_SCALE = 0.30  # on log(sqrt(area ratio)); small vs large is log 2 = 0.69
SHAPE_SCALE = 0.10  # on 1 - IoU(named)/IoU(best shape); wrong clean shapes have ratios <= 0.75
CLEAN_SCALE = 25.0  # RMS residual on the 0-255 scale; sigma-25 pixel noise keeps ~0.6
OBJECT_FLOOR = 40.0  # RGB distance: a median-filtered peak below this everywhere means "no object"
MIN_CONTRAST = 60.0  # RGB distance of the object colour from the background (palette minimum ~120)
COVERAGE_THRESHOLD = 0.4
MIN_COLOR_COVERAGE = 0.75  # the object colour may be this blended with the background at no cost

_SEP_4 = np.zeros((3, 3, 3), bool)
_SEP_4[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity inside each image, none across
_SEP_8 = np.zeros((3, 3, 3), bool)
_SEP_8[1] = True


@dataclass(frozen=True)
class Measurements:
    """What the oracle reads off a batch of N images (arrays indexed by image)."""

    found: np.ndarray  # (N,) bool: an object stands out from the background
    background: np.ndarray  # (N, 3) RGB
    color: np.ndarray  # (N, 3) RGB of the object core
    centroid: np.ndarray  # (N, 2) (x, y) as fractions of the side
    area: np.ndarray  # (N,) pixels in the object mask
    shape_match: np.ndarray  # (N, shapes) soft IoU with each shape's template
    residual: np.ndarray  # (N,) RMS of image minus its two-colour reconstruction


def _as_batch(images: Any) -> np.ndarray:
    """float64 (N, S, S, 3) on the 0-255 scale from a PIL image, an (H, W, 3) array, a stack or a list."""
    if hasattr(images, "convert"):  # PIL image
        images = np.asarray(images.convert("RGB"))
    elif isinstance(images, list | tuple):
        return np.concatenate([_as_batch(im) for im in images]) if images else np.zeros((0, 16, 16, 3))
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        arr = np.repeat(arr[..., None], 3, axis=-1)  # grey levels
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4) or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected square RGB images (N, S, S, 3), got shape {np.shape(images)}")
    return arr[..., :3]


def _largest_component(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Per image of the (N, H, W) mask, only its largest connected component."""
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    n = mask.shape[0]
    owner = np.zeros(count + 1, np.int64)
    owner[labels.ravel()] = np.repeat(np.arange(n), mask[0].size)
    # Per image, the label with the most pixels: sort labels by (image, size) and take each image's last.
    order = np.lexsort((sizes, owner))
    sorted_owner = owner[order]
    last = np.r_[sorted_owner[1:] != sorted_owner[:-1], True]
    best = np.full(n, -1, np.int64)
    best[sorted_owner[last]] = order[last]
    best[sizes[np.maximum(best, 0)] == 0] = -1
    return labels == best[:, None, None]


def _masked_median(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 3) per-channel median of the pixels in ``mask``; NaN where the mask is empty."""
    flat = np.where(mask[..., None], images, np.nan).reshape(len(images), -1, 3)
    out = np.full((len(images), 3), np.nan)
    has = mask.reshape(len(images), -1).any(axis=1)
    if has.any():
        out[has] = np.nanmedian(flat[has], axis=1)
    return out


def _border_median(images: np.ndarray) -> np.ndarray:
    """(N, 3) per-channel median of the border pixels: the background colour."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def _object_masks(images: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(found (N,), object colour (N, 3), object mask (N, S, S), soft coverage (N, S, S)) given the background."""
    dist = np.linalg.norm(images - bg[:, None, None], axis=-1)
    smooth = ndimage.median_filter(dist, size=(1, 3, 3), mode="nearest")
    peak = smooth.max(axis=(1, 2))
    found = peak >= OBJECT_FLOOR
    core = _largest_component(smooth >= np.maximum(OBJECT_FLOOR, 0.5 * peak)[:, None, None], _SEP_4)
    core &= found[:, None, None]
    # Colour from the most distinct part of the core: blur mixes a small shape's edge pixels with the
    # background and only its centre keeps (nearly) the true colour. A 3x3 mean ranks that centre first
    # (a median is flat across a blurred small shape).
    local = np.where(core, ndimage.uniform_filter(dist, size=(1, 3, 3), mode="nearest"), 0.0)
    color = _masked_median(images, core & (local >= 0.85 * local.max(axis=(1, 2))[:, None, None]))
    color = np.where(np.isnan(color), bg, color)
    # Pure noise also has a peak; but the median colour of its "core" stays near the background.
    found &= np.linalg.norm(color - bg, axis=-1) >= MIN_CONTRAST
    axis = color - bg
    norm2 = np.maximum((axis**2).sum(-1), 1e-9)
    coverage = np.einsum("nhwc,nc->nhw", images - bg[:, None, None], axis) / norm2[:, None, None]
    near = ndimage.binary_dilation(core & found[:, None, None], structure=_SEP_8, iterations=2)
    mask = _largest_component(near & (coverage >= COVERAGE_THRESHOLD), _SEP_4) & found[:, None, None]
    return found, color, mask, np.where(near, coverage.clip(0.0, 1.0), 0.0)


def _crop_side(side: int) -> int:
    """Side of the window that holds a large shape, a blur margin and the alignment shifts."""
    return side // 2 + 6


def _crops(maps: np.ndarray, centroid_px: np.ndarray, k: int, shift: tuple[int, int]) -> np.ndarray:
    """(N, k, k) windows of (N, S, S) maps centred on each (x, y) centroid (pixels), zero outside."""
    padded = np.pad(maps, ((0, 0), (k, k), (k, k)))
    origin = np.rint(centroid_px - k / 2).astype(np.int64) + k + np.asarray(shift)
    span = np.arange(k)
    rows = origin[:, 1, None] + span
    cols = origin[:, 0, None] + span
    return padded[np.arange(len(maps))[:, None, None], rows[:, :, None], cols[:, None, :]]


@functools.lru_cache(maxsize=16)
def _shape_templates(side: int) -> np.ndarray:
    """(sizes, shapes, 2, k, k) centred coverage windows of every shape, crisp and 3x3-blurred."""
    k = _crop_side(side)
    masks = np.stack([shape_mask(sh, sz, "center", side) for sz in SIZES for sh in SHAPES]).astype(np.float64)
    blurred = ndimage.uniform_filter(masks, size=(1, 3, 3), mode="constant")
    out = []
    for maps in (masks, blurred):
        grid = np.arange(side) + 0.5
        area = maps.sum(axis=(1, 2))
        centroid = np.stack([(maps.sum(1) * grid).sum(1), (maps.sum(2) * grid).sum(1)], 1) / area[:, None]
        out.append(_crops(maps, centroid, k, (0, 0)))
    return np.stack(out, axis=1).reshape(len(SIZES), len(SHAPES), 2, k, k)


def _shape_match(coverage: np.ndarray, centroid_px: np.ndarray, size_class: np.ndarray) -> np.ndarray:
    """(N, shapes) best soft IoU of each image's object with each shape of its size class.

    Soft IoU (sum of minima over sum of maxima of the coverages) over +-1 pixel shifts and over crisp
    and blurred templates: stray noise pixels cost a little everywhere instead of breaking a bounding box.
    """
    side = coverage.shape[1]
    templates = _shape_templates(side)[size_class]  # (N, shapes, 2, k, k)
    k = templates.shape[-1]
    best = np.zeros((len(coverage), len(SHAPES)))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            window = _crops(coverage, centroid_px, k, (dx, dy))[:, None, None]
            inter = np.minimum(window, templates).sum(axis=(-1, -2))
            union = np.maximum(window, templates).sum(axis=(-1, -2))
            best = np.maximum(best, (inter / np.maximum(union, 1e-9)).max(axis=2))
    return best


def _size_class(area: np.ndarray, side: int) -> np.ndarray:
    """0 (small) or 1 (large): the nearer size on a log scale, from the mask area in pixels."""
    box = np.array([SIZE_FRACTION[s] for s in SIZES]) * side
    return (np.log(np.maximum(area, 1)) >= np.log(box[0] * box[1])).astype(np.int64)


def measure(images: Any) -> Measurements:
    """Measure background, object colour, position, size, shape and cleanliness of images.

    Args:
        images: uint8 (or 0-255 float) (N, S, S, 3) or (S, S, 3) array, or a PIL image.

    Returns:
        The batch's measurements.
    """
    batch = _as_batch(images)
    n, side = batch.shape[0], batch.shape[1]
    bg = _border_median(batch)
    found, color, mask, coverage = _object_masks(batch, bg)
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    grid = np.arange(side) + 0.5
    cx = (mask.sum(axis=1) * grid).sum(1) / np.maximum(area, 1)
    cy = (mask.sum(axis=2) * grid).sum(1) / np.maximum(area, 1)
    centroid_px = np.stack([cx, cy], 1)
    match = _shape_match(coverage, centroid_px, _size_class(area, side))
    ideal = bg[:, None, None] + mask[..., None] * (color - bg)[:, None, None]
    residual = np.sqrt(((batch - ideal) ** 2).mean(axis=(1, 2, 3))) if n else np.zeros(0)
    return Measurements(found, bg, color, centroid_px / side, area, match, residual)


@functools.lru_cache(maxsize=16)
def _templates(side: int) -> dict[str, np.ndarray]:
    """Area and centroid of clean renderings at this side, indexed [shape, size, position]."""
    masks = np.stack([shape_mask(sh, sz, pos, side) for sh in SHAPES for sz in SIZES for pos in POSITIONS])
    grid = np.arange(side) + 0.5
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    cx = (masks.sum(axis=1) * grid).sum(1) / area / side
    cy = (masks.sum(axis=2) * grid).sum(1) / area / side
    dims = (len(SHAPES), len(SIZES), len(POSITIONS))
    return {"area": area.reshape(dims), "centroid": np.stack([cx, cy], 1).reshape(*dims, 2)}


@functools.lru_cache(maxsize=4096)
def _prompt_index(prompt: str) -> tuple[int, int, int, int, int]:
    """(shape, size, position, colour, background) indices of a grammar prompt."""
    a = parse_prompt(prompt)
    return (
        SHAPES.index(a.shape),
        SIZES.index(a.size),
        POSITIONS.index(a.position),
        list(COLORS).index(a.color),
        list(BACKGROUNDS).index(a.background),
    )


def _gauss(dist: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * (np.asarray(dist) / scale) ** 2)


def _color_distance(measured: np.ndarray, named: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(N,) distance from the measured colour to the named colour blended with up to 25% background.

    A blurred small shape has no pixel fully covered (a 16 px small triangle peaks at 7/9 coverage), so
    its purest pixels are the named colour mixed with the background; that blend is not a wrong colour.
    """
    axis = named - bg
    t = (((measured - bg) * axis).sum(-1) / np.maximum((axis**2).sum(-1), 1e-9)).clip(MIN_COLOR_COVERAGE, 1.0)
    return np.linalg.norm(measured - (bg + t[:, None] * axis), axis=1)


def _shape_term(m: Measurements, shape: np.ndarray) -> np.ndarray:
    """How close the named shape comes to the best-matching shape (1 when it is the best match)."""
    named = m.shape_match[np.arange(len(shape)), shape]
    ratio = named / np.maximum(m.shape_match.max(axis=1), 1e-9)
    return _gauss(1.0 - ratio, SHAPE_SCALE)


def _terms(prompts: Sequence[str], m: Measurements, side: int) -> dict[str, np.ndarray]:
    """Every score term of every image, each in [0, 1]."""
    idx = np.array([_prompt_index(p) for p in prompts], np.int64).reshape(-1, 5)
    shape, size, pos, col, bgi = idx.T
    ref = _templates(side)
    colors = np.array(list(COLORS.values()), np.float64)
    backgrounds = np.array(list(BACKGROUNDS.values()), np.float64)
    ref_area = ref["area"][shape, size, pos]
    ratio = np.log(np.sqrt(np.maximum(m.area, 1) / ref_area))
    terms = {
        "color": _gauss(_color_distance(m.color, colors[col], m.background), COLOR_SCALE),
        "background": _gauss(np.linalg.norm(m.background - backgrounds[bgi], axis=1), BACKGROUND_SCALE),
        "position": _gauss(np.linalg.norm(m.centroid - ref["centroid"][shape, size, pos], axis=1), POSITION_SCALE),
        "size": _gauss(ratio, SIZE_SCALE),
        "shape": _shape_term(m, shape),
        "clean": _gauss(m.residual, CLEAN_SCALE),
    }
    for name in ("color", "position", "size", "shape"):
        terms[name] = np.where(m.found, terms[name], 0.0)
    return terms


def _combine(terms: dict[str, np.ndarray]) -> np.ndarray:
    return np.clip(sum(WEIGHTS[k] * terms[k] for k in WEIGHTS), 0.0, 1.0)


def oracle_scores(prompts: Sequence[str], images: Any) -> np.ndarray:
    """Oracle scores of a batch.

    Args:
        prompts: One grammar prompt per image.
        images: uint8 (N, S, S, 3) array (0-255 floats also work).

    Returns:
        float64 (N,) scores in [0, 1].

    Raises:
        ValueError: If a prompt is outside the grammar or the counts differ.
    """
    batch = _as_batch(images) if len(prompts) else np.zeros((0, 16, 16, 3))
    if len(prompts) != len(batch):
        raise ValueError(f"{len(prompts)} prompts but {len(batch)} images")
    if not len(batch):
        return np.zeros(0)
    return _combine(_terms(list(prompts), measure(batch), batch.shape[1]))


def oracle_breakdown(prompt: str, image: Any) -> dict[str, float]:
    """Every term of one image's score, and the score.

    Args:
        prompt: A grammar prompt.
        image: uint8 (S, S, 3) array or PIL image.

    Returns:
        {"color", "background", "position", "size", "shape", "clean", "score"}, each in [0, 1].
    """
    batch = _as_batch(image)
    terms = _terms([prompt], measure(batch), batch.shape[1])
    out = {k: float(v[0]) for k, v in terms.items()}
    out["score"] = float(_combine(terms)[0])
    return out


def oracle_score(prompt: str, image: Any) -> float:
    """How well ``image`` shows ``prompt``, in [0, 1] (1 = a clean, correct rendering).

    Args:
        prompt: A grammar prompt.
        image: uint8 (S, S, 3) array or PIL image.

    Returns:
        The score.
    """
    return oracle_breakdown(prompt, image)["score"]
