"""The prompt grammar of the demo world: five attributes, one sentence template, and its inverse.

Every prompt reads "a {size} {color} {shape} at the {position} on a {background} background". The
grammar is closed (540 prompts), so the tokenizer, the renderer and the oracle can all be generated
from it and agree on every word.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields, replace

import numpy as np

# Object colours: pairwise RGB distances are at least ~105 (orange sits between red and yellow on
# purpose, far enough from both), and every colour is at least ~120 away from every background, so
# a pixel oracle can tell them apart even after noise and blur.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 230, 40),
    "purple": (150, 40, 210),
    "orange": (250, 130, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")


@dataclass(frozen=True)
class Attributes:
    """One scene of the demo world: a single shape on a plain background."""

    shape: str
    color: str
    size: str
    position: str
    background: str


# The allowed values of each attribute, in the field order of ``Attributes``.
DOMAINS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}

_PROMPT_RE = re.compile(
    r"a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) at the (?P<position>[a-z ]+?) on a (?P<background>\w+) background"
)


def prompt_of(a: Attributes) -> str:
    """The prompt that describes ``a``.

    Args:
        a: The scene.

    Returns:
        "a {size} {color} {shape} at the {position} on a {background} background".
    """
    return f"a {a.size} {a.color} {a.shape} at the {a.position} on a {a.background} background"


def parse_prompt(prompt: str) -> Attributes:
    """The attributes named by a grammar prompt (inverse of :func:`prompt_of`).

    Args:
        prompt: A prompt; case and runs of whitespace are normalised first.

    Returns:
        The parsed attributes.

    Raises:
        ValueError: If the prompt is not a sentence of the grammar (the message names it).
    """
    text = " ".join(str(prompt).lower().split())
    match = _PROMPT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not in the demo grammar")
    values = match.groupdict()
    for name, value in values.items():
        if value not in DOMAINS[name]:
            raise ValueError(f"prompt {prompt!r}: {name} {value!r} not in {DOMAINS[name]}")
    return Attributes(**values)


def without_position(prompt: str) -> str:
    """``prompt`` with its position phrase removed: "a small red circle on a black background".

    Web captions rarely say where things are (VISOR, Gokhale et al. 2022; SPRIGHT, Chatterjee et al. 2024),
    one reason real base models place objects poorly; the demo base's pretraining captions can be thinned
    the same way.

    Args:
        prompt: A grammar prompt.

    Returns:
        The prompt without " at the {position}".

    Raises:
        ValueError: If the prompt is not a sentence of the grammar.
    """
    a = parse_prompt(prompt)
    return prompt_of(a).replace(f" at the {a.position}", "")


def all_attributes() -> list[Attributes]:
    """Every scene of the grammar, in a fixed order (shape slowest, background fastest).

    Returns:
        The 540 attribute combinations.
    """
    order = [f.name for f in fields(Attributes)]
    return [Attributes(**dict(zip(order, combo, strict=True))) for combo in itertools.product(*DOMAINS.values())]


def vocabulary_words() -> list[str]:
    """Every distinct word of every prompt, sorted (the demo tokenizer is generated from it).

    Returns:
        The sorted word list.
    """
    template = prompt_of(Attributes("", "", "", "", ""))
    words = set(template.split())
    for values in DOMAINS.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def corrupt(a: Attributes, rng: np.random.Generator, n: int = 1) -> Attributes:
    """``a`` with ``n`` distinct attributes changed, each to a different value of the grammar.

    Args:
        a: The true scene.
        rng: Source of randomness.
        n: How many attributes to change (1 to 5).

    Returns:
        The corrupted scene; it always differs from ``a`` in exactly ``n`` attributes.

    Raises:
        ValueError: If ``n`` is outside 1..5.
    """
    names = list(DOMAINS)
    if not 1 <= n <= len(names):
        raise ValueError(f"n must be in 1..{len(names)}, got {n}")
    changes = {}
    for k in rng.choice(len(names), size=n, replace=False):
        name = names[int(k)]
        others = [v for v in DOMAINS[name] if v != getattr(a, name)]
        changes[name] = others[int(rng.integers(len(others)))]
    return replace(a, **changes)
