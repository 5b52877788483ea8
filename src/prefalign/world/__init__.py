"""The demo world: prompt grammar, renderer, pixel oracle and simulated annotators (known ground truth)."""

from prefalign.world.annotators import (
    annotate,
    bayes_accuracy,
    expected_accuracy,
    preference_probability,
    pseudonymise,
)
from prefalign.world.grammar import (
    BACKGROUNDS,
    COLORS,
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
from prefalign.world.oracle import WEIGHTS, oracle_breakdown, oracle_score, oracle_scores
from prefalign.world.render import render, render_batch

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "WEIGHTS",
    "Attributes",
    "all_attributes",
    "annotate",
    "bayes_accuracy",
    "expected_accuracy",
    "corrupt",
    "oracle_breakdown",
    "oracle_score",
    "oracle_scores",
    "parse_prompt",
    "preference_probability",
    "prompt_of",
    "pseudonymise",
    "render",
    "render_batch",
    "vocabulary_words",
]
