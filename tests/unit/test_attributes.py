"""Strict per-attribute prompt following: clean renderings read right, one changed attribute reads wrong
alone, pixel noise does not flip readings, and attributes read right carry higher oracle terms."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prefalign.seeding import numpy_rng
from prefalign.world.attributes import ATTRIBUTES, attribute_correctness
from prefalign.world.grammar import DOMAINS, all_attributes, corrupt, prompt_of
from prefalign.world.oracle import _terms, measure
from prefalign.world.render import render, render_batch

SCENES = all_attributes()
PROMPTS = [prompt_of(a) for a in SCENES]
JUDGED = [k for k in ATTRIBUTES if k not in ("found", "all")]  # the five grammar attributes


def _noisy(scenes, *, blur: bool, draws: int, key: str) -> np.ndarray:
    """Every scene ``draws`` times with Gaussian pixel noise sigma ~ U(0, 25), as the pretraining renderings."""
    images = []
    for d in range(draws):
        for i, a in enumerate(scenes):
            rng = numpy_rng(0, key, d, i)
            images.append(render(a, 16, noise_sigma=rng.uniform(0.0, 25.0), blur=blur, rng=rng))
    return np.stack(images)


def right_reads_score_higher(prompts, images, *, min_each: int = 5) -> dict[str, tuple[float, float]]:
    """Check that, attribute by attribute, images read right have a higher mean oracle term than those read wrong.

    The strict reading and the graded oracle term measure the same thing two ways; on any set of images
    (generated samples included) they must agree on average. Attributes with fewer than ``min_each`` images
    on either side are not judged.

    Args:
        prompts: One grammar prompt per image.
        images: uint8 (N, S, S, 3).
        min_each: Smallest group size (right and wrong) for an attribute to be checked.

    Returns:
        {attribute: (mean term where right, mean term where wrong)} for the attributes checked.
    """
    images = np.asarray(images)
    correct = attribute_correctness(prompts, images)
    terms = _terms(list(prompts), measure(images), images.shape[1])
    out = {}
    for name in JUDGED:
        right, wrong = terms[name][correct[name]], terms[name][~correct[name]]
        if min(len(right), len(wrong)) < min_each:
            continue
        out[name] = (float(right.mean()), float(wrong.mean()))
        assert out[name][0] > out[name][1], f"{name}: mean term {out[name][0]:.3f} right, {out[name][1]:.3f} wrong"
    return out


def test_attribute_names():
    assert ATTRIBUTES == ("found", "color", "background", "position", "size", "shape", "all")


def test_clean_renderings_read_right_everywhere():
    correct = attribute_correctness(PROMPTS, render_batch(SCENES, 16), image_size=16)
    assert set(correct) == set(ATTRIBUTES)
    for name, values in correct.items():
        assert values.dtype == bool and values.shape == (len(SCENES),)
        assert values.all(), f"{name} wrong on {[PROMPTS[i] for i in np.where(~values)[0][:5]]}"


@pytest.mark.parametrize("attr", JUDGED)
def test_one_changed_attribute_reads_wrong_alone(attr):
    # Every scene with ``attr`` changed to every other value, judged against the original prompt.
    # Measured: exactly ``attr`` is wrong in every one of the 7560 cases, no exclusions needed.
    changed, prompts = [], []
    for a in SCENES:
        for value in DOMAINS[attr]:
            if value != getattr(a, attr):
                changed.append(replace(a, **{attr: value}))
                prompts.append(prompt_of(a))
    correct = attribute_correctness(prompts, render_batch(changed, 16), image_size=16)
    for name in ATTRIBUTES:
        expected = name != attr and name != "all"
        off = np.where(correct[name] != expected)[0]
        assert not len(off), (
            f"{name} {'wrong' if expected else 'right'} on {len(off)} of {len(changed)}, e.g. "
            + "; ".join(f"{prompts[i]!r} drawn as {prompt_of(changed[i])!r}" for i in off[:3])
        )


def test_noisy_renderings_read_right():
    # Pretraining noise (sigma up to 25 on 0-255). Measured: 1.000 for every attribute on 1620 images.
    images = _noisy(SCENES, blur=False, draws=3, key="attr-noise")
    correct = attribute_correctness(PROMPTS * 3, images)
    for name, values in correct.items():
        assert values.mean() >= 0.99, f"{name}: {values.mean():.4f}"


def _blurred_small_round(scenes) -> np.ndarray:
    return np.array([a.size == "small" and a.shape in ("circle", "triangle") for a in scenes] * 3)


def test_blurred_noisy_renderings_read_right():
    # Measured on 1620 images: found 0.9988, color 0.9981, background 1.000, position 0.9988, size 0.9938;
    # shape 0.9935 outside blurred small circles and triangles (see the next test for those).
    images = _noisy(SCENES, blur=True, draws=3, key="attr-blur")
    correct = attribute_correctness(PROMPTS * 3, images)
    for name in ("found", "color", "background", "position", "size"):
        assert correct[name].mean() >= 0.99, f"{name}: {correct[name].mean():.4f}"
    rest = ~_blurred_small_round(SCENES)
    assert correct["shape"][rest].mean() >= 0.99, f"shape: {correct['shape'][rest].mean():.4f}"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "oracle limitation, not the reading rule: a blurred small triangle's purest pixel is 7/9 object, the oracle "
        "normalises coverage by that blended colour and clips it, and the blob then matches the circle best "
        "(soft IoU circle 0.81, triangle 0.68 on a clean blurred one; the oracle's own shape term is 0.32). "
        "Blurred small circles flip to square under noise. "
        "Measured shape accuracy: small triangles 0.004, small circles 0.60"
    ),
)
def test_blurred_small_circles_and_triangles_read_their_shape():
    images = _noisy(SCENES, blur=True, draws=3, key="attr-blur")
    correct = attribute_correctness(PROMPTS * 3, images)
    assert correct["shape"][_blurred_small_round(SCENES)].mean() >= 0.99


def test_right_reads_score_higher_on_a_corrupted_noisy_mix():
    # Stand-in for generated samples: one or two attributes wrong, noise, blur on half.
    rng = numpy_rng(0, "attr-mix")
    prompts, images = [], []
    for i in rng.integers(0, len(SCENES), 600):
        a = SCENES[int(i)]
        drawn = corrupt(a, rng, n=int(rng.integers(1, 3))) if rng.random() < 0.6 else a
        images.append(render(drawn, 16, noise_sigma=rng.uniform(0, 25), blur=bool(rng.random() < 0.5), rng=rng))
        prompts.append(prompt_of(a))
    checked = right_reads_score_higher(prompts, np.stack(images))
    assert set(checked) == set(JUDGED)


def test_empty_batch():
    correct = attribute_correctness([], np.zeros((0, 16, 16, 3), np.uint8))
    assert all(v.shape == (0,) for v in correct.values())


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 16, 12, 3), r"\(N, S, S, 3\), got shape \(2, 16, 12, 3\)"),
        ((2, 16, 16, 4), r"\(N, S, S, 3\), got shape \(2, 16, 16, 4\)"),
        ((2, 16, 16), r"got shape \(2, 16, 16\)"),
        ((16, 16, 3), r"got shape \(16, 16, 3\)"),
    ],
)
def test_bad_shapes_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        attribute_correctness(PROMPTS[:2], np.zeros(shape, np.uint8))


def test_wrong_side_and_count_raise():
    images = render_batch(SCENES[:2], 32)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\), got shape \(2, 32, 32, 3\)"):
        attribute_correctness(PROMPTS[:2], images, image_size=16)
    with pytest.raises(ValueError, match=r"3 prompts but 2 images"):
        attribute_correctness(PROMPTS[:3], images)
    with pytest.raises(ValueError, match="0-255"):
        attribute_correctness(PROMPTS[:2], images.astype(np.float64) - 1.0)


def test_right_reads_score_higher_on_generated_samples():
    # Real samples of the pipeline's base, DPO and DRO (tests/fixtures/make_generated_samples.py), not renderings.
    stored = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "generated_samples.npz")
    prompts, images = [str(p) for p in stored["prompts"]], stored["images"]
    assert images.shape[1:] == (16, 16, 3) and len(prompts) == len(images) >= 300
    checked = right_reads_score_higher(prompts, images)
    # Every judged attribute has at least 5 images read right and 5 read wrong in this set (colour 360/18,
    # position 67/311 at commit 5fa43c7), so none of them is skipped.
    assert set(checked) == set(JUDGED)
