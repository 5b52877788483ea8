"""The demo grammar: prompts, their inverse, the vocabulary and attribute corruption."""

from dataclasses import fields

import numpy as np
import pytest

from prefalign.world.grammar import (
    BACKGROUNDS,
    COLORS,
    DOMAINS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    all_attributes,
    corrupt,
    parse_prompt,
    prompt_of,
    vocabulary_words,
)


def _rgb_distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def test_constants():
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert list(BACKGROUNDS) == ["black", "white", "gray"]
    assert BACKGROUNDS["gray"] == (128, 128, 128)
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("top left", "top right", "bottom left", "bottom right", "center")
    assert [f.name for f in fields(Attributes)] == list(DOMAINS)


def test_colours_are_well_separated():
    names = list(COLORS)
    pairwise = [_rgb_distance(COLORS[a], COLORS[b]) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(pairwise) >= 100
    assert _rgb_distance(COLORS["orange"], COLORS["red"]) >= 100
    assert _rgb_distance(COLORS["orange"], COLORS["yellow"]) >= 100
    assert min(_rgb_distance(c, bg) for c in COLORS.values() for bg in BACKGROUNDS.values()) >= 110


def test_prompt_format():
    a = Attributes("circle", "red", "small", "top left", "gray")
    assert prompt_of(a) == "a small red circle at the top left on a gray background"
    b = Attributes("triangle", "orange", "large", "center", "white")
    assert prompt_of(b) == "a large orange triangle at the center on a white background"


def test_parse_inverts_prompt_of_for_every_scene():
    attrs = all_attributes()
    assert len(attrs) == 540 == len(set(attrs))
    assert attrs == all_attributes()  # deterministic order
    assert all(parse_prompt(prompt_of(a)) == a for a in attrs)
    assert len({prompt_of(a) for a in attrs}) == 540


def test_parse_normalises_case_and_whitespace():
    expected = Attributes("square", "blue", "large", "bottom right", "black")
    assert parse_prompt("  A LARGE Blue square at the  bottom\tright on a black background ") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "a small pink circle at the top left on a gray background",
        "a small red circle at the middle on a gray background",
        "a small red circle at the top left",
        "a red circle",
        "",
    ],
)
def test_parse_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="not in"):
        parse_prompt(bad)


def test_vocabulary_covers_every_prompt_word():
    words = vocabulary_words()
    assert words == sorted(set(words))
    used = {w for a in all_attributes() for w in prompt_of(a).split()}
    assert set(words) == used
    assert {"a", "at", "the", "on", "background", "top", "left", "center", "gray", "orange"} <= set(words)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_corrupt_changes_exactly_n_attributes_within_the_grammar(n):
    rng = np.random.default_rng(0)
    for a in all_attributes()[::7]:
        b = corrupt(a, rng, n)
        changed = [f.name for f in fields(Attributes) if getattr(a, f.name) != getattr(b, f.name)]
        assert len(changed) == n
        assert parse_prompt(prompt_of(b)) == b  # still a sentence of the grammar


def test_corrupt_is_reproducible_and_covers_every_attribute():
    a = Attributes("circle", "red", "small", "center", "gray")
    draws = [corrupt(a, np.random.default_rng(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(1)
    changed = set()
    for _ in range(200):
        b = corrupt(a, rng)
        changed |= {f.name for f in fields(Attributes) if getattr(a, f.name) != getattr(b, f.name)}
    assert changed == set(DOMAINS)


@pytest.mark.parametrize("n", [0, 6])
def test_corrupt_rejects_bad_n(n):
    with pytest.raises(ValueError):
        corrupt(all_attributes()[0], np.random.default_rng(0), n)


def test_without_position_drops_only_the_position_phrase():
    from prefalign.world.grammar import without_position

    assert (
        without_position("a small red circle at the top left on a black background")
        == "a small red circle on a black background"
    )
    with pytest.raises(ValueError):
        without_position("a red circle")


def test_thin_position_phrases_is_keyed_and_keeps_the_share():
    from prefalign.training.pretrain import thin_position_phrases
    from prefalign.world.grammar import all_attributes, prompt_of

    captions = [prompt_of(a) for a in all_attributes()] * 4
    thinned = thin_position_phrases(captions, 0.2, seed=0)
    kept = np.mean([" at the " in c for c in thinned])
    assert 0.15 < kept < 0.25
    assert thinned == thin_position_phrases(captions, 0.2, seed=0)
    assert thin_position_phrases(captions, 1.0, seed=0) == captions
