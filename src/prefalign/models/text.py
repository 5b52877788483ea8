"""A CLIP tokenizer generated from a word list, so the demo's text encoder needs no download.

The vocabulary holds every byte-level character (alone and as a word end ``c</w>``) so that any text
tokenizes, plus merges learned by byte-pair encoding on the given words until each word is a single
``word</w>`` token. Learning the merges (rather than writing one prefix chain per word) keeps them
consistent: chains of different words would collide on shared pairs ("re" in "red" and "green") and
split words unpredictably.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding on ``words`` until every word is one symbol; returns merges in rank order."""
    segmented = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmented.values():
            counts.update(itertools.pairwise(symbols))
        if not counts:
            return merges
        # Ties broken by the pair itself so the files are identical on every machine.
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged


def tokenizer_files(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges for ``words`` (lower-case ASCII words, as CLIP lower-cases text)."""
    from tokenizers import pre_tokenizers

    clean = sorted({w.lower() for w in words if w.strip()})
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = _learn_merges(clean)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def build_tokenizer(words: Iterable[str], *, max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose whole-word tokens are ``words``; save it with ``save_pretrained``.

    ``max_length`` 16 holds the demo grammar's longest prompt (12 words + start and end tokens); every padded
    position costs text-encoder and cross-attention time in every training step.
    """
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    # transformers 5 builds the tokenizers-backed CLIP tokenizer from in-memory vocab and merges;
    # save_pretrained then writes tokenizer.json, which from_pretrained reloads offline.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"generated tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer
