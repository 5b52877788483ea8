"""Strict per-attribute prompt following on the demo world (GenEval-style): right or wrong, no partial credit.

The oracle's score is graded: a colour halfway between red and orange still earns part of the colour
term. For a readable "how often does the model draw the named colour" number, this module reads each
attribute as right only when the measured value is *nearest* to the named one among the grammar's
alternatives, using the oracle's own measurements (:func:`prefalign.world.oracle.measure`) and its own
distances, so the two never disagree on what was measured:

- found: an object stands out from the background (``Measurements.found``);
- color: the named colour is the nearest of the palette under the oracle's blend-tolerant colour distance
  (the object colour may be mixed with up to 25% background, for every candidate alike);
- background: the named background is the nearest (Euclidean RGB) to the measured one;
- position: the centroid is nearest to the named position's clean centroid, among the five positions'
  centroids of the *named* shape and size (a triangle's centroid sits below its box centre);
- size: the oracle's size class of the mask area is the named size;
- shape: the named shape has the best template match;
- all: every one of the above.

Every object attribute is wrong when no object is found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prefalign.world.grammar import BACKGROUNDS, COLORS
from prefalign.world.oracle import Measurements, _color_distance, _prompt_index, _size_class, _templates, measure

ATTRIBUTES: tuple[str, ...] = ("found", "color", "background", "position", "size", "shape", "all")


def check_images(images: Any, image_size: int | None = None) -> np.ndarray:
    """Validate a batch of RGB images and return it as float64 on the 0-255 scale.

    Args:
        images: uint8 (or 0-255 numeric) array of shape (N, S, S, 3).
        image_size: Expected side S; ``None`` accepts any square side.

    Returns:
        float64 (N, S, S, 3) copy of the batch.

    Raises:
        ValueError: If the array is not (N, S, S, 3) with S == ``image_size`` (when given), is not
            numeric, or has values outside 0-255; the message names the shape received and the one expected.
    """
    arr = np.asarray(images)
    side = "S" if image_size is None else str(image_size)
    expected = f"(N, {side}, {side}, 3)"
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected square RGB images {expected}, got shape {arr.shape}")
    if image_size is not None and arr.shape[1] != image_size:
        raise ValueError(f"expected square RGB images {expected}, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"expected uint8-like images {expected}, got dtype {arr.dtype} with shape {arr.shape}")
    out = arr.astype(np.float64)
    # A [0, 1] float batch passes this check, but a [-1, 1] one (a diffusion output before rescaling)
    # or a wrapped-around integer batch does not.
    if out.size and (out.min() < 0 or out.max() > 255):
        raise ValueError(f"expected pixel values in 0-255, got [{out.min():g}, {out.max():g}] in shape {arr.shape}")
    return out


def correctness_from_measurements(prompts: Sequence[str], m: Measurements, side: int) -> dict[str, np.ndarray]:
    """Per-attribute correctness given the oracle's measurements of the images.

    Args:
        prompts: One grammar prompt per image.
        m: :func:`prefalign.world.oracle.measure` of the images.
        side: Image side in pixels.

    Returns:
        {attribute: bool (N,)} for every name in :data:`ATTRIBUTES`.

    Raises:
        ValueError: If a prompt is outside the grammar or the counts differ.
    """
    n = len(m.found)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} images")
    idx = np.array([_prompt_index(p) for p in prompts], np.int64).reshape(-1, 5)
    shape, size, pos, col, bgi = idx.T
    found = np.asarray(m.found, bool)

    palette = np.array(list(COLORS.values()), np.float64)
    color_dist = np.stack([_color_distance(m.color, c, m.background) for c in palette], axis=1)  # (N, colours)
    backgrounds = np.array(list(BACKGROUNDS.values()), np.float64)
    bg_dist = np.linalg.norm(m.background[:, None, :] - backgrounds[None], axis=-1)  # (N, backgrounds)
    candidates = _templates(side)["centroid"][shape, size]  # (N, positions, 2) for the named shape and size
    pos_dist = np.linalg.norm(m.centroid[:, None, :] - candidates, axis=-1)  # (N, positions)

    out = {
        "found": found,
        "color": found & (np.argmin(color_dist, axis=1) == col),
        "background": np.argmin(bg_dist, axis=1) == bgi,
        "position": found & (np.argmin(pos_dist, axis=1) == pos),
        "size": found & (_size_class(m.area, side) == size),
        "shape": found & (np.argmax(m.shape_match, axis=1) == shape),
    }
    out["all"] = np.logical_and.reduce([out[k] for k in ATTRIBUTES if k != "all"]) if n else np.zeros(0, bool)
    return {k: out[k] for k in ATTRIBUTES}


def attribute_correctness(
    prompts: Sequence[str], images: Any, *, image_size: int | None = None
) -> dict[str, np.ndarray]:
    """Strict per-attribute prompt following: is each attribute the nearest to the named one.

    Args:
        prompts: One grammar prompt per image.
        images: uint8 (or 0-255 numeric) array of shape (N, S, S, 3).
        image_size: Expected side S; ``None`` accepts any square side.

    Returns:
        {attribute: bool (N,)} for every name in :data:`ATTRIBUTES` (``all``: every attribute right).

    Raises:
        ValueError: If the images are not (N, S, S, 3) RGB (the message names the shape received and the
            one expected), the prompt and image counts differ, or a prompt is outside the grammar.
    """
    batch = check_images(images, image_size)
    if len(prompts) != len(batch):
        raise ValueError(f"{len(prompts)} prompts but {len(batch)} images (shape {batch.shape})")
    if not len(batch):
        return {k: np.zeros(0, bool) for k in ATTRIBUTES}
    return correctness_from_measurements(list(prompts), measure(batch), batch.shape[1])
