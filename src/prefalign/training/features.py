"""Feature cache: VAE latents and text embeddings computed once, read by every training step.

Training never runs the VAE encoder or the text encoder per step: at SD1.5 scale one VAE encode costs
more than a UNet forward (1.08 vs 0.68 TFLOP at 512 px), so caching is most of a DPO step's saving.
Latents are the scaled posterior means.

The cache folder:

- ``latents-00000.safetensors``, ``latents-00001.safetensors``, ...: one tensor ``latents`` each, holding
  ``featurize.shard_size`` consecutive rows (the last shard fewer);
- ``text.safetensors``: one tensor ``text``, a row per prompt and a last row for the empty prompt;
- ``index.json``: image sha -> global row, the prompts in row order, the shard files with their row
  ranges, the dtype and the shapes.

Memory stays bounded at Pick-a-Pic size (512-1024 px images, millions of them): images stream through a
DataLoader one batch at a time and batches are appended to the shard files as they are encoded; training
reads the rows it needs from memory-mapped shards (:class:`MemmapRows`). Under ``accelerate launch``
process p of P encodes shards p, p + P, ...
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from prefalign.config import Featurize

if TYPE_CHECKING:
    from prefalign.data.schema import ImageStore

LATENTS_TENSOR, TEXT_FILE, TEXT_TENSOR, INDEX_FILE = "latents", "text.safetensors", "text", "index.json"
# Prompts per text-encoder forward; fixed so the demo's embeddings keep their batching (and their bits).
PROMPT_BATCH = 512
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
# numpy has no bfloat16: BF16 rows are read as uint16 and reinterpreted by torch.
_NUMPY_DTYPES: dict[str, Any] = {"F32": np.float32, "BF16": np.uint16}


def latents_shard_file(shard: int) -> str:
    return f"latents-{shard:05d}.safetensors"


# ------------------------------------------------------------------------------------------ reading
def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data region, header JSON) of a safetensors file.

    The format is an 8-byte little-endian header length, the JSON header (``{name: {dtype, shape,
    data_offsets}}``, offsets relative to the data region), then the raw little-endian data.
    """
    with Path(path).open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {err})") from err
    return 8 + length, header


def _memmap_tensor(path: Path, tensor: str) -> tuple[str, np.memmap]:
    """(safetensors dtype, read-only memory map) of ``tensor`` in ``path``, checked against the file's size."""
    data_start, header = read_safetensors_header(path)
    if tensor not in header:
        raise ValueError(f"{path}: no tensor {tensor!r} (holds {sorted(k for k in header if k != '__metadata__')})")
    dtype, shape, (begin, end) = (
        header[tensor]["dtype"],
        tuple(header[tensor]["shape"]),
        header[tensor]["data_offsets"],
    )
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: tensor {tensor!r} is {dtype}; the feature cache holds F32 or BF16")
    if not shape or shape[0] == 0 or end - begin != int(np.prod(shape)) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize:
        raise ValueError(
            f"{path}: tensor {tensor!r} of {dtype} {list(shape)} has {end - begin} bytes; a table file holds at "
            "least one row and exactly its shape's bytes"
        )
    if path.stat().st_size < data_start + end:
        raise ValueError(f"{path}: truncated ({path.stat().st_size} bytes, its header needs {data_start + end})")
    return dtype, np.memmap(path, dtype=_NUMPY_DTYPES[dtype], mode="r", offset=data_start + begin, shape=shape)


class MemmapRows:
    """One tensor stored across safetensors files, row after row, read through memory maps.

    Indexing reads only the requested rows from the page cache and returns them as a float32 tensor,
    so resident memory does not grow with the number of rows stored. Supports what the trainers use
    of a tensor: ``.shape``, ``len`` and ``[rows]`` with a LongTensor, an integer array, a slice or an int.
    """

    def __init__(self, files: Sequence[Path], tensor: str) -> None:
        if not files:
            raise ValueError(f"MemmapRows: no files hold tensor {tensor!r}")
        self.files = [Path(f) for f in files]
        dtypes, self._maps = zip(*(_memmap_tensor(path, tensor) for path in self.files), strict=True)
        for path, dtype, rows in zip(self.files, dtypes, self._maps, strict=True):
            if (dtype, rows.shape[1:]) != (dtypes[0], self._maps[0].shape[1:]):
                raise ValueError(
                    f"{path}: tensor {tensor!r} rows are {dtype} {list(rows.shape[1:])}, those of {self.files[0]} "
                    f"are {dtypes[0]} {list(self._maps[0].shape[1:])}; every file of one table must match"
                )
        self.stored_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[dtypes[0]]
        self.file_rows = [int(rows.shape[0]) for rows in self._maps]
        self._starts = np.cumsum([0, *self.file_rows])
        self.shape = torch.Size([int(self._starts[-1]), *self._maps[0].shape[1:]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: torch.Tensor | np.ndarray | Sequence[int] | slice | int) -> torch.Tensor:
        single = isinstance(rows, int | np.integer)
        index = self._row_numbers(rows)
        out = np.empty((len(index), *self.shape[1:]), dtype=self._maps[0].dtype)
        file_of_row = np.searchsorted(self._starts, index, side="right") - 1
        for k in np.unique(file_of_row):
            picked = file_of_row == k
            out[picked] = self._maps[k][index[picked] - self._starts[k]]
        values = torch.from_numpy(out)
        if self.stored_dtype == torch.bfloat16:
            values = values.view(torch.bfloat16)
        values = values.float()
        return values[0] if single else values

    def _row_numbers(self, rows: torch.Tensor | np.ndarray | Sequence[int] | slice | int) -> np.ndarray:
        n = len(self)
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        index = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        index = index.reshape(-1)
        if index.size and index.dtype.kind not in "iu":
            raise TypeError(f"rows must be integers, got {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row {index[(index < -n) | (index >= n)][0]} out of range for {n} rows")
        return np.where(index < 0, index + n, index)


@dataclass
class Features:
    """Cached VAE latents (scaled) and text embeddings, looked up by image sha and prompt.

    ``latents`` and ``text`` are tensors or :class:`MemmapRows` (what ``load_features`` gives): either way
    ``[rows]`` gives a tensor of those rows (float32 from a cache) and ``.shape`` the whole table's shape.
    """

    latents: torch.Tensor | MemmapRows
    image_rows: dict[str, int]
    text: torch.Tensor | MemmapRows
    prompt_rows: dict[str, int]
    empty_prompt_row: int

    def latent_rows(self, shas) -> torch.Tensor:
        return torch.tensor([self.image_rows[s] for s in shas], dtype=torch.long)

    def text_rows(self, prompts) -> torch.Tensor:
        return torch.tensor([self.prompt_rows[p] for p in prompts], dtype=torch.long)


def load_features(folder: Path) -> Features:
    """The cache written by ``compute_features``, memory-mapped (safetensors only; no pickle)."""
    folder = Path(folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    shard_files = [folder / shard["file"] for shard in index["shards"]]
    latents = MemmapRows(shard_files, LATENTS_TENSOR)
    for shard, rows in zip(index["shards"], latents.file_rows, strict=True):
        if shard["rows"][1] - shard["rows"][0] != rows:
            raise ValueError(f"{folder / shard['file']}: holds {rows} rows, {INDEX_FILE} says rows {shard['rows']}")
    prompts = index["prompts"]
    return Features(
        latents=latents,
        image_rows=index["image_rows"],
        text=MemmapRows([folder / TEXT_FILE], TEXT_TENSOR),
        prompt_rows={p: i for i, p in enumerate(prompts)},
        empty_prompt_row=len(prompts),
    )


# ------------------------------------------------------------------------------------------ writing
class SafetensorsRowWriter:
    """Writes one tensor of a known shape into a safetensors file, a batch of rows at a time.

    The header goes first, from the final shape, so memory holds one batch, never the tensor. The file
    appears under its name only once every row is written: an interrupted run leaves no file that could
    pass for a finished one.
    """

    def __init__(self, path: Path, tensor: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), dtype
        self.rows_written = 0
        nbytes = int(np.prod(self.shape)) * torch.empty((), dtype=dtype).element_size()
        entry = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(self.shape), "data_offsets": [0, nbytes]}
        header = json.dumps({tensor: entry}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data region starts 8-byte aligned, as safetensors writes it
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._handle = self._partial.open("wb")
        self._handle.write(struct.pack("<Q", len(header)) + header)

    @property
    def rows_left(self) -> int:
        return self.shape[0] - self.rows_written

    def append(self, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.shape[1:] or rows.dtype != self.dtype or len(rows) > self.rows_left:
            raise ValueError(
                f"{self.path}: cannot append {rows.dtype} {list(rows.shape)} to {self.dtype} {list(self.shape)} "
                f"holding {self.rows_written} rows"
            )
        flat = rows.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(flat.numpy().data)
        self.rows_written += len(rows)

    def close(self) -> None:
        self._handle.close()
        if self.rows_left:
            self._partial.unlink()
            raise ValueError(f"{self.path}: {self.rows_written} of {self.shape[0]} rows written")
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._handle.close()
        self._partial.unlink(missing_ok=True)


class _ShardStream:
    """Appends encoded rows, in order, to this process's shard files, opening each as its first row arrives."""

    def __init__(self, out: Path, shards: Sequence[tuple[int, range]], dtype: torch.dtype) -> None:
        self.out, self.dtype = out, dtype
        self._pending = deque(shards)
        self._writer: SafetensorsRowWriter | None = None

    def append(self, latents: torch.Tensor) -> None:
        while len(latents):
            if self._writer is None:
                shard, rows = self._pending.popleft()
                shape = (len(rows), *latents.shape[1:])
                self._writer = SafetensorsRowWriter(
                    self.out / latents_shard_file(shard), LATENTS_TENSOR, shape, self.dtype
                )
            take = min(self._writer.rows_left, len(latents))
            self._writer.append(latents[:take])
            latents = latents[take:]
            if not self._writer.rows_left:
                self._writer.close()
                self._writer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            if self._writer is not None:
                self._writer.abort()
            return
        if self._writer is not None or self._pending:
            raise RuntimeError(f"{self.out}: shards left unfinished: {[s for s, _ in self._pending]}")


# ------------------------------------------------------------------------------------------ images
class ImageProblem(ValueError):
    """A referenced image that cannot become a model input; the message names it, its file and the rule."""


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The shorter side bicubic-resized to ``size``, then the centre ``size`` x ``size`` crop.

    The arithmetic of torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on PIL images, as the
    diffusers reference trainers preprocess (the longer side truncated, the crop offset rounded). An image
    whose shorter side is already ``size`` is not resampled.
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = round((new_size[0] - size) / 2.0), round((new_size[1] - size) / 2.0)
    if new_size != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def load_model_image(path: Path, size: int) -> np.ndarray:
    """uint8 ``(size, size, 3)`` RGB of an image file, framed by :func:`resize_and_center_crop`.

    Pillow refuses an image of zero width or height at open, so it fails here as "does not decode".

    Raises:
        ImageProblem: the file is empty or does not decode.
    """
    if path.stat().st_size == 0:
        raise ImageProblem(f"{path}: empty file (0 bytes); every referenced image must decode")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ...) on bad bytes
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ImageProblem(f"{path}: does not decode ({reason}); every referenced image must decode") from err
    return np.asarray(resize_and_center_crop(rgb, size), dtype=np.uint8)


class StoredImages(Dataset):
    """Referenced images of an :class:`ImageStore` in a given order, as model-framed uint8 arrays.

    An item is ``(pixels, problem)``: a bad image gives black pixels and a one-line ``problem`` naming its
    sha, file and rule, which the encoding loop raises before that batch reaches the VAE. Raising here
    instead would reach the main process wrapped in DataLoader's multi-line worker traceback.
    """

    def __init__(self, store: ImageStore, shas: Sequence[str], size: int) -> None:
        self.store, self.shas, self.size = store, list(shas), size

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, item: int) -> tuple[np.ndarray, str]:
        sha = self.shas[item]
        try:
            path = self.store.path(sha)
        except KeyError:
            missing = f"not in the store {self.store.images_dir}; every referenced image must be stored"
            return self._blank(), f"featurize: image {sha}: {missing}"
        try:
            return load_model_image(path, self.size), ""
        except ImageProblem as problem:
            return self._blank(), f"featurize: image {sha}: {problem}"

    def _blank(self) -> np.ndarray:
        return np.zeros((self.size, self.size, 3), dtype=np.uint8)


def collate_images(items: list[tuple[np.ndarray, str]]) -> tuple[torch.Tensor, list[str]]:
    """uint8 ``(B, H, W, 3)`` batch (a quarter of float32's bytes between processes) and the problems."""
    return torch.from_numpy(np.stack([pixels for pixels, _ in items])), [problem for _, problem in items]


def model_input(batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> ``(B, 3, H, W)`` in [-1, 1] on ``device``: ``to_model_range`` after the copy.

    The same float32 arithmetic as ``models.diffusion.to_model_range``, applied once the uint8 batch is on
    the device. The permute leaves channels-last strides, as ``to_model_range``'s does: the VAE's
    convolutions pick their kernels by memory layout, and a contiguous copy changes the demo latents'
    last bits.
    """
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(dtype)


# ------------------------------------------------------------------------------------------ encoding
def referenced_images_and_prompts(prefs_dir: Path) -> tuple[list[str], list[str]]:
    """Every image sha and prompt that the canonical tables refer to, in a stable order."""
    shas: dict[str, None] = {}
    prompts: dict[str, None] = {}
    for name, columns in (("pairs", ["image_w", "image_l"]), ("feedback", ["image"]), ("rankings", ["images"])):
        path = prefs_dir / f"{name}.parquet"
        if not path.is_file():
            continue
        table = pd.read_parquet(path)
        prompts.update(dict.fromkeys(table.prompt))
        for column in columns:
            for value in table[column]:
                shas.update(dict.fromkeys(list(value) if column == "images" else [value]))
    return list(shas), list(prompts)


def shard_rows(n_rows: int, shard_size: int) -> list[range]:
    """Row ranges of the shards: ``shard_size`` consecutive rows each, the last one fewer."""
    return [range(start, min(start + shard_size, n_rows)) for start in range(0, n_rows, shard_size)]


def cache_dtype(name: str, device: torch.device) -> torch.dtype:
    """``featurize.dtype`` on ``device``: auto is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@torch.no_grad()
def encode_latent_shards(
    vae,
    store: ImageStore,
    shas: Sequence[str],
    shards: Sequence[tuple[int, range]],
    out: Path,
    cfg: Featurize,
    *,
    resolution: int,
    show_progress: bool = True,
) -> None:
    """Encode the images of ``shards`` (``(shard number, global rows)``) and write one file per shard.

    ``shas`` are all the referenced images in row order; the VAE's device and dtype are the cache's.
    One batch of images and latents is in memory at a time (plus the loader's prefetch).

    Raises:
        ImageProblem: an image is missing, empty or does not decode (before its batch is encoded).
    """
    device, dtype = vae.device, vae.dtype
    mine = [shas[row] for _, rows in shards for row in rows]
    loader = DataLoader(
        StoredImages(store, mine, resolution),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        # Spawned, not forked: a fork copies a process that may hold CUDA state and other threads' locks.
        multiprocessing_context="spawn" if cfg.num_workers else None,
    )
    with _ShardStream(out, shards, dtype) as stream:
        for batch, problems in tqdm(loader, desc="featurize latents", mininterval=5, disable=not show_progress):
            first_problem = next((p for p in problems if p), None)
            if first_problem:
                raise ImageProblem(first_problem)
            pixels = model_input(batch, device, dtype)
            stream.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)


@torch.no_grad()
def write_prompt_embeddings(text_encoder, tokenizer, prompts: list[str], path: Path) -> tuple[int, ...]:
    """Text-encoder hidden states of ``prompts`` written to ``path`` batch by batch; returns the shape."""
    writer: SafetensorsRowWriter | None = None
    try:
        for start in range(0, len(prompts), PROMPT_BATCH):
            ids = tokenizer(
                prompts[start : start + PROMPT_BATCH],
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            hidden = text_encoder(ids.to(text_encoder.device))[0]
            if writer is None:
                writer = SafetensorsRowWriter(path, TEXT_TENSOR, (len(prompts), *hidden.shape[1:]), text_encoder.dtype)
            writer.append(hidden)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    assert writer is not None  # prompts always holds the empty prompt
    writer.close()
    return writer.shape


def compute_features(base_dir: Path, prefs_dir: Path, out: Path, cfg: Featurize, *, resolution: int) -> dict[str, int]:
    """Encode every referenced image and prompt with the base model's VAE and text encoder into ``out``.

    Images become ``resolution`` square (:func:`resize_and_center_crop`). The models run on the
    accelerator when there is one, in ``featurize.dtype``. Under ``accelerate launch`` process p of P
    encodes shards p, p + P, ...; rank 0 also writes the text embeddings and, once every process has
    finished its shards, ``index.json``. ``out`` must exist and be empty when the first process starts.

    Raises:
        ValueError: the tables refer to no image.
        ImageProblem: a referenced image is missing, empty or does not decode.
    """
    from accelerate import PartialState

    from prefalign.data.schema import ImageStore
    from prefalign.models.diffusion import load_base_pipeline

    state = PartialState(cpu=not torch.cuda.is_available())
    text_shape: tuple[int, ...] = ()
    dtype = cache_dtype(cfg.dtype, state.device)
    shas, prompts = referenced_images_and_prompts(prefs_dir)
    if not shas:
        raise ValueError(f"featurize: the tables in {prefs_dir} refer to no images")
    shards = shard_rows(len(shas), cfg.shard_size)
    mine = [(k, shards[k]) for k in range(state.process_index, len(shards), state.num_processes)]
    pipe = load_base_pipeline(base_dir, dtype=dtype)
    vae, text_encoder, tokenizer = pipe.vae.to(state.device), pipe.text_encoder.to(state.device), pipe.tokenizer
    del pipe  # the UNet is not needed here
    encode_latent_shards(
        vae, ImageStore(prefs_dir), shas, mine, out, cfg, resolution=resolution, show_progress=state.is_main_process
    )
    if state.is_main_process:
        text_shape = write_prompt_embeddings(text_encoder, tokenizer, prompts + [""], out / TEXT_FILE)
    state.wait_for_everyone()
    if state.is_main_process:
        write_index(out, shas, prompts, shards, dtype=dtype, text_shape=text_shape)
    state.wait_for_everyone()  # every process returns with the cache complete
    return {"images": len(shas), "prompts": len(prompts), "shards": len(shards)}


def write_index(
    out: Path,
    shas: list[str],
    prompts: list[str],
    shards: Sequence[range],
    *,
    dtype: torch.dtype,
    text_shape: Sequence[int],
) -> None:
    """``index.json`` of a cache whose shard files all exist (checked: rows and dtype of each)."""
    latent_shape: list[int] = []
    for shard, rows in enumerate(shards):
        path = out / latents_shard_file(shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard {shard} was not written")
        _, header = read_safetensors_header(path)
        entry = header[LATENTS_TENSOR]
        if entry["shape"][0] != len(rows) or entry["dtype"] != _SAFETENSORS_DTYPES[dtype]:
            raise ValueError(f"{path}: holds {entry['dtype']} {entry['shape']}, expected {len(rows)} rows of {dtype}")
        latent_shape = entry["shape"][1:]
    index = {
        "dtype": str(dtype).removeprefix("torch."),
        "latent_shape": latent_shape,
        "image_rows": {sha: row for row, sha in enumerate(shas)},
        "shards": [{"file": latents_shard_file(k), "rows": [rows.start, rows.stop]} for k, rows in enumerate(shards)],
        "prompts": prompts,  # row i of text.safetensors; its last row is the empty prompt
        "text": {"file": TEXT_FILE, "shape": list(text_shape)},
    }
    (out / INDEX_FILE).write_text(json.dumps(index))
