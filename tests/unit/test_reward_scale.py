"""The reward model at scale, on a tiny backbone: images decoded on demand train and score exactly as images
held on the device; CLIP's own preprocessing; mirrored batches; activation checkpointing; unreadable images;
expert selection in batches from the image store."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from prefalign.config import RewardConfig, load_config
from prefalign.data.schema import PAIRS_SCHEMA, ImageStore, write_table
from prefalign.models.reward_model import PIL_BILINEAR, RewardScorer, load_backbone
from prefalign.models.text import build_tokenizer
from prefalign.training.reward import train_reward_model
from prefalign.training.reward_data import (
    DecodedImages,
    DeviceImages,
    RewardData,
    StoreImages,
    check_images,
    decoded_bytes,
)
from prefalign.training.reward_scoring import evaluate_reward
from prefalign.world.grammar import DOMAINS, Attributes, all_attributes, prompt_of, vocabulary_words
from prefalign.world.render import render

N_PROMPTS, N_TRAIN = 24, 16
TINY = {"width": 32, "vision_layers": 1}


@dataclass
class Tables:
    pairs: pd.DataFrame
    rankings: pd.DataFrame
    images: dict[str, np.ndarray]


def _with_other(attrs: Attributes, name: str, rng: np.random.Generator) -> Attributes:
    others = [value for value in DOMAINS[name] if value != getattr(attrs, name)]
    return replace(attrs, **{name: others[int(rng.integers(len(others)))]})


@pytest.fixture(scope="module")
def tables() -> Tables:
    """Per prompt: the right rendering beats a wrong colour and a wrong position (pairs and a ranking of 3)."""
    rng = np.random.default_rng(0)
    scenes = [all_attributes()[i] for i in rng.permutation(len(all_attributes()))[:N_PROMPTS]]
    images: dict[str, np.ndarray] = {}
    pairs, rankings = [], []
    for i, attrs in enumerate(scenes):
        split = "train" if i < N_TRAIN else "val"
        ranked = []
        for variant in (attrs, _with_other(attrs, "color", rng), _with_other(attrs, "position", rng)):
            sha = f"{len(images):064x}"
            images[sha] = render(variant, 16, noise_sigma=float(rng.uniform(0, 10)), rng=rng)
            ranked.append(sha)
        prompt = prompt_of(attrs)
        for worse in ranked[1:]:
            pairs.append({"prompt": prompt, "image_w": ranked[0], "image_l": worse, "label": 1.0, "split": split})
        rankings.append({"prompt": prompt, "images": ranked, "split": split})
    return Tables(pd.DataFrame(pairs), pd.DataFrame(rankings), images)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _split(tables: Tables, name: str, **kwargs) -> RewardData:
    return RewardData.from_tables(
        tables.pairs, tables.rankings, tables.images.__getitem__, keep_ties=True, split=name, **kwargs
    )


def _tiny_scorer(seed: int = 0) -> RewardScorer:
    return load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=seed, tiny=TINY)


def test_preload_budget_decides_per_split(tables: Tables) -> None:
    n_images = 3 * (N_PROMPTS - N_TRAIN)
    needed = decoded_bytes(n_images, 16)
    assert needed == n_images * 16 * 16 * 3
    held = _split(tables, "val", resize_to=16, preload_max_bytes=needed + 1)
    assert held.images is not None and held.images.shape == (n_images, 16, 16, 3) and held.load_image is None
    on_demand = _split(tables, "val", resize_to=16, preload_max_bytes=needed)
    assert on_demand.images is None and on_demand.load_image is not None
    assert on_demand.image_shas == held.image_shas
    with pytest.raises(ValueError, match="preload_max_bytes needs resize_to"):
        _split(tables, "val", preload_max_bytes=0)


def test_mirrored_keys_gather_the_flipped_images(tables: Tables) -> None:
    data = _split(tables, "val")
    assert data.images is not None
    scorer = _tiny_scorer()
    n_images = data.n_images
    keys = np.array([0, 2, n_images + 0, n_images + 5])
    on_device = DeviceImages(scorer.uint8_pixels(data.images)).gather(keys)
    decoded = DecodedImages(data.image_shas, tables.images.__getitem__, scorer.preprocessing).gather(keys)
    assert torch.equal(on_device, decoded) and on_device.dtype == torch.uint8
    originals = torch.from_numpy(data.images[[0, 2, 0, 5]]).permute(0, 3, 1, 2)
    assert torch.equal(on_device[:2], originals[:2])
    assert torch.equal(on_device[2:], originals[2:].flip(-1))
    assert not torch.equal(on_device[2:], originals[2:])  # the renderings are not mirror-symmetric


def test_on_demand_images_train_and_score_exactly_as_images_on_the_device(tables: Tables, single_thread: None) -> None:
    """preload_max_bytes=0 forces every split through the DataLoader (one worker process): 16 px images need
    no resize, so the weights, the history and the held-out scores must be the same to the bit."""
    cfg = RewardConfig(
        loss="mixed", steps=4, batch_size=8, lr=5e-4, eval_every=2, patience=4, ema_decay=0.9, num_workers=1
    )
    runs = {}
    for name, budget in (("device", None), ("on_demand", 0)):
        train = _split(tables, "train", resize_to=16, preload_max_bytes=budget)
        val = _split(tables, "val", resize_to=16, preload_max_bytes=budget)
        assert (train.images is None) == (budget == 0)
        scorer = _tiny_scorer()
        result = train_reward_model(scorer, cfg, train, val, seed=0, progress=False)
        metrics, scores = evaluate_reward(scorer, val, num_workers=1)
        runs[name] = (scorer, result, metrics, scores)
    (held, held_result, held_metrics, held_scores) = runs["device"]
    (decoded, decoded_result, decoded_metrics, decoded_scores) = runs["on_demand"]
    assert decoded_result.history == held_result.history and len(held_result.history["loss"]) == 4
    for (name, a), b in zip(held.model.state_dict().items(), decoded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(decoded_scores.score_w, held_scores.score_w)
    np.testing.assert_array_equal(decoded_scores.ranking_scores, held_scores.ranking_scores)
    assert decoded_metrics["kendall_tau"] == held_metrics["kendall_tau"]


def test_activation_checkpointing_trains_the_same_weights(tables: Tables, single_thread: None) -> None:
    train, val = _split(tables, "train"), _split(tables, "val")
    flags = []

    def layer_flag(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            flags.append(scorer.model.vision_model.encoder.layers[0].gradient_checkpointing)

    weights = {}
    for checkpointing in (False, True):
        scorer = _tiny_scorer()
        cfg = RewardConfig(steps=2, batch_size=8, eval_every=2, gradient_checkpointing=checkpointing)
        train_reward_model(scorer, cfg, train, val, seed=0, progress=False, log_metrics=layer_flag)
        weights[checkpointing] = scorer.model.state_dict()
        assert not scorer.model.vision_model.encoder.layers[0].gradient_checkpointing  # switched off after
    assert flags == [False, True]  # it was on while the second run trained
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=0, atol=1e-6, msg=name)


def _save_scorer(tmp_path: Path, preprocessor: dict | None = None) -> Path:
    folder = _tiny_scorer().save(tmp_path / "clip")
    if preprocessor:
        config_file = folder / "preprocessor_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **preprocessor}))
    return folder


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (16, 40)])
@pytest.mark.parametrize("shortest_edge", [16, 20])
def test_preprocessing_matches_clip_image_processor(
    tmp_path: Path, shape: tuple[int, int], shortest_edge: int
) -> None:
    """Bicubic resize of the shorter side (its long side truncated as transformers does), centre crop and the
    folder's normalisation: the same pixel values as ``CLIPImageProcessor`` (its PIL backend)."""
    from transformers import CLIPImageProcessorPil

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    folder = _save_scorer(tmp_path, {"size": {"shortest_edge": shortest_edge}, "image_mean": mean, "image_std": std})
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = CLIPImageProcessorPil.from_pretrained(folder)(images=[image], return_tensors="pt").pixel_values
    scorer = RewardScorer.load(folder)
    assert (scorer.shortest_edge, scorer.image_mean) == (shortest_edge, tuple(mean))
    ours = scorer.pixel_values(image[None])
    assert ours.shape == expected.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if min(shape) != shortest_edge:  # resized: the bilinear filter used before does not give CLIP's pixels
        bilinear = RewardScorer(
            scorer.model, scorer.tokenizer, image_mean=mean, image_std=std, shortest_edge=shortest_edge
        )
        bilinear.resample = PIL_BILINEAR
        assert float((bilinear.pixel_values(image[None]) - expected).abs().max()) > 1e-2


def test_preprocessor_crop_other_than_the_model_size_is_refused(tmp_path: Path) -> None:
    folder = _save_scorer(tmp_path, {"crop_size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match=re.escape(str(folder / "preprocessor_config.json")) + ".*crop_size is 224"):
        RewardScorer.load(folder)


def _store_with(tmp_path: Path, tables: Tables) -> tuple[ImageStore, dict[str, str]]:
    store = ImageStore(tmp_path / "prefs")
    return store, {sha: store.put_array(image) for sha, image in tables.images.items()}


def test_an_unreadable_image_is_one_line_naming_it_before_training(tmp_path: Path, tables: Tables) -> None:
    store, stored = _store_with(tmp_path, tables)
    val = tables.pairs[tables.pairs.split == "val"]
    pairs = val.assign(image_w=val.image_w.map(stored), image_l=val.image_l.map(stored))
    broken_sha = pairs.image_l.iloc[1]
    broken_file = store.path(broken_sha)
    broken_file.write_bytes(broken_file.read_bytes()[:60])  # a PNG cut inside its pixel data
    images = StoreImages(store.root)

    with pytest.raises(ValueError) as decoded_up_front:
        RewardData.from_tables(pairs, None, images, keep_ties=True, split="val", resize_to=16)
    with pytest.raises(ValueError) as decoded_on_demand:
        check_images(
            RewardData.from_tables(
                pairs, None, images, keep_ties=True, split="val", resize_to=16, preload_max_bytes=0
            ),
            images,
        )
    for error in (decoded_up_front, decoded_on_demand):
        message = str(error.value)
        assert "\n" not in message and broken_sha in message and str(broken_file) in message, message
    assert str(decoded_on_demand.value).startswith("'val' split: image ")


def test_experts_are_scored_in_batches_from_the_store(tmp_path: Path, tables: Tables, single_thread: None) -> None:
    """Candidates of mixed sizes (16 and 24 px) are decoded batch by batch at the scorer's size; the rewards
    are the scorer's, and the experts the best per prompt, capped."""
    from prefalign.training.reward_stage import select_experts

    store, stored = _store_with(tmp_path, tables)
    enlarged = {}
    for k, (sha, image) in enumerate(tables.images.items()):
        if k % 4 == 0:  # a quarter of the images at another size, as real pools mix resolutions
            enlarged[sha] = np.asarray(Image.fromarray(image).resize((24, 24), Image.Resampling.NEAREST))
            stored[sha] = store.put_array(enlarged[sha])
    train = tables.pairs[tables.pairs.split == "train"]
    write_table(
        train.assign(
            image_w=train.image_w.map(stored),
            image_l=train.image_l.map(stored),
            pair_id=[f"p{i}" for i in range(len(train))],
            source="test",
        ),
        store.root / "pairs.parquet",
        PAIRS_SCHEMA,
    )
    scorer = _tiny_scorer(seed=3)
    scorer.save(tmp_path / "reward")
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  preferences: prefs\n  reward: reward\ndro:\n  top_k: 10\n  per_prompt_cap: 1\n")
    experts = select_experts(load_config(params))

    by_stored = {stored[sha]: enlarged.get(sha, image) for sha, image in tables.images.items()}
    expected = [
        float(scorer.score([prompt], by_stored[sha][None])[0])
        for prompt, sha in zip(experts.prompt, experts.image, strict=True)
    ]
    np.testing.assert_allclose(experts.reward, expected, rtol=0, atol=1e-5)
    assert len(experts) == 10 and experts.prompt.is_unique and experts.reward.is_monotonic_decreasing
    candidates = pd.concat(
        [
            train[["prompt", "image_w"]].rename(columns={"image_w": "image"}),
            train[["prompt", "image_l"]].rename(columns={"image_l": "image"}),
        ]
    )
    best_per_prompt = {
        prompt: max(float(scorer.score([prompt], by_stored[stored[sha]][None])[0]) for sha in group.image)
        for prompt, group in candidates.groupby("prompt")
    }
    top = sorted(best_per_prompt.values(), reverse=True)[:10]
    np.testing.assert_allclose(sorted(experts.reward, reverse=True), top, rtol=0, atol=1e-5)
