"""The tiny CLIP reward model learns the demo world's preferences, and its folder is a stock CLIP folder.

Data: renderings of ~300 demo prompts; each correct rendering is preferred to renderings of the same
scene with the wrong colour or the wrong position (labels 1.0), plus a few ties between two correct
renderings. Prompts are split into train / val / test, so every metric is on prompts never trained on.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prefalign.config import RewardConfig
from prefalign.models.reward_model import RewardScorer, load_backbone
from prefalign.models.text import build_tokenizer
from prefalign.training.reward import TrainResult, train_reward_model
from prefalign.training.reward_data import RewardData
from prefalign.training.reward_scoring import evaluate_reward
from prefalign.world.grammar import DOMAINS, Attributes, all_attributes, prompt_of, vocabulary_words
from prefalign.world.render import render

N_PROMPTS, N_TRAIN, N_VAL = 300, 220, 40
WRONG_PER_ATTRIBUTE = 3  # pairs per prompt and corrupted attribute, each with its own noise
# Validation accuracy passes 0.9 after ~100 steps on this data; over model seeds 1-5, 300 steps gave
# 0.96-1.0 (160 steps: 0.84-0.97). lr 5e-4: at 1e-3 short runs sometimes settle on colour alone.
TRAIN_CFG = RewardConfig(steps=300, batch_size=128, lr=5e-4, eval_every=20, patience=4)


@dataclass
class DemoSplits:
    pairs: pd.DataFrame
    images: dict[str, np.ndarray]
    test_attributes: list[Attributes]


def _with_other(attrs: Attributes, name: str, rng: np.random.Generator) -> Attributes:
    others = [value for value in DOMAINS[name] if value != getattr(attrs, name)]
    return replace(attrs, **{name: others[int(rng.integers(len(others)))]})


def _build_demo_pairs() -> DemoSplits:
    rng = np.random.default_rng(0)
    scenes = [all_attributes()[i] for i in rng.permutation(len(all_attributes()))[:N_PROMPTS]]
    images: dict[str, np.ndarray] = {}

    def store(image: np.ndarray) -> str:
        sha = hashlib.sha256(image.tobytes()).hexdigest()
        images[sha] = image
        return sha

    def noisy(attrs: Attributes) -> str:
        return store(render(attrs, 16, noise_sigma=float(rng.uniform(0, 12)), rng=rng))

    rows = []
    for i, attrs in enumerate(scenes):
        split = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
        correct, prompt = noisy(attrs), prompt_of(attrs)
        for name in ("color", "position") * WRONG_PER_ATTRIBUTE:
            rows.append(
                {
                    "pair_id": f"p{len(rows)}",
                    "prompt": prompt,
                    "image_w": correct,
                    "image_l": noisy(_with_other(attrs, name, rng)),
                    "label": 1.0,
                    "split": split,
                }
            )
        if i % 10 == 0:  # a tie: two correct renderings
            rows.append(
                {
                    "pair_id": f"p{len(rows)}",
                    "prompt": prompt,
                    "image_w": correct,
                    "image_l": noisy(attrs),
                    "label": 0.5,
                    "split": split,
                }
            )
    return DemoSplits(pd.DataFrame(rows), images, scenes[N_TRAIN + N_VAL :])


@pytest.fixture(scope="module")
def demo() -> DemoSplits:
    return _build_demo_pairs()


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    # The tiny model gains little from a second thread, and on a shared 2-core machine two OpenMP
    # threads competing with another process made each step ~30x slower (2.4 s against 0.07 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(demo: DemoSplits, single_thread: None) -> tuple[RewardScorer, TrainResult, RewardData]:
    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name)

    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)
    result = train_reward_model(scorer, TRAIN_CFG, split("train"), split("val"), seed=0, progress=False)
    return scorer, result, split("test")


def test_reward_model_learns_demo_preferences(trained: tuple[RewardScorer, TrainResult, RewardData]) -> None:
    scorer, result, test = trained
    assert result.best_val_accuracy > 0.85
    assert 0 < result.steps_run <= TRAIN_CFG.steps
    assert all(np.isfinite(result.history["loss"]))
    metrics, scores = evaluate_reward(scorer, test)
    assert metrics["pairwise_accuracy"] > 0.85
    assert metrics["n_pairs"] == int((test.pair_label == 1.0).sum()) and metrics["n_ties_excluded"] == 4
    assert metrics["kendall_tau"] is None and metrics["top1_accuracy"] is None
    assert metrics["calibration"]["count"] == metrics["calibration"]["count"][::-1]  # both orientations
    assert sum(metrics["calibration"]["count"]) == 2 * metrics["n_pairs"]
    assert scores.score_w.shape == scores.score_l.shape == (test.n_pairs,)
    json.dumps(metrics)  # the report is JSON as it is


def test_correct_colour_scores_higher_than_wrong_colour(
    trained: tuple[RewardScorer, TrainResult, RewardData], demo: DemoSplits
) -> None:
    """Behavioural test on held-out prompts: only the colour differs, pixel for pixel, noise included."""
    scorer, _, _ = trained
    rng = np.random.default_rng(1)
    prompts, correct, wrong = [], [], []
    for attrs in demo.test_attributes:
        noise_seed = int(rng.integers(2**31))
        prompts.append(prompt_of(attrs))
        recoloured = _with_other(attrs, "color", rng)
        correct.append(render(attrs, 16, noise_sigma=6.0, rng=np.random.default_rng(noise_seed)))
        wrong.append(render(recoloured, 16, noise_sigma=6.0, rng=np.random.default_rng(noise_seed)))
    better = scorer.score(prompts, np.stack(correct)) > scorer.score(prompts, np.stack(wrong))
    assert better.mean() >= 0.8


def test_saved_folder_is_a_stock_clip_with_identical_scores(
    trained: tuple[RewardScorer, TrainResult, RewardData], tmp_path: Path
) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    scorer, _, test = trained
    folder = scorer.save(tmp_path / "reward")
    prompts = [test.prompts[i] for i in test.pair_prompt[:32]]
    images = test.images[test.pair_w[:32]]
    expected = scorer.score(prompts, images)

    stock_model = CLIPModel.from_pretrained(folder).eval()
    stock_tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = stock_tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = stock_model(**text, pixel_values=scorer.pixel_values(images))
    np.testing.assert_allclose(out.logits_per_text.diagonal().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(RewardScorer.load(folder).score(prompts, images), expected, atol=1e-5)


def test_scorer_resizes_other_image_sizes(trained: tuple[RewardScorer, TrainResult, RewardData]) -> None:
    scorer, _, test = trained
    upscaled = np.stack([np.kron(img, np.ones((2, 2, 1), dtype=np.uint8)) for img in test.images[:8]])
    scores = scorer.score([test.prompts[0]] * 8, upscaled)
    assert scores.shape == (8,) and np.isfinite(scores).all()


def test_missing_backbone_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clip"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_backbone(str(missing))


def test_folder_without_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*no config.json"):
        load_backbone(str(tmp_path))


def test_non_clip_backbone_names_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*'bert'"):
        load_backbone(str(folder))


def test_empty_split_raises_a_clear_error(demo: DemoSplits) -> None:
    with pytest.raises(ValueError, match="'holdout' split has no pairs"):
        RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split="holdout")
    ties_only = demo.pairs[demo.pairs.label == 0.5]
    with pytest.raises(ValueError, match="'train' split has no pairs .*ties dropped"):
        RewardData.from_tables(ties_only, None, demo.images.__getitem__, keep_ties=False, split="train")


def test_per_prompt_weights_and_image_dedup(demo: DemoSplits) -> None:
    data = RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=False, split="val")
    assert data.n_pairs == N_VAL * 2 * WRONG_PER_ATTRIBUTE  # ties dropped
    assert data.pair_weight.mean() == pytest.approx(1.0)
    assert len(data.image_shas) == len(set(data.image_shas)) == len(data.images)
    # Prompts with a tie have the same pair count here once ties are dropped, so weights are all equal.
    np.testing.assert_allclose(data.pair_weight, 1.0, rtol=1e-6)


def _rankings_of(demo: DemoSplits, split: str) -> pd.DataFrame:
    """Rankings correct > wrong colour > wrong position (ragged: every third one lacks its last image)."""
    pairs = demo.pairs[(demo.pairs.split == split) & (demo.pairs.label == 1.0)]
    rows = []
    for k, (prompt, group) in enumerate(pairs.groupby("prompt", sort=False)):
        ranked = [group.image_w.iloc[0], group.image_l.iloc[0], group.image_l.iloc[1]]
        rows.append(
            {"ranking_id": f"r{k}", "prompt": prompt, "images": ranked[: 2 if k % 3 == 0 else 3], "split": split}
        )
    return pd.DataFrame(rows)


def test_frozen_backbone_trains_only_the_top(demo: DemoSplits, single_thread: None) -> None:
    data = RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split="val")
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), freeze_backbone_except_last=1)
    model = scorer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= trainable
    assert any(name.startswith("vision_model.encoder.layers.2.") for name in trainable)
    assert not any(
        name.startswith(
            (
                "vision_model.encoder.layers.1.",
                "text_model.encoder.layers.0.",
                "text_model.embeddings",
                "vision_model.embeddings",
            )
        )
        for name in trainable
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_reward_model(
        scorer, RewardConfig(steps=3, batch_size=32, lr=1e-2, eval_every=3), data, data, seed=0, progress=False
    )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def test_train_last_layers_config_freezes_the_backbone_for_fine_tuning_only() -> None:
    from prefalign.config import load_config
    from prefalign.training.reward_stage import freeze_for_fine_tuning

    root = Path(__file__).resolve().parents[2]
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()))
    freeze_for_fine_tuning(load_config(root / "params.yaml"), scorer)
    assert all(p.requires_grad for p in scorer.model.parameters())
    freeze_for_fine_tuning(load_config(root / "params.yaml", {"reward.train_last_layers": 1}), scorer)
    trainable = {name for name, p in scorer.model.named_parameters() if p.requires_grad}
    assert "visual_projection.weight" in trainable and "text_model.encoder.layers.1.mlp.fc1.weight" in trainable
    assert "text_model.encoder.layers.0.mlp.fc1.weight" not in trainable


@pytest.mark.parametrize("loss", ["pl", "mixed"])
def test_listwise_losses_train_and_report_ranking_metrics(demo: DemoSplits, loss: str, single_thread: None) -> None:
    def split(name: str) -> RewardData:
        return RewardData.from_tables(
            demo.pairs, _rankings_of(demo, name), demo.images.__getitem__, keep_ties=True, split=name
        )

    train, val = split("train"), split("val")
    assert train.ranking_mask is not None and (~train.ranking_mask).any()  # ragged
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), seed=1)
    cfg = RewardConfig(loss=loss, steps=4, batch_size=32, eval_every=2, patience=2)
    result = train_reward_model(scorer, cfg, train, val, seed=0, progress=False)
    assert result.steps_run == 4 and all(np.isfinite(result.history["loss"]))
    metrics, scores = evaluate_reward(scorer, val)
    assert -1.0 <= metrics["kendall_tau"] <= 1.0 and 0.0 <= metrics["top1_accuracy"] <= 1.0
    assert scores.ranking_scores is not None and scores.ranking_scores.shape == val.ranking_images.shape


def test_plackett_luce_without_rankings_is_refused(demo: DemoSplits) -> None:
    data = RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split="val")
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()))
    with pytest.raises(ValueError, match="needs rankings"):
        train_reward_model(scorer, RewardConfig(loss="pl", steps=2), data, data, seed=0, progress=False)


def test_rankings_alone_are_expanded_into_pairs(demo: DemoSplits) -> None:
    rankings = _rankings_of(demo, "val")
    data = RewardData.from_tables(demo.pairs.iloc[:0], rankings, demo.images.__getitem__, keep_ties=True, split="val")
    expected = sum(len(images) * (len(images) - 1) // 2 for images in rankings["images"])
    assert data.n_pairs == expected and data.n_rankings == len(rankings)


def test_contrastive_pretraining_alone_grounds_colours(single_thread: None) -> None:
    """CLIP pretraining on captioned renderings (no preferences yet) already ties colour words to pixels."""
    from prefalign.training.reward_pretrain import pretrain_contrastive

    rng = np.random.default_rng(2)
    scenes = all_attributes()
    order = rng.permutation(len(scenes))
    train, held_out = [scenes[i] for i in order[:400]], [scenes[i] for i in order[400:460]]
    scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)
    images = np.stack([render(a, 16, noise_sigma=float(rng.uniform(0, 20)), rng=rng) for a in train for _ in range(3)])
    losses = pretrain_contrastive(
        scorer,
        images,
        [prompt_of(a) for a in train for _ in range(3)],
        steps=150,
        batch_size=128,
        lr=1e-3,
        seed=0,
        progress=False,
    )
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])

    prompts = [prompt_of(a) for a in held_out]
    recoloured = [_with_other(a, "color", rng) for a in held_out]
    right = scorer.score(prompts, np.stack([render(a, 16) for a in held_out]))
    wrong = scorer.score(prompts, np.stack([render(a, 16) for a in recoloured]))
    assert (right > wrong).mean() >= 0.8


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize(("ema_decay", "mirror"), [(0.0, False), (0.9, True)])
def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(
    demo: DemoSplits, single_thread: None, tmp_path: Path, ema_decay: float, mirror: bool
) -> None:
    from prefalign.training.checkpoints import CheckpointMismatchError

    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name)

    cfg = RewardConfig(
        steps=60, batch_size=32, lr=5e-4, eval_every=20, patience=10, ema_decay=ema_decay, mirror_augment=mirror
    )
    train, val = split("train"), split("val")

    def fresh() -> RewardScorer:
        return load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)

    uninterrupted = fresh()
    train_reward_model(uninterrupted, cfg, train, val, seed=0, progress=False)

    def crash_after_step_45(metrics: dict, step: int) -> None:
        if step > 45:
            raise _Crash  # the process dies between checkpoints (the last one was written at step 40)

    with pytest.raises(_Crash):
        train_reward_model(
            fresh(), cfg, train, val, seed=0, progress=False, log_metrics=crash_after_step_45, checkpoint_dir=tmp_path
        )
    assert [p.name for p in tmp_path.iterdir()] == ["step_40"]
    resumed = fresh()
    result = train_reward_model(resumed, cfg, train, val, seed=0, progress=False, checkpoint_dir=tmp_path)
    assert result.steps_run == 60 and len(result.history["loss"]) == 60
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

    # The folder now holds another run's checkpoint: a different seed is refused, naming what differs.
    with pytest.raises(CheckpointMismatchError, match="differs in: seed"):
        train_reward_model(fresh(), cfg, train, val, seed=1, progress=False, checkpoint_dir=tmp_path)


def test_ema_weights_are_the_ones_validated_and_kept(demo: DemoSplits, single_thread: None) -> None:
    from prefalign.training.weights import make_ema

    ema = make_ema({"w": torch.zeros(1)}, 0.99, warmup=True)
    # EMAModel's update k (1-based) decays by min(d, k / (9 + k)) after a first update that copies.
    assert [ema.get_decay(k) for k in (1, 2, 10_000)] == [0.0, pytest.approx(2 / 11), 0.99]

    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name)

    def run(ema_decay: float) -> tuple[RewardScorer, TrainResult]:
        scorer = load_backbone("tiny", tokenizer=build_tokenizer(vocabulary_words()), image_size=16, seed=0)
        cfg = RewardConfig(steps=40, batch_size=32, lr=5e-4, eval_every=40, patience=10, ema_decay=ema_decay)
        return scorer, train_reward_model(scorer, cfg, split("train"), split("val"), seed=0, progress=False)

    raw, raw_result = run(0.0)
    averaged, averaged_result = run(0.9)
    # Same data, seed and steps: only the EMA separates them, and its weights are what was validated.
    assert raw_result.best_step == averaged_result.best_step == 40
    differs = [not torch.equal(a, b) for a, b in zip(raw.model.parameters(), averaged.model.parameters(), strict=True)]
    assert any(differs)
    val = split("val")
    accuracy = evaluate_reward(averaged, val)[0]["pairwise_accuracy"]
    assert accuracy == pytest.approx(averaged_result.best_val_accuracy)


def test_perception_ceiling_orders_the_demo_pairs_like_the_oracle(demo: DemoSplits, single_thread: None) -> None:
    """The ceiling learner sees the oracle's measurements: correct vs wrong colour or position is easy for it."""
    from prefalign.evaluation.reward_ceiling import perception_ceiling

    def split(name: str) -> RewardData:
        return RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split=name)

    result = perception_ceiling(split("train"), split("val"), split("test"), tau=0.08, steps=500)
    assert result.oracle_agreement > 0.95
    assert result.bayes_accuracy - 0.03 < result.expected_accuracy <= result.bayes_accuracy
    assert result.pairwise_accuracy > 0.9 and 0 < result.best_step <= 500


def test_perception_ceiling_needs_training_pairs(demo: DemoSplits) -> None:
    from prefalign.evaluation.reward_ceiling import perception_ceiling

    test = RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split="test")
    empty = RewardData.from_tables(demo.pairs, None, demo.images.__getitem__, keep_ties=True, split="test")
    empty.pair_w = empty.pair_l = empty.pair_prompt = np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="train split has none"):
        perception_ceiling(empty, test, test, tau=0.08)
