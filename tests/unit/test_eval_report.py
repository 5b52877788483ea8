"""The evaluation report without a diffusion model: grid prompt choice, early config errors, the judges' payload,
the accuracy payload and the figures, from synthetic renderings standing in for generated images and scored by
real (tiny) judges."""

import json

import numpy as np
import pytest

from prefalign.config import PipelineConfig
from prefalign.data.prepare import assign_split
from prefalign.evaluation import report
from prefalign.evaluation.report import check_grid, grid_prompts, summarize
from prefalign.models.reward_model import RewardScorer, build_tiny_reward_model
from prefalign.models.sampling import eval_grid
from prefalign.models.text import build_tokenizer
from prefalign.seeding import numpy_rng
from prefalign.world.attributes import ATTRIBUTES, attribute_correctness
from prefalign.world.grammar import all_attributes, corrupt, parse_prompt, prompt_of
from prefalign.world.oracle import oracle_scores
from prefalign.world.render import render

ALL_PROMPTS = sorted(prompt_of(a) for a in all_attributes())
TEST_PROMPTS = [p for p in ALL_PROMPTS if assign_split(p, train=0.8, val=0.1) == "test"]
MODELS = ("base", "dpo", "dro")


class RecordingTracker:
    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(path)


def _save_tiny_clip(folder, seed):
    """A tiny random CLIPModel folder (weights, tokenizer, preprocessor): a reward model, or a clip_score judge."""
    words = sorted({w for p in ALL_PROMPTS for w in p.split()})
    tokenizer = build_tokenizer(words, max_length=32)
    model = build_tiny_reward_model(tokenizer, embed_dim=16, width=32, vision_layers=1, seed=seed)
    return RewardScorer(model, tokenizer).save(folder)


@pytest.fixture(scope="module")
def judged_root(tmp_path_factory):
    """A repo root with a reward model (models/reward) and a second CLIP folder for an independent judge."""
    root = tmp_path_factory.mktemp("judged")
    _save_tiny_clip(root / "models/reward", seed=0)
    _save_tiny_clip(root / "weights/clip", seed=1)
    return root


def _synthetic_eval(prompts, images_per_prompt, wrong_rates=(0.7, 0.4, 0.4)):
    """Per-model renderings of the evaluation grid, each image with a chance of corrupted attributes and noise."""
    flat, _, prompt_ids = eval_grid(prompts, images_per_prompt, 0)
    images, scores = {}, {}
    for name, p_wrong in zip(MODELS, wrong_rates, strict=True):
        rng = numpy_rng(0, "synthetic-eval", name)
        batch = []
        for prompt in flat:
            a = parse_prompt(prompt)
            drawn = corrupt(a, rng, n=int(rng.integers(1, 3))) if rng.random() < p_wrong else a
            batch.append(render(drawn, 16, noise_sigma=rng.uniform(0, 25), rng=rng))
        images[name] = np.stack(batch)
        scores[name] = {"reward": rng.normal(size=len(flat)), "oracle": oracle_scores(flat, images[name])}
    return flat, prompt_ids, images, scores


# ------------------------------------------------------------------------------------------ grid prompts
def test_grid_prompts_is_deterministic_and_depends_only_on_prompts_and_seed():
    chosen = grid_prompts(TEST_PROMPTS, 12, 0)
    assert len(chosen) == len(set(chosen)) == 12 and set(chosen) <= set(TEST_PROMPTS)
    assert grid_prompts(TEST_PROMPTS, 12, 0) == chosen
    shuffled = list(np.random.default_rng(3).permutation(TEST_PROMPTS)) + TEST_PROMPTS[:5]  # order, duplicates
    assert grid_prompts(shuffled, 12, 0) == chosen
    assert grid_prompts(TEST_PROMPTS, 5, 0) == chosen[:5]  # a smaller grid is a prefix of a larger one
    assert grid_prompts(TEST_PROMPTS, 12, 1) != chosen
    # Spread over the grammar, not the alphabetical head of the list ("a large black ...").
    assert chosen != TEST_PROMPTS[:12]
    assert len({parse_prompt(p).background for p in chosen}) == 3
    assert len({parse_prompt(p).color for p in chosen}) >= 4


def test_grid_prompts_too_many_names_the_key():
    with pytest.raises(ValueError, match=r"eval.grid_prompts is 5 but only 4 held-out prompts"):
        grid_prompts(TEST_PROMPTS[:4], 5, 0)


def test_check_grid_names_grid_seeds():
    cfg = PipelineConfig(eval={"grid_seeds": 3, "images_per_prompt": 2})
    with pytest.raises(ValueError, match=r"eval.grid_seeds is 3 but eval.images_per_prompt is only 2"):
        check_grid(cfg, TEST_PROMPTS)
    assert check_grid(PipelineConfig(), TEST_PROMPTS) == grid_prompts(TEST_PROMPTS, 12, 0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"grid_prompts": 5}, "eval.grid_prompts"), ({"grid_prompts": 2, "grid_seeds": 9}, "eval.grid_seeds")],
)
def test_grid_errors_come_before_any_generation(monkeypatch, tmp_path, overrides, key):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated images before checking the grid config")

    monkeypatch.setattr(report, "test_prompts", lambda cfg: TEST_PROMPTS[:4])
    monkeypatch.setattr(report, "generate_images", no_generation)
    with pytest.raises(ValueError, match=key):
        report.evaluate_policies(PipelineConfig(eval=overrides), tmp_path, RecordingTracker())


@pytest.mark.parametrize(
    ("judges", "message"),
    [
        ({"pick": {"kind": "pickscore", "path": "weights/none"}}, r"judge 'pick' \(pickscore\) folder .*weights/none"),
        ({"hps": {"kind": "hpsv2", "path": "models"}}, r"judge 'hps' \(hpsv2\) folder .*models': no config\.json"),
    ],
)
def test_judge_errors_come_before_any_generation(monkeypatch, tmp_path, judged_root, judges, message):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated images before loading the judges")

    monkeypatch.setattr(report, "test_prompts", lambda cfg: TEST_PROMPTS[:16])
    monkeypatch.setattr(report, "generate_images", no_generation)
    cfg = PipelineConfig(paths={"root": str(judged_root)}, eval={"judges": judges})
    with pytest.raises(ValueError, match=message):
        report.evaluate_policies(cfg, tmp_path, RecordingTracker())


# ------------------------------------------------------------------------------------------ payload
def test_summarize_accuracy_payload():
    prompts = TEST_PROMPTS[:16]
    flat, prompt_ids, images, scores = _synthetic_eval(prompts, 3, wrong_rates=(0.9, 0.1, 0.3))
    correctness = {m: attribute_correctness(flat, images[m]) for m in MODELS}
    out = summarize(scores, prompt_ids, n_boot=200, seed=0, correctness=correctness)
    assert set(out) == {"models", "win_rates", "accuracy_delta"}
    assert set(out["win_rates"]) == {"dpo_vs_base", "dro_vs_base", "dro_vs_dpo"}
    for name in MODELS:
        assert {"oracle_mean", "reward_mean", "oracle_ci_low", "reward_ci_high"} <= set(out["models"][name])
        accuracy = out["models"][name]["accuracy"]
        assert list(accuracy) == list(ATTRIBUTES)
        for attr, result in accuracy.items():
            assert set(result) == {"mean", "ci_low", "ci_high"}
            assert result["mean"] == pytest.approx(correctness[name][attr].mean())
            assert 0.0 <= result["ci_low"] <= result["mean"] <= result["ci_high"] <= 1.0
    assert set(out["accuracy_delta"]) == {"dpo_vs_base", "dro_vs_base"}
    for attr, result in out["accuracy_delta"]["dpo_vs_base"].items():
        assert set(result) == {"mean", "ci_low", "ci_high"}
        expected = correctness["dpo"][attr].mean() - correctness["base"][attr].mean()
        assert result["mean"] == pytest.approx(expected)
        assert result["ci_low"] <= result["mean"] <= result["ci_high"]
    # Fewer corrupted images: the candidates read right more often, and the report says so.
    assert out["accuracy_delta"]["dpo_vs_base"]["all"]["ci_low"] > 0
    json.dumps(out)  # reports/eval.json must serialise


def test_identical_models_have_zero_accuracy_delta():
    prompts = TEST_PROMPTS[:8]
    flat, prompt_ids, images, scores = _synthetic_eval(prompts, 2)
    same = attribute_correctness(flat, images["base"])
    out = summarize(
        {m: scores["base"] for m in MODELS}, prompt_ids, n_boot=100, seed=0, correctness={m: same for m in MODELS}
    )
    for key in ("dpo_vs_base", "dro_vs_base"):
        for result in out["accuracy_delta"][key].values():
            assert result == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert out["models"]["dpo"]["accuracy"] == out["models"]["base"]["accuracy"]


def test_another_judge_changes_no_other_judges_numbers():
    """A judge added to the evaluation adds its keys; every number of the others stays bit-identical."""
    prompts = TEST_PROMPTS[:8]
    _, prompt_ids, _, scores = _synthetic_eval(prompts, 3)
    rng = np.random.default_rng(7)
    more = {m: {**s, "clip": rng.uniform(0, 40, len(prompt_ids))} for m, s in scores.items()}
    before = summarize(scores, prompt_ids, n_boot=100, seed=0)
    after = summarize(more, prompt_ids, n_boot=100, seed=0)
    for name in MODELS:
        assert {k: v for k, v in after["models"][name].items() if not k.startswith("clip_")} == before["models"][name]
        assert set(after["models"][name]) - set(before["models"][name]) == {"clip_mean", "clip_ci_low", "clip_ci_high"}
    for key, result in after["win_rates"].items():
        assert {k: v for k, v in result.items() if k != "clip"} == before["win_rates"][key]
        assert 0 <= result["clip"]["ci_low"] <= result["clip"]["rate"] <= result["clip"]["ci_high"] <= 1


def test_summarize_without_correctness_has_no_accuracy():
    prompts = TEST_PROMPTS[:4]
    _, prompt_ids, _, scores = _synthetic_eval(prompts, 2)
    out = summarize(scores, prompt_ids, n_boot=50, seed=0)
    assert "accuracy_delta" not in out and all("accuracy" not in v for v in out["models"].values())


def test_wrong_marks():
    correct = {k: np.array([True, True, False]) for k in ATTRIBUTES}
    correct["color"] = np.array([True, False, False])
    correct["position"] = np.array([True, False, False])
    correct["shape"] = np.array([True, False, False])
    assert report._wrong_marks(correct, 0) == ""
    assert report._wrong_marks(correct, 1) == "\u2717col \u2717pos\n\u2717shape"
    assert report._wrong_marks(correct, 2) == "\u2717 no object"


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("deciding", ["oracle", "clip"])
def test_evaluate_policies_on_synthetic_images(monkeypatch, tmp_path, judged_root, deciding):
    prompts = TEST_PROMPTS[:16]
    cfg = PipelineConfig(
        paths={"root": str(judged_root)},
        eval={
            "images_per_prompt": 3,
            "bootstrap": 100,
            "grid_prompts": 6,
            "grid_seeds": 2,
            "judge": deciding,
            "judges": {"clip": {"kind": "clip_score", "path": "weights/clip"}},
        },
    )
    flat, prompt_ids, images, _ = _synthetic_eval(prompts, 3)
    monkeypatch.setattr(report, "test_prompts", lambda cfg: prompts)
    monkeypatch.setattr(report, "generate_images", lambda cfg, p: (flat, prompt_ids, images))
    tracker = RecordingTracker()
    out = report.evaluate_policies(cfg, tmp_path, tracker)
    for key in ("judge", "judges", "models", "win_rates", "n_prompts", "images_per_prompt", "seeds", "accuracy_delta"):
        assert key in out
    assert out["judge"] == deciding and "metric_primary" not in out
    assert out["judges"] == {
        "reward": {"kind": "reward", "path": "models/reward"},
        "oracle": {"kind": "oracle"},
        "clip": {"kind": "clip_score", "path": "weights/clip"},
    }
    reward = RewardScorer.load(judged_root / "models/reward")
    for name in MODELS:
        values = out["models"][name]
        assert values["oracle_mean"] == pytest.approx(oracle_scores(flat, images[name]).mean(), abs=1e-12)
        assert values["reward_mean"] == pytest.approx(reward.score(flat, images[name]).mean(), abs=1e-6)
        assert 0 <= values["clip_ci_low"] <= values["clip_mean"] <= values["clip_ci_high"] <= 100
        assert set(out["models"][name]["accuracy"]) == set(ATTRIBUTES)
        for attr in ATTRIBUTES:
            assert tracker.metrics[f"eval/{name}_acc_{attr}"] == values["accuracy"][attr]["mean"]
        for judge in ("oracle", "reward", "clip"):
            assert tracker.metrics[f"eval/{name}_{judge}_mean"] == values[f"{judge}_mean"]
    for key in ("dpo_vs_base", "dro_vs_base", "dro_vs_dpo"):
        assert set(out["win_rates"][key]) == {"reward", "oracle", "clip"}
        assert tracker.metrics[f"eval/{key}_clip_rate"] == out["win_rates"][key]["clip"]["rate"]
    assert all(np.isscalar(v) for v in tracker.metrics.values())
    for name in ("samples.png", "win_rates.png", "accuracy.png"):
        assert (tmp_path / name) in tracker.artifacts and (tmp_path / name).stat().st_size > 3000
    listed = (tmp_path / "samples_prompts.txt").read_text().splitlines()
    assert listed == grid_prompts(prompts, 6, cfg.seed)
    json.dumps(out)
