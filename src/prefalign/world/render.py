"""The demo world's renderer: one flat shape on a flat background, plus optional artifacts.

Geometry is continuous and scaled with the image side ``S`` (pixel ``i`` covers ``[i, i + 1)`` and is
inside a shape when its centre is): the five positions are the centres of the four quadrants
(``S/4`` and ``3S/4``) and of the image (``S/2``); a small shape fits an ``S/4`` box, a large one an
``S/2`` box, so a large shape in a corner exactly fills its quadrant and nothing is ever clipped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from prefalign.world.grammar import BACKGROUNDS, COLORS, Attributes

# (x, y) of each position as a fraction of the side.
POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Side of the bounding box as a fraction of the image side.
SIZE_FRACTION: dict[str, float] = {"small": 0.25, "large": 0.5}


def shape_mask(shape: str, size: str, position: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of one shape.

    Args:
        shape: circle (disc), square (filled) or triangle (isosceles, apex up, same bounding box).
        size: small or large.
        position: One of the grammar's positions.
        side: Image side in pixels.

    Returns:
        The mask, True inside the shape.
    """
    if shape not in ("circle", "square", "triangle"):
        raise ValueError(f"unknown shape {shape!r}")
    fx, fy = POSITION_XY[position]
    cx, cy, box = fx * side, fy * side, SIZE_FRACTION[size] * side
    ys, xs = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    dx, dy = xs - cx, ys - cy
    half = box / 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    depth = (dy + half) / box  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)


def box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur of an (H, W, 3) image; edges replicate, so the border keeps the background.

    Args:
        image: uint8 or float image.

    Returns:
        float64 blurred image.
    """
    return ndimage.uniform_filter(image.astype(np.float64), size=(3, 3, 1), mode="nearest")


def render(
    a: Attributes,
    size: int = 16,
    *,
    noise_sigma: float = 0.0,
    blur: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render one scene.

    Args:
        a: The scene.
        size: Image side in pixels (anything from 8 up; 16 and 32 are used).
        noise_sigma: Standard deviation of Gaussian pixel noise on the 0-255 scale (0 = none).
        blur: Apply a 3x3 box blur (before the noise, so the noise stays visible as its own artifact).
        rng: Generator for the noise; required when ``noise_sigma > 0`` so every rendering is reproducible.

    Returns:
        uint8 array (size, size, 3).
    """
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUNDS[a.background]
    image[shape_mask(a.shape, a.size, a.position, size)] = COLORS[a.color]
    if blur:
        image = box_blur(image)
    if noise_sigma > 0:
        if rng is None:
            raise ValueError("render with noise_sigma > 0 needs an rng (reproducibility)")
        image = image + rng.normal(0.0, noise_sigma, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(attrs: list[Attributes], size: int = 16, **kw: object) -> np.ndarray:
    """Render many scenes with the same options.

    Args:
        attrs: The scenes.
        size: Image side in pixels.
        **kw: Keyword options of :func:`render` (noise_sigma, blur, rng).

    Returns:
        uint8 array (N, size, size, 3).
    """
    if not attrs:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([render(a, size, **kw) for a in attrs])  # type: ignore[arg-type]
