"""Feature cache at scale: mixed-size images stream to model-resolution latents in shards read memory-mapped."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prefalign.config import ConfigError, Featurize, ModelConfig, load_config
from prefalign.data.schema import ImageStore
from prefalign.models.diffusion import load_base_pipeline, to_model_range
from prefalign.training.features import (
    ImageProblem,
    MemmapRows,
    SafetensorsRowWriter,
    cache_dtype,
    compute_features,
    encode_latent_shards,
    load_features,
    model_input,
    resize_and_center_crop,
    shard_rows,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(resolution=32, vae_channels=(32, 32), unet_channels=(32, 64), text_hidden=32)
PROMPT_WORDS = ["a", "red", "blue", "circle", "photo"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion folder (one VAE downsampling: 32 px -> 16x16x4 latents)."""
    from prefalign.models.diffusion import (
        assemble_pipeline,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_tiny_vae,
    )
    from prefalign.models.text import build_tokenizer

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(PROMPT_WORDS)
    pipe = assemble_pipeline(
        build_tiny_vae(TINY), build_tiny_text_encoder(TINY, tokenizer), tokenizer, build_tiny_unet(TINY, 16)
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def vae(base_dir):
    return load_base_pipeline(base_dir).vae


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_pairs(prefs: Path, shas: list[str]) -> None:
    """Consecutive images as pairs, one prompt each, in the canonical pairs table."""
    prompts = [f"a {color} circle" for color in ("red", "blue") * len(shas)][: len(shas) // 2]
    pd.DataFrame({"prompt": prompts, "image_w": shas[0::2], "image_l": shas[1::2]}).to_parquet(prefs / "pairs.parquet")


def _encode_alone(vae, pixels: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(to_model_range(pixels[None])).latent_dist.mean[0] * vae.config.scaling_factor


def test_mixed_size_jpegs_become_latents_of_the_model_resolution(tmp_path, base_dir, vae):
    store = ImageStore(tmp_path / "prefs")
    sizes = [(40, 30), (64, 64), (96, 128), (32, 32)]
    shas = [store.put_bytes(_jpeg(w, h, seed), "jpg") for seed, (w, h) in enumerate(sizes)]
    _write_pairs(tmp_path / "prefs", shas)
    out = tmp_path / "features"
    out.mkdir()
    # batches of 3 over shards of 2: batches straddle shard boundaries
    summary = compute_features(base_dir, tmp_path / "prefs", out, Featurize(batch_size=3, shard_size=2), resolution=32)

    assert summary == {"images": 4, "prompts": 2, "shards": 2}
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "latents-00000.safetensors",
        "latents-00001.safetensors",
        "text.safetensors",
    ]
    feats = load_features(out)
    assert tuple(feats.latents.shape) == (4, 4, 16, 16)
    # torchvision Resize(32, BICUBIC) + CenterCrop(32), sizes worked by hand: 40x30 -> 42x32, crop x 5..37;
    # 64x64 -> 32x32; 96x128 -> 32x42, crop y 5..37; 32x32 untouched
    framings = [
        lambda im: im.resize((42, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32)),
        lambda im: im.resize((32, 32), Image.Resampling.BICUBIC),
        lambda im: im.resize((32, 42), Image.Resampling.BICUBIC).crop((0, 5, 32, 37)),
        lambda im: im,
    ]
    for sha, frame in zip(shas, framings, strict=True):
        with Image.open(store.path(sha)) as img:
            expected = _encode_alone(vae, np.array(frame(img.convert("RGB")), dtype=np.uint8))
        got = feats.latents[torch.tensor([feats.image_rows[sha]])][0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert feats.text.shape[0] == 3  # two prompts and the empty one
    assert feats.empty_prompt_row == 2


def test_an_image_whose_shorter_side_is_the_resolution_is_cropped_not_resampled():
    pixels = np.random.default_rng(0).integers(0, 256, (48, 32, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(resize_and_center_crop(Image.fromarray(pixels), 32)), pixels[8:40])
    # an odd margin rounds half to even, as torchvision's CenterCrop does: round(13 / 2) = 6
    assert np.array_equal(np.asarray(resize_and_center_crop(Image.fromarray(pixels[:45]), 32)), pixels[6:38])


def test_demo_latents_and_text_equal_the_one_stack_encoding(tmp_path, base_dir, vae):
    """The demo world's 16 px PNGs: bit-identical to stacking every image and encoding the stack in batches."""
    store = ImageStore(tmp_path / "prefs")
    rng = np.random.default_rng(1)
    shas = [store.put_array(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(10)]
    _write_pairs(tmp_path / "prefs", shas)
    out = tmp_path / "features"
    out.mkdir()
    compute_features(base_dir, tmp_path / "prefs", out, Featurize(batch_size=4, shard_size=3), resolution=16)
    feats = load_features(out)

    pipe = load_base_pipeline(base_dir)
    stacked = to_model_range(np.stack([store.load_array(s) for s in shas]))
    with torch.no_grad():
        before = torch.cat(
            [
                pipe.vae.encode(stacked[i : i + 4]).latent_dist.mean * pipe.vae.config.scaling_factor
                for i in range(0, 10, 4)
            ]
        )
        prompts = list(dict.fromkeys(pd.read_parquet(tmp_path / "prefs/pairs.parquet").prompt)) + [""]
        ids = pipe.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text_before = pipe.text_encoder(ids)[0]
    rows = torch.tensor([feats.image_rows[s] for s in shas])
    assert torch.equal(feats.latents[rows], before)
    assert torch.equal(feats.text[torch.arange(len(prompts))], text_before)


def test_model_input_is_to_model_range_bit_for_bit_and_layout():
    pixels = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ours, reference = model_input(torch.from_numpy(pixels), torch.device("cpu"), torch.float32), to_model_range(pixels)
    assert torch.equal(ours, reference)
    assert ours.stride() == reference.stride()  # the VAE's kernels depend on the layout


def _encode_peak_bytes(vae, store: ImageStore, shas: list[str], out: Path) -> int:
    out.mkdir()
    shards = list(enumerate(shard_rows(len(shas), 8)))
    tracemalloc.start()
    try:
        encode_latent_shards(
            vae, store, shas, shards, out, Featurize(batch_size=4), resolution=32, show_progress=False
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _stack_peak_bytes(store: ImageStore, shas: list[str]) -> int:
    tracemalloc.start()
    try:
        to_model_range(np.stack([store.load_array(s) for s in shas]))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_traced_memory_of_encoding_does_not_grow_with_the_number_of_images(tmp_path, vae):
    """tracemalloc sees numpy buffers (not torch storage): decoded images held at once show up in its peak.

    The cost of holding the extra 3N images once is the yardstick: a whole-data-set ``np.stack`` (today's
    code before sharding, run here as the control) grows by more than that; streaming grows by a fraction.
    """
    store = ImageStore(tmp_path / "prefs")
    rng = np.random.default_rng(3)
    shas = [store.put_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
    n = 16
    extra_images_bytes = 3 * n * 32 * 32 * 3

    _encode_peak_bytes(vae, store, shas[:n], tmp_path / "warm-up")  # one-off allocations: imports, caches
    small = _encode_peak_bytes(vae, store, shas[:n], tmp_path / "small")
    large = _encode_peak_bytes(vae, store, shas, tmp_path / "large")
    assert large - small < extra_images_bytes / 4, (small, large)
    assert MemmapRows(sorted((tmp_path / "large").glob("latents-*")), "latents").shape[0] == 4 * n

    stack_growth = _stack_peak_bytes(store, shas) - _stack_peak_bytes(store, shas[:n])
    assert stack_growth > extra_images_bytes, stack_growth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memmap_rows_read_exactly_the_rows_written_across_shards(tmp_path, dtype):
    table = torch.randn(10, 2, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    files = []
    for shard, rows in enumerate(shard_rows(10, 4)):  # 4 + 4 + 2 rows
        files.append(tmp_path / f"part-{shard}.safetensors")
        writer = SafetensorsRowWriter(files[-1], "latents", (len(rows), 2, 3), dtype)
        for row in rows:  # appended a row at a time, as batches arrive
            writer.append(table[row : row + 1])
        writer.close()
        assert torch.equal(load_file(str(files[-1]))["latents"], table[rows.start : rows.stop])  # a valid file

    reader = MemmapRows(files, "latents")
    assert reader.stored_dtype == dtype and tuple(reader.shape) == (10, 2, 3) and reader.file_rows == [4, 4, 2]
    expected = table.float()
    rows = torch.tensor([9, 0, 3, 4, 4, 8, 7, 5])
    got = reader[rows]
    assert got.dtype == torch.float32 and torch.equal(got, expected[rows])
    assert torch.equal(reader[np.array([2, 6])], expected[[2, 6]])
    assert torch.equal(reader[3:6], expected[3:6])
    assert torch.equal(reader[-1], expected[-1])
    with pytest.raises(IndexError, match="row 10 out of range for 10 rows"):
        reader[torch.tensor([1, 10])]


def test_a_writer_that_did_not_get_every_row_leaves_no_file(tmp_path):
    writer = SafetensorsRowWriter(tmp_path / "t.safetensors", "latents", (3, 2), torch.float32)
    writer.append(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2 of 3 rows written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def _bad_image_error(tmp_path: Path, vae, bad: str, num_workers: int) -> str:
    store = ImageStore(tmp_path / "prefs")
    good = [store.put_array(np.full((32, 32, 3), i, dtype=np.uint8)) for i in range(5)]
    shas = [*good[:2], bad, *good[2:]]
    out = tmp_path / "features"
    out.mkdir()
    cfg = Featurize(batch_size=4, num_workers=num_workers)
    with pytest.raises(ImageProblem) as caught:
        encode_latent_shards(vae, store, shas, list(enumerate(shard_rows(6, 8))), out, cfg, resolution=32)
    assert list(out.iterdir()) == []  # the batch never reached a shard file
    return str(caught.value)


def _jpeg_head(store: ImageStore) -> str:
    return store.put_bytes(_jpeg(32, 32, seed=5)[:200], "jpg")


@pytest.mark.parametrize(
    ("make_bad", "rule"),
    [
        (lambda store: store.put_bytes(b"these bytes are no image", "jpg"), "does not decode"),
        (_jpeg_head, "does not decode"),
        (lambda store: store.put_bytes(b"", "png"), "empty file"),
        (lambda store: "f" * 64, "not in the store"),
    ],
    ids=["garbage", "truncated-jpeg", "empty", "missing"],
)
def test_a_bad_image_gives_one_line_naming_it(tmp_path, vae, make_bad, rule):
    store = ImageStore(tmp_path / "prefs")
    bad = make_bad(store)
    message = _bad_image_error(tmp_path, vae, bad, num_workers=0)
    assert "\n" not in message and bad in message and rule in message
    if rule != "not in the store":
        assert str(store.path(bad)) in message


def test_a_bad_image_decoded_in_a_worker_process_still_gives_one_line(tmp_path, vae):
    store = ImageStore(tmp_path / "prefs")
    bad = store.put_bytes(b"these bytes are no image", "jpg")
    message = _bad_image_error(tmp_path, vae, bad, num_workers=1)
    assert "\n" not in message and str(store.path(bad)) in message and "does not decode" in message


def test_the_cache_dtype_is_bfloat16_on_cuda_only_when_auto():
    assert cache_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert cache_dtype("auto", torch.device("cpu")) == torch.float32
    assert cache_dtype("float32", torch.device("cuda", 0)) == torch.float32
    assert cache_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_an_old_params_file_with_featurize_flip_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"featurize\.flip: Extra inputs are not permitted"):
        load_config(ROOT / "params.yaml", {"featurize.flip": False})


TWO_PROCESS_JOB = """
import sys
from pathlib import Path

import torch

from prefalign.config import Featurize
from prefalign.training.features import compute_features

torch.set_num_threads(1)
base, prefs, out = map(Path, sys.argv[1:4])
compute_features(base, prefs, out, Featurize(batch_size=2, shard_size=2), resolution=32)
"""


@pytest.mark.slow
def test_two_processes_write_every_shard_and_one_index(tmp_path, base_dir):
    """Under accelerate launch (2 CPU processes, gloo) the shards of both and rank 0's index equal one process's."""
    import os
    import socket
    import subprocess
    import sys

    store = ImageStore(tmp_path / "prefs")
    shas = [store.put_bytes(_jpeg(32 + 8 * i, 40, seed=i), "jpg") for i in range(5)]
    _write_pairs(tmp_path / "prefs", [*shas, shas[0]])
    single, two = tmp_path / "single", tmp_path / "two"
    single.mkdir()
    two.mkdir()
    compute_features(base_dir, tmp_path / "prefs", single, Featurize(batch_size=2, shard_size=2), resolution=32)

    job = tmp_path / "job.py"
    job.write_text(TWO_PROCESS_JOB)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(port)]
    # --cpu with --num_processes 2 silently runs one process; --multi_gpu + ACCELERATE_USE_CPU runs two on gloo
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [*launcher, str(job), str(base_dir), str(tmp_path / "prefs"), str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir())
    ours, reference = load_features(two), load_features(single)
    assert ours.image_rows == reference.image_rows and ours.prompt_rows == reference.prompt_rows
    rows = torch.arange(5)
    # one thread per process here, two in this process: the same maths, summed in another order
    torch.testing.assert_close(ours.latents[rows], reference.latents[rows], rtol=0, atol=1e-5)
    assert torch.equal(ours.text[:], reference.text[:])
