"""Pure helpers that turn imported rows into canonical pairs: ids, splits, ties, de-duplication.

Everything here is deterministic in its inputs (no seeds, no clocks), so re-importing a shard gives
the same ids and splits on any machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
TIE_LABEL = 0.5


def pair_id(prompt: str, image_w: str, image_l: str, *, tie: bool) -> str:
    """sha256 of (prompt, image_w, image_l); the two images are sorted for a tie.

    A tie has no winner, so (a, b) and (b, a) are the same judgement and must get one id; a strict
    preference keeps its order, so the reversed pair is a different (contradicting) row.
    JSON encoding keeps the fields unambiguous whatever characters a prompt holds.
    """
    first, second = sorted((image_w, image_l)) if tie else (image_w, image_l)
    payload = json.dumps([prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _bucket(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % 100


def assign_split(prompt: str, *, train: float, val: float) -> Split:
    """The split of a prompt: sha256(prompt) mod 100 against cumulative percentages.

    ``train=0.8, val=0.1`` puts buckets 0-79 in train, 80-89 in val and 90-99 in test. The split
    depends on the prompt alone, so a prompt never lands in two splits.

    Raises:
        ValueError: fractions outside [0, 1] or summing above 1.
    """
    if not (0.0 <= train <= 1.0 and 0.0 <= val <= 1.0 and train + val <= 1.0 + 1e-9):
        raise ValueError(f"split fractions must lie in [0, 1] and sum to at most 1 (train={train}, val={val})")
    # round(): 0.29 * 100 is 28.999..., which int() would turn into 28 buckets.
    train_cut = round(train * 100)
    val_cut = round((train + val) * 100)
    bucket = _bucket(prompt)
    if bucket < train_cut:
        return "train"
    return "val" if bucket < val_cut else "test"


def split_counts(df: pd.DataFrame) -> dict[str, int]:
    """Rows per split: always the keys train/val/test (0 when absent), plus any unexpected value."""
    counts: dict[str, int] = {split: 0 for split in SPLITS}
    if "split" in df.columns:
        for split, n in df["split"].value_counts(dropna=False).items():
            counts[str(split)] = int(n)
    return counts


def is_tie(labels: pd.Series) -> pd.Series:
    """Boolean mask of tied judgements (label 0.5)."""
    return pd.Series(np.isclose(labels.to_numpy(dtype=float), TIE_LABEL), index=labels.index)


def drop_ties(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Pairs without ties (label 0.5), re-indexed from 0, and the number dropped."""
    ties = is_tie(df["label"])
    n_dropped = int(ties.sum())
    if n_dropped:
        log.info("dropped %d tied pair(s) of %d", n_dropped, len(df))
    return df.loc[~ties].reset_index(drop=True), n_dropped


def dedupe_pairs(existing: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``existing`` followed by the rows of ``new`` whose pair_id is not yet known.

    Existing rows are never changed or re-ordered (append-only), and a pair_id repeated inside
    ``new`` is kept once (its first row), so re-importing a shard adds nothing twice.
    """
    known = set(existing["pair_id"]) if "pair_id" in existing.columns else set()
    fresh = new.drop_duplicates("pair_id", keep="first")
    fresh = fresh.loc[~fresh["pair_id"].isin(known)]
    log.debug("dedupe: %d of %d new pair(s) added", len(fresh), len(new))
    if existing.empty and len(existing.columns) == 0:
        return fresh.reset_index(drop=True)
    if fresh.empty:
        return existing.reset_index(drop=True)
    return pd.concat([existing, fresh], ignore_index=True)


_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_MIRRORED_WORD = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def mirror_prompt(prompt: str) -> str:
    """The prompt of the horizontally flipped image: the words "left" and "right" swapped, case kept.

    A flipped image with this prompt is judged exactly as the original with its own (the demo world's
    oracle is mirror-symmetric to 1e-15); on real data it holds for what prompts say about layout, not for
    mirrored text inside an image, which is why augmentation with it is an option.
    """
    return _LEFT_RIGHT.sub(lambda match: _MIRRORED_WORD[match.group(1)], prompt)
