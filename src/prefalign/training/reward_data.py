"""Reward training data: preference tables -> arrays of a split (``RewardData``), and the device tensors,
mirrored copies and keyed batch streams the trainer and the scorer index into.

Every image of a split is decoded once, up front, into a uint8 tensor; batches index into it, so a step
costs only the forward and backward passes. The mirror (``reward.mirror_augment``) flips both images of an
example and swaps "left"/"right" in the prompt, which leaves every judgement unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from prefalign.config import RewardConfig
from prefalign.data.prepare import mirror_prompt
from prefalign.models.reward_model import RewardScorer, resize_image
from prefalign.seeding import derive_seed

log = logging.getLogger(__name__)
TIE, WIN = 0.5, 1.0


# ------------------------------------------------------------------------------------------------ data
@dataclass
class RewardData:
    """One split's preference examples, with every image decoded once and referenced by row.

    Attributes:
        split: split name (for messages).
        prompts: unique prompts; examples refer to them by row.
        images: uint8 ``(M, H, W, 3)``, the unique images; examples refer to them by row.
        image_shas: sha256 of each image row.
        pair_prompt, pair_w, pair_l: ``(P,)`` rows of each pair's prompt, preferred and other image.
        pair_label: ``(P,)`` 1.0 (w preferred) or 0.5 (tie).
        pair_weight: ``(P,)`` 1 / (pairs of the same prompt), normalised to mean 1 (PickScore's weighting).
        pair_ids: canonical ``pair_id`` of each pair, None for pairs expanded from rankings.
        ranking_prompt: ``(R,)`` prompt rows, or None without rankings.
        ranking_images: ``(R, K)`` image rows, best first, padded at the end (pad rows are 0).
        ranking_mask: ``(R, K)`` True for real entries.
        ranking_weight: ``(R,)`` like ``pair_weight``, per ranking.
    """

    split: str
    prompts: list[str]
    images: np.ndarray
    image_shas: list[str]
    pair_prompt: np.ndarray
    pair_w: np.ndarray
    pair_l: np.ndarray
    pair_label: np.ndarray
    pair_weight: np.ndarray
    pair_ids: list[str | None] = field(default_factory=list)
    ranking_prompt: np.ndarray | None = None
    ranking_images: np.ndarray | None = None
    ranking_mask: np.ndarray | None = None
    ranking_weight: np.ndarray | None = None

    @property
    def n_pairs(self) -> int:
        return len(self.pair_w)

    @property
    def n_rankings(self) -> int:
        return 0 if self.ranking_prompt is None else len(self.ranking_prompt)

    @classmethod
    def from_tables(
        cls,
        pairs: pd.DataFrame,
        rankings: pd.DataFrame | None,
        load_image: Callable[[str], np.ndarray],
        *,
        keep_ties: bool,
        split: str | None = None,
        resize_to: int | None = None,
    ) -> RewardData:
        """Build a split from canonical tables (``pairs.parquet``, ``rankings.parquet`` rows).

        Args:
            pairs: rows with prompt, image_w, image_l, label (and pair_id, split when present).
            rankings: rows with prompt, images (sha list, best first), or None.
            load_image: sha256 -> uint8 ``(H, W, 3)``, e.g. ``ImageStore(root).load_array``.
            keep_ties: keep label-0.5 pairs (trained with the soft-label BT loss) or drop them.
            split: keep only rows of this split (tables without a ``split`` column are used whole).
            resize_to: resize every image to this side on load; needed when image sizes differ.

        Raises:
            ValueError: the split has no pairs (nor rankings to expand into pairs), a label is not 1.0 or 0.5,
                or images differ in size and ``resize_to`` is None.
        """
        name = split or "given"
        pairs = _rows_of_split(pairs, split)
        rankings = _usable_rankings(_rows_of_split(rankings, split)) if rankings is not None else None
        _check_labels(pairs, name)
        n_ties = int((pairs["label"] == TIE).sum())
        if not keep_ties:
            pairs = pairs[pairs["label"] == WIN]
        if pairs.empty and rankings is not None and not rankings.empty:
            log.info("%s split: no pairs, so the %d rankings are expanded into pairs", name, len(rankings))
            pairs = _pairs_from_rankings(rankings)
        if pairs.empty:
            dropped = f" ({n_ties} ties dropped by keep_ties=False)" if n_ties and not keep_ties else ""
            raise ValueError(f"the {name!r} split has no pairs{dropped}: nothing to train or evaluate on")
        data = _assemble(pairs, rankings, load_image, name=name, resize_to=resize_to)
        log.info(
            "%s split: %d pairs (%d ties), %d rankings, %d images, %d prompts",
            name,
            data.n_pairs,
            int((data.pair_label == TIE).sum()),
            data.n_rankings,
            len(data.image_shas),
            len(data.prompts),
        )
        return data


def _rows_of_split(table: pd.DataFrame, split: str | None) -> pd.DataFrame:
    if split is None or "split" not in table.columns:
        return table.reset_index(drop=True)
    return table[table["split"] == split].reset_index(drop=True)


def _check_labels(pairs: pd.DataFrame, name: str) -> None:
    bad = sorted(set(pairs["label"].astype(float)) - {WIN, TIE})
    if bad:
        raise ValueError(f"{name!r} split: pair labels must be 1.0 (image_w preferred) or 0.5 (tie), got {bad}")


def _usable_rankings(rankings: pd.DataFrame) -> pd.DataFrame:
    """Rankings of at least two images (a single image ranks nothing)."""
    return rankings[rankings["images"].map(len) >= 2].reset_index(drop=True)


def _pairs_from_rankings(rankings: pd.DataFrame) -> pd.DataFrame:
    """Every implied pair (i before j) of each ranking, as ImageReward expands its rankings."""
    rows = [
        {"prompt": prompt, "image_w": images[i], "image_l": images[j], "label": WIN}
        for prompt, images in zip(rankings["prompt"], rankings["images"], strict=True)
        for i in range(len(images))
        for j in range(i + 1, len(images))
    ]
    return pd.DataFrame(rows, columns=["prompt", "image_w", "image_l", "label"])


def per_prompt_weights(example_prompts: np.ndarray) -> np.ndarray:
    """1 / (examples of the same prompt), normalised to mean 1: every prompt counts equally (PickScore)."""
    _, inverse, counts = np.unique(example_prompts, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return (weights / weights.mean()).astype(np.float32)


def _load_images(
    shas: list[str], load_image: Callable[[str], np.ndarray], name: str, resize_to: int | None
) -> np.ndarray:
    arrays = [load_image(sha) for sha in shas]
    if resize_to is not None:
        arrays = [resize_image(array, resize_to) for array in arrays]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{name!r} split: images differ in size {sorted(shapes)[:4]}; pass resize_to")
    return np.stack(arrays).astype(np.uint8, copy=False)


def _assemble(
    pairs: pd.DataFrame,
    rankings: pd.DataFrame | None,
    load_image: Callable[[str], np.ndarray],
    *,
    name: str,
    resize_to: int | None,
) -> RewardData:
    ranking_lists = [] if rankings is None else [list(images) for images in rankings["images"]]
    ranking_prompts = [] if rankings is None else list(rankings["prompt"])
    all_shas = [*pairs["image_w"], *pairs["image_l"], *(sha for images in ranking_lists for sha in images)]
    image_row = {sha: row for row, sha in enumerate(dict.fromkeys(all_shas))}
    prompt_row = {prompt: row for row, prompt in enumerate(dict.fromkeys([*pairs["prompt"], *ranking_prompts]))}
    pair_prompt = pairs["prompt"].map(prompt_row).to_numpy(np.int64, copy=True)
    data = RewardData(
        split=name,
        prompts=list(prompt_row),
        images=_load_images(list(image_row), load_image, name, resize_to),
        image_shas=list(image_row),
        pair_prompt=pair_prompt,
        pair_w=pairs["image_w"].map(image_row).to_numpy(np.int64, copy=True),
        pair_l=pairs["image_l"].map(image_row).to_numpy(np.int64, copy=True),
        pair_label=pairs["label"].to_numpy(np.float32, copy=True),
        pair_weight=per_prompt_weights(pair_prompt),
        pair_ids=list(pairs["pair_id"]) if "pair_id" in pairs.columns else [None] * len(pairs),
    )
    if ranking_lists:
        width = max(len(images) for images in ranking_lists)
        data.ranking_images = np.zeros((len(ranking_lists), width), dtype=np.int64)
        data.ranking_mask = np.zeros((len(ranking_lists), width), dtype=bool)
        for row, images in enumerate(ranking_lists):
            data.ranking_images[row, : len(images)] = [image_row[sha] for sha in images]
            data.ranking_mask[row, : len(images)] = True
        data.ranking_prompt = np.array([prompt_row[p] for p in ranking_prompts], dtype=np.int64)
        data.ranking_weight = per_prompt_weights(data.ranking_prompt)
    return data


# -------------------------------------------------------------------------------------- device tensors
@dataclass
class SplitTensors:
    """A split's prompts (tokenized once) and images (uint8, model size) on the model's device."""

    data: RewardData
    input_ids: Tensor
    attention_mask: Tensor
    pixels: Tensor

    @classmethod
    def of(cls, scorer: RewardScorer, data: RewardData, *, mirrored: bool = False) -> SplitTensors:
        """With ``mirrored``, the rows after the originals are their mirrored copies (``model_inputs``)."""
        _, input_ids, attention_mask, pixels = model_inputs(scorer, data.prompts, data.images, mirrored=mirrored)
        return cls(data, input_ids, attention_mask, pixels)


def model_inputs(
    scorer: RewardScorer, prompts: list[str], images: np.ndarray, *, mirrored: bool
) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """``(prompts, input_ids, attention_mask, uint8 pixels)`` on the model's device.

    With ``mirrored``, prompt row ``i + P`` is ``mirror_prompt`` of prompt ``i`` and image row ``j + M``
    the horizontal flip of image ``j`` (P prompts, M images); the returned prompts include the copies.
    """
    if mirrored:
        prompts = [*prompts, *map(mirror_prompt, prompts)]
    input_ids, attention_mask = scorer.tokenize(prompts)
    pixels = scorer.uint8_pixels(images)
    if mirrored:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return prompts, input_ids, attention_mask, pixels


def mirror_rows(
    tensors: SplitTensors, prompt_rows: np.ndarray, image_rows: np.ndarray, flip: np.ndarray | None
) -> tuple[Tensor, Tensor]:
    """Prompt rows ``(N,)`` and image rows ``(N, ...)`` on the device, each example's moved to the mirrored
    copies (see ``SplitTensors.of``) where its ``flip`` is True."""
    device = tensors.pixels.device
    if flip is not None:
        prompt_rows = prompt_rows + flip * len(tensors.data.prompts)
        image_rows = image_rows + flip.reshape(flip.shape + (1,) * (image_rows.ndim - 1)) * len(tensors.data.images)
    return torch.from_numpy(prompt_rows).to(device), torch.from_numpy(image_rows).to(device)


def embed_text_rows(scorer: RewardScorer, tensors: SplitTensors, rows: Tensor) -> Tensor:
    """Embeddings for prompt ``rows`` (repeats allowed), each distinct prompt encoded once."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    return scorer.text_embeddings(tensors.input_ids[unique], tensors.attention_mask[unique])[inverse]


def embed_image_rows(scorer: RewardScorer, tensors: SplitTensors, rows: Tensor) -> Tensor:
    """Embeddings for image ``rows`` of any shape ``(...)`` -> ``(..., D)``, each distinct image encoded once."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    return scorer.image_embeddings(scorer.normalise(tensors.pixels[unique]))[inverse]


def keyed_batches(n_items: int, batch_size: int, *, seed: int, purpose: str) -> Iterator[np.ndarray]:
    """Endless batches of item rows: each epoch is a fresh permutation keyed by (seed, purpose, epoch)."""
    epoch = 0
    while True:
        order = np.random.default_rng(derive_seed(seed, purpose, epoch)).permutation(n_items)
        for start in range(0, n_items - min(batch_size, n_items) + 1, min(batch_size, n_items)):
            yield order[start : start + batch_size]
        epoch += 1


def mirror_flips(mirror: tuple[int, int] | None, rows: np.ndarray, kind: str) -> np.ndarray | None:
    """Which examples of a step train mirrored: a fair coin each, keyed by (seed, kind, step) for exact resume."""
    if mirror is None:
        return None
    seed, step = mirror
    return np.random.default_rng(derive_seed(seed, f"reward-mirror-{kind}", step)).random(len(rows)) < 0.5


def row_streams(
    cfg: RewardConfig, train: RewardData, use_pairs: bool, use_rankings: bool, seed: int
) -> tuple[Iterator[np.ndarray] | None, Iterator[np.ndarray] | None]:
    """Batch streams of trainable pair rows (ties only when keep_ties) and of ranking rows."""
    pairs = rankings = None
    if use_pairs:
        rows = np.arange(train.n_pairs) if cfg.keep_ties else np.flatnonzero(train.pair_label == WIN)
        if len(rows) == 0:
            raise ValueError(f"the {train.split!r} split has no pairs to train on with keep_ties={cfg.keep_ties}")
        pairs = (rows[batch] for batch in keyed_batches(len(rows), cfg.batch_size, seed=seed, purpose="reward-pairs"))
    if use_rankings:
        assert train.ranking_images is not None
        # About as many images per step as a batch of pairs: 2·batch_size images over K per ranking.
        per_batch = max(1, round(2 * cfg.batch_size / train.ranking_images.shape[1]))
        rankings = keyed_batches(train.n_rankings, per_batch, seed=seed, purpose="reward-rankings")
    return pairs, rankings
