"""Seeds: one global seed per stage, and generators keyed by what they generate, not by call order.

Keying every random draw by (seed, purpose, index) makes results independent of batch size, process
count and resume position: sample 1234 gets the same timestep and noise whichever process draws it.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*keys: object) -> int:
    """A stable 63-bit seed from any keys (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(*keys: object) -> torch.Generator:
    """A CPU torch generator seeded from ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def image_seed(seed: int, prompt: str, index: int) -> int:
    """Seed of the ``index``-th evaluation image of ``prompt``: every model sees the same initial noise."""
    return derive_seed(seed, "eval-image", prompt, index)


def numpy_rng(*keys: object) -> np.random.Generator:
    """A numpy generator seeded from ``keys``."""
    return np.random.default_rng(derive_seed(*keys))
