"""Reward training data: preference tables -> the rows of a split (``RewardData``); the split's prompts,
tokenized once, and its images; the keyed per-step plans the trainer follows.

Images come one of two ways, chosen per split by ``reward.preload_max_bytes``:

* **on the device**: a split whose decoded images (uint8 at the scorer's size) fit in the budget is decoded
  once into a uint8 tensor on the device, and each step gathers its images from it, so a step costs only
  the forward and backward passes (the demo's ~5k 16 px images take 4 MB);
* **on demand**: a larger split (Pick-a-Pic: about a million images, 150 GB at 224 px) is never held
  whole. A DataLoader's workers decode and CLIP-preprocess the images of each step's plan while the device
  trains on the previous step, into pinned memory that is copied without blocking; under
  ``accelerate launch`` each process decodes only the images of its share of the batch.

A step names its images by **key**: row ``j`` of the split's images, or ``j + M`` (M images) for the
mirrored image, flipped when the batch is gathered, never stored. The mirror (``reward.mirror_augment``)
flips both images of an example and swaps "left"/"right" in the prompt (prompt key ``i + P``, the mirrored
prompts tokenized after the originals), which leaves every judgement unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from prefalign.config import RewardConfig
from prefalign.data.prepare import mirror_prompt
from prefalign.models.reward_model import ImagePreprocessing, RewardScorer
from prefalign.seeding import derive_seed

log = logging.getLogger(__name__)
TIE, WIN = 0.5, 1.0


# ------------------------------------------------------------------------------------------------ data
@dataclass
class RewardData:
    """One split's preference examples; examples refer to prompts and images by row.

    Attributes:
        split: split name (for messages).
        prompts: unique prompts; examples refer to them by row.
        images: uint8 ``(M, H, W, 3)``, the unique images decoded once, or None when they are decoded on
            demand (``load_image``; see ``from_tables``' ``preload_max_bytes``).
        image_shas: sha256 of each image row.
        pair_prompt, pair_w, pair_l: ``(P,)`` rows of each pair's prompt, preferred and other image.
        pair_label: ``(P,)`` 1.0 (w preferred) or 0.5 (tie).
        pair_weight: ``(P,)`` 1 / (pairs of the same prompt), normalised to mean 1 (PickScore's weighting).
        pair_ids: canonical ``pair_id`` of each pair, None for pairs expanded from rankings.
        ranking_prompt: ``(R,)`` prompt rows, or None without rankings.
        ranking_images: ``(R, K)`` image rows, best first, padded at the end (pad rows are 0).
        ranking_mask: ``(R, K)`` True for real entries.
        ranking_weight: ``(R,)`` like ``pair_weight``, per ranking.
        load_image: sha256 -> uint8 ``(H, W, 3)``, kept when ``images`` is None (picklable for DataLoader
            workers, e.g. ``StoreImages``).
    """

    split: str
    prompts: list[str]
    images: np.ndarray | None
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
    load_image: Callable[[str], np.ndarray] | None = None

    @property
    def n_images(self) -> int:
        return len(self.image_shas)

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
        resize_to: int | ImagePreprocessing | None = None,
        preload_max_bytes: int | None = None,
    ) -> RewardData:
        """Build a split from canonical tables (``pairs.parquet``, ``rankings.parquet`` rows).

        Args:
            pairs: rows with prompt, image_w, image_l, label (and pair_id, split when present).
            rankings: rows with prompt, images (sha list, best first), or None.
            load_image: sha256 -> uint8 ``(H, W, 3)``, e.g. ``StoreImages(root)``.
            keep_ties: keep label-0.5 pairs (trained with the soft-label BT loss) or drop them.
            split: keep only rows of this split (tables without a ``split`` column are used whole).
            resize_to: the scorer's preprocessing (``RewardScorer.preprocessing``), or a side for CLIP's
                bicubic resize + centre crop to it; applied on load. Needed when image sizes differ.
            preload_max_bytes: decode every image now only if the split's decoded images (M × S × S × 3 bytes
                at side S of ``resize_to``) are under this; otherwise ``images`` stays None and batches are
                decoded on demand. None: always decode now.

        Raises:
            ValueError: the split has no pairs (nor rankings to expand into pairs), a label is not 1.0 or 0.5,
                images differ in size and ``resize_to`` is None, ``preload_max_bytes`` is given without
                ``resize_to``, or an image cannot be decoded or resized (one line naming it).
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
        preprocessing = ImagePreprocessing(resize_to, resize_to) if isinstance(resize_to, int) else resize_to
        if preload_max_bytes is not None and preprocessing is None:
            raise ValueError(f"{name!r} split: preload_max_bytes needs resize_to (the size images are decoded to)")
        data = _assemble(
            pairs, rankings, load_image, name=name, preprocessing=preprocessing, preload_max_bytes=preload_max_bytes
        )
        log.info(
            "%s split: %d pairs (%d ties), %d rankings, %d images (%s), %d prompts",
            name,
            data.n_pairs,
            int((data.pair_label == TIE).sum()),
            data.n_rankings,
            data.n_images,
            "decoded on demand" if data.images is None else "decoded up front",
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


def decoded_bytes(n_images: int, side: int) -> int:
    """Bytes of ``n_images`` decoded uint8 RGB images of ``side`` × ``side``."""
    return n_images * side * side * 3


def _one_line(text: str) -> str:
    return " ".join(text.split())


def decode_image(
    load_image: Callable[[str], np.ndarray], sha: str, preprocessing: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """uint8 ``(H, W, 3)`` of image ``sha``, preprocessed when given.

    Raises:
        ValueError: one line naming the image (and, from ``StoreImages``, its file) when it cannot be read,
            decoded or resized.
    """
    try:
        image = np.asarray(load_image(sha))
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
        return image if preprocessing is None else preprocessing(image)
    except Exception as err:  # noqa: BLE001 -- whatever the decoder raises becomes one line that names the image
        message = f"image {sha}: cannot be decoded or resized: {type(err).__name__}: {err}"
        raise ValueError(_one_line(message)) from None


def _load_images(
    shas: list[str],
    load_image: Callable[[str], np.ndarray],
    name: str,
    preprocessing: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    arrays = [decode_image(load_image, sha, preprocessing) for sha in shas]
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
    preprocessing: ImagePreprocessing | None,
    preload_max_bytes: int | None,
) -> RewardData:
    ranking_lists = [] if rankings is None else [list(images) for images in rankings["images"]]
    ranking_prompts = [] if rankings is None else list(rankings["prompt"])
    all_shas = [*pairs["image_w"], *pairs["image_l"], *(sha for images in ranking_lists for sha in images)]
    image_row = {sha: row for row, sha in enumerate(dict.fromkeys(all_shas))}
    prompt_row = {prompt: row for row, prompt in enumerate(dict.fromkeys([*pairs["prompt"], *ranking_prompts]))}
    pair_prompt = pairs["prompt"].map(prompt_row).to_numpy(np.int64, copy=True)
    preload = preload_max_bytes is None or (
        preprocessing is not None and decoded_bytes(len(image_row), preprocessing.size) < preload_max_bytes
    )
    data = RewardData(
        split=name,
        prompts=list(prompt_row),
        images=_load_images(list(image_row), load_image, name, preprocessing) if preload else None,
        image_shas=list(image_row),
        pair_prompt=pair_prompt,
        pair_w=pairs["image_w"].map(image_row).to_numpy(np.int64, copy=True),
        pair_l=pairs["image_l"].map(image_row).to_numpy(np.int64, copy=True),
        pair_label=pairs["label"].to_numpy(np.float32, copy=True),
        pair_weight=per_prompt_weights(pair_prompt),
        pair_ids=list(pairs["pair_id"]) if "pair_id" in pairs.columns else [None] * len(pairs),
        load_image=None if preload else load_image,
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


# ------------------------------------------------------------------------------------------- image files
class StoreImages:
    """sha256 -> uint8 ``(H, W, 3)`` RGB from an image store folder (``prefalign.data.schema.ImageStore``),
    decoded as ``ImageStore.load_array`` decodes; errors name the image's file.

    The store is scanned once, here, into a sha -> file map: a lookup per image would list a folder of
    thousands of files each time. DataLoader workers get the map with the object (picklable).
    """

    def __init__(self, root: Path) -> None:
        from prefalign.data.schema import ImageStore

        self.root = Path(root)
        self._files = ImageStore(self.root).index()

    def file(self, sha: str) -> Path:
        """The stored file of ``sha``.

        Raises:
            KeyError: no image with this sha is stored (naming the store).
        """
        if sha not in self._files:
            raise KeyError(f"image {sha!r} not in store {self.root / 'images'}")
        return self._files[sha]

    def __call__(self, sha: str) -> np.ndarray:
        from PIL import Image

        path = self.file(sha)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        except Exception as err:  # noqa: BLE001 -- PIL raises many types for a broken file; name the file
            raise ValueError(f"{path}: {type(err).__name__}: {err}") from None

    def check(self, sha: str) -> None:
        """Cheap check that ``sha`` is a readable image: its file exists, its header parses and PIL's
        ``verify`` passes (chunk checksums for PNG); pixels are not decoded.

        Raises:
            ValueError: one line naming the image and its file.
        """
        from PIL import Image

        try:
            path = self.file(sha)
        except KeyError as err:
            raise ValueError(_one_line(f"image {sha}: {err.args[0]}")) from None
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
            if width == 0 or height == 0:
                raise ValueError(f"empty image ({width} x {height})")
        except Exception as err:  # noqa: BLE001 -- any failure of the header check names the file
            message = f"image {sha} ({path}): cannot be decoded: {type(err).__name__}: {err}"
            raise ValueError(_one_line(message)) from None


def check_images(data: RewardData, images: StoreImages, *, threads: int = 8, part: tuple[int, int] = (0, 1)) -> None:
    """Header-check the images of a split decoded on demand, before training starts.

    A split decoded up front has already decoded every image; one decoded on demand would otherwise meet
    an unreadable file only when a batch needs it, hours into a run. A file broken past its header still
    fails then, with the same one-line error naming the image.

    Args:
        data: the split.
        images: where its files are.
        threads: files checked at once (the check waits on storage, not on the CPU).
        part: ``(index, count)``: check every count-th image from index (process ``index`` of ``count``
            checks its share; together they check all).

    Raises:
        ValueError: the first unreadable image in row order, naming the split, the image and its file.
    """
    index, count = part
    shas = data.image_shas[index::count]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(_checked, [images] * len(shas), shas)
        for error in results:
            if error is not None:
                raise ValueError(f"{data.split!r} split: {error}")


def _checked(images: StoreImages, sha: str) -> str | None:
    try:
        images.check(sha)
    except ValueError as err:
        return str(err)
    return None


# -------------------------------------------------------------------------------------------- image sources
class DeviceImages:
    """A split's images decoded once: uint8 ``(M, 3, S, S)`` on the device; key ``j + M`` is image j flipped."""

    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, keys: np.ndarray) -> Tensor:
        """uint8 ``(len(keys), 3, S, S)`` on the device, in the order of ``keys``."""
        n_images, device = len(self.pixels), self.pixels.device
        pixels = self.pixels[torch.from_numpy(keys % n_images).to(device)]
        mirrored = np.flatnonzero(keys >= n_images)
        if len(mirrored):
            rows = torch.from_numpy(mirrored).to(device)
            pixels[rows] = pixels[rows].flip(-1)
        return pixels


class KeyedRequest(Protocol):
    """A request for images by key (a step's plan, a chunk of a split)."""

    @property
    def keys(self) -> np.ndarray: ...


RequestT = TypeVar("RequestT", bound=KeyedRequest)


@dataclass(frozen=True)
class ImageChunk:
    """Consecutive image rows of a split (scoring), by key."""

    keys: np.ndarray


class DecodedImages(Dataset):
    """A split's images decoded on demand: keys -> uint8 ``(n, 3, S, S)`` on the CPU, CLIP-preprocessed.

    As a map-style dataset it is indexed by whole requests (``image_batches``), so a DataLoader worker
    decodes all the images of one request.
    """

    def __init__(
        self, shas: Sequence[str], load_image: Callable[[str], np.ndarray], preprocessing: ImagePreprocessing
    ) -> None:
        self.shas = list(shas)
        self.load_image = load_image
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.shas)

    def gather(self, keys: np.ndarray) -> Tensor:
        """uint8 ``(len(keys), 3, S, S)`` on the CPU, in the order of ``keys`` (each image decoded once)."""
        n_images = len(self.shas)
        decoded = {
            int(row): decode_image(self.load_image, self.shas[row], self.preprocessing)
            for row in np.unique(keys % n_images)
        }
        # HWC: axis 1 is the width, the axis a horizontal flip reverses
        arrays = [decoded[int(key % n_images)][:, ::-1] if key >= n_images else decoded[int(key)] for key in keys]
        size = self.preprocessing.size
        batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, request: Any) -> tuple[Any, Tensor]:
        return request, self.gather(request.keys)


def _unchanged(sample: Any) -> Any:
    """The DataLoader's collate for whole requests: keep the (request, pixels) pair as it is."""
    return sample


def image_batches(
    images: DeviceImages | DecodedImages, requests: Iterable[RequestT], device: torch.device, num_workers: int = 0
) -> Generator[tuple[RequestT, Tensor], None, None]:
    """``(request, uint8 pixels of request.keys on device)`` for each request, in order.

    ``DecodedImages`` are decoded by a DataLoader with ``num_workers`` processes (0: in this one), ahead of
    use, into pinned memory when the device is CUDA, and copied to it without blocking.
    """
    if isinstance(images, DeviceImages):
        for request in requests:
            yield request, images.gather(request.keys)
        return
    on_cuda = device.type == "cuda"
    loader = DataLoader(
        images,
        sampler=requests,  # any iterable of indices: ours are whole requests
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_unchanged,
        pin_memory=on_cuda,
        prefetch_factor=4 if num_workers else None,
        # Spawned, not forked: a fork copies a process that may hold CUDA state and other threads' locks; forked
        # workers exited with code 1 and no trace twice in full test runs, never alone.
        multiprocessing_context="spawn" if num_workers else None,
    )
    for request, pixels in loader:
        yield request, pixels.to(device, non_blocking=on_cuda)


# ------------------------------------------------------------------------------------------- split tensors
@dataclass
class SplitTensors:
    """A split's prompts, tokenized once (on the CPU; batches move to the device), and its images.

    Attributes:
        data: the split.
        input_ids, attention_mask: one row per prompt; with ``mirrored``, row ``i + P`` is ``mirror_prompt``
            of prompt ``i``.
        images: ``DeviceImages`` when ``data.images`` was decoded up front, else ``DecodedImages``.
        num_workers: DataLoader processes that decode ``DecodedImages``.
    """

    data: RewardData
    input_ids: Tensor
    attention_mask: Tensor
    images: DeviceImages | DecodedImages
    num_workers: int = 0

    @classmethod
    def of(
        cls, scorer: RewardScorer, data: RewardData, *, mirrored: bool = False, num_workers: int = 0
    ) -> SplitTensors:
        prompts = [*data.prompts, *map(mirror_prompt, data.prompts)] if mirrored else data.prompts
        input_ids, attention_mask = scorer.tokenize(prompts, device="cpu")
        if scorer.device.type == "cuda":
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
        images: DeviceImages | DecodedImages
        if data.images is not None:
            images = DeviceImages(scorer.uint8_pixels(data.images))
        elif data.load_image is not None:
            images = DecodedImages(data.image_shas, data.load_image, scorer.preprocessing)
        else:
            raise ValueError(f"{data.split!r} split has neither decoded images nor a load_image to decode them")
        return cls(data, input_ids, attention_mask, images, num_workers)

    def prompt_rows(self, rows: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` of prompt ``rows`` (a CPU tensor) on ``device``."""
        non_blocking = device.type == "cuda"
        return (
            self.input_ids[rows].to(device, non_blocking=non_blocking),
            self.attention_mask[rows].to(device, non_blocking=non_blocking),
        )


def model_inputs(
    scorer: RewardScorer, prompts: list[str], images: np.ndarray, *, mirrored: bool
) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """``(prompts, input_ids, attention_mask, uint8 pixels)`` on the model's device, for the tiny backbone's
    CLIP pretraining on the demo world's renderings (small enough to hold twice).

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


@dataclass(frozen=True)
class ImageBatch:
    """The images of one step or chunk: sorted unique ``keys`` and their uint8 ``pixels`` on the device."""

    keys: np.ndarray
    pixels: Tensor


def embed_text_keys(scorer: RewardScorer, tensors: SplitTensors, keys: np.ndarray) -> Tensor:
    """Embeddings ``(*keys.shape, D)`` of prompt keys (repeats allowed), each distinct prompt encoded once."""
    unique, inverse = np.unique(keys, return_inverse=True)
    device = scorer.device
    embeddings = scorer.text_embeddings(*tensors.prompt_rows(torch.from_numpy(unique), device))
    return embeddings[torch.from_numpy(inverse.reshape(keys.shape)).to(device)]


def embed_image_keys(scorer: RewardScorer, batch: ImageBatch, keys: np.ndarray) -> Tensor:
    """Embeddings ``(*keys.shape, D)`` of image keys held by ``batch``, each distinct image encoded once."""
    unique, inverse = np.unique(keys, return_inverse=True)
    device = batch.pixels.device
    pixels = batch.pixels[torch.from_numpy(np.searchsorted(batch.keys, unique)).to(device)]
    embeddings = scorer.image_embeddings(scorer.normalise(pixels))
    return embeddings[torch.from_numpy(inverse.reshape(keys.shape)).to(device)]


# ------------------------------------------------------------------------------------------- step plans
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
    cfg: RewardConfig, train: RewardData, use_pairs: bool, use_rankings: bool, seed: int, num_processes: int = 1
) -> tuple[Iterator[np.ndarray] | None, Iterator[np.ndarray] | None]:
    """Global batch streams of trainable pair rows (ties only when keep_ties) and of ranking rows.

    A global batch is what every process trains on together: ``num_processes`` shares of ``batch_size`` pairs.
    """
    pairs = rankings = None
    if use_pairs:
        rows = np.arange(train.n_pairs) if cfg.keep_ties else np.flatnonzero(train.pair_label == WIN)
        if len(rows) < num_processes:
            raise ValueError(
                f"the {train.split!r} split has {len(rows)} pairs to train on with keep_ties={cfg.keep_ties}; "
                f"{num_processes} processes need at least one each"
            )
        global_batch = cfg.batch_size * num_processes
        pairs = (rows[batch] for batch in keyed_batches(len(rows), global_batch, seed=seed, purpose="reward-pairs"))
    if use_rankings:
        assert train.ranking_images is not None
        if train.n_rankings < num_processes:
            raise ValueError(
                f"the {train.split!r} split has {train.n_rankings} rankings for {num_processes} processes"
            )
        # About as many images per step as a batch of pairs: 2·batch_size images over K per ranking.
        per_batch = max(1, round(2 * cfg.batch_size / train.ranking_images.shape[1]))
        rankings = keyed_batches(train.n_rankings, per_batch * num_processes, seed=seed, purpose="reward-rankings")
    return pairs, rankings


@dataclass(frozen=True)
class StepPlan:
    """What one process trains on at one step.

    Attributes:
        step: the optimizer step (0-based).
        pair_rows: this process's share of the step's pair rows, or None without a pair loss.
        pair_prompt_keys, pair_image_keys: ``(B,)`` prompt keys and ``(B, 2)`` (preferred, other) image keys.
        ranking_rows, ranking_prompt_keys, ranking_image_keys: the same for rankings ``(R,)``, ``(R, K)``.
        keys: sorted unique image keys of the step (what its image batch holds).
    """

    step: int
    pair_rows: np.ndarray | None
    pair_prompt_keys: np.ndarray | None
    pair_image_keys: np.ndarray | None
    ranking_rows: np.ndarray | None
    ranking_prompt_keys: np.ndarray | None
    ranking_image_keys: np.ndarray | None
    keys: np.ndarray


def _share(rows: np.ndarray, process_index: int, num_processes: int) -> np.ndarray:
    """Process p's contiguous share of a global batch (``np.array_split``: sizes differ by at most one)."""
    return np.array_split(rows, num_processes)[process_index]


def _mirror_keys(
    data: RewardData, prompt_rows: np.ndarray, image_rows: np.ndarray, flip: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and image keys of examples, moved to the mirrored copies where ``flip`` is True."""
    if flip is None:
        return prompt_rows, image_rows
    flip_images = flip.reshape(flip.shape + (1,) * (image_rows.ndim - 1))
    return prompt_rows + flip * len(data.prompts), image_rows + flip_images * data.n_images


def step_plans(
    cfg: RewardConfig,
    train: RewardData,
    seed: int,
    *,
    use_pairs: bool,
    use_rankings: bool,
    start: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> Iterator[StepPlan]:
    """This process's plan of every step from ``start`` to ``cfg.steps``.

    Batches are keyed by (seed, epoch) and mirror coins by (seed, step) over the global batch, so a resumed
    run replays the same steps, and the union of the processes' shares is the batch one process would take.
    """
    pair_stream, ranking_stream = row_streams(cfg, train, use_pairs, use_rankings, seed, num_processes)
    for step in range(cfg.steps):
        pair_rows = next(pair_stream) if pair_stream else None
        ranking_rows = next(ranking_stream) if ranking_stream else None
        if step < start:  # replaying the keyed streams restores the data position of a resumed run
            continue
        mirror = (seed, step) if cfg.mirror_augment else None
        pair_prompt_keys = pair_image_keys = ranking_prompt_keys = ranking_image_keys = None
        keys = []
        if pair_rows is not None:
            flips = mirror_flips(mirror, pair_rows, "pairs")
            pair_rows = _share(pair_rows, process_index, num_processes)
            flips = None if flips is None else _share(flips, process_index, num_processes)
            image_rows = np.stack([train.pair_w[pair_rows], train.pair_l[pair_rows]], axis=1)
            pair_prompt_keys, pair_image_keys = _mirror_keys(train, train.pair_prompt[pair_rows], image_rows, flips)
            keys.append(pair_image_keys.reshape(-1))
        if ranking_rows is not None:
            # checked by the caller (``_loss_parts``): a ranking loss runs only on a split with rankings
            assert train.ranking_prompt is not None and train.ranking_images is not None
            flips = mirror_flips(mirror, ranking_rows, "rankings")
            ranking_rows = _share(ranking_rows, process_index, num_processes)
            flips = None if flips is None else _share(flips, process_index, num_processes)
            ranking_prompt_keys, ranking_image_keys = _mirror_keys(
                train, train.ranking_prompt[ranking_rows], train.ranking_images[ranking_rows], flips
            )
            keys.append(ranking_image_keys.reshape(-1))
        yield StepPlan(
            step,
            pair_rows,
            pair_prompt_keys,
            pair_image_keys,
            ranking_rows,
            ranking_prompt_keys,
            ranking_image_keys,
            np.unique(np.concatenate(keys)),
        )
