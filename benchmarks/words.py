"""The made-up vocabulary the benchmarks write their corpora from: words of one to three syllables with
Zipf frequencies (the 1st word 1, the i-th 1/i), so that a BPE trained on the corpus meets the word-length
and frequency spread of prose."""

from __future__ import annotations

import random

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sha", "vel", "dor", "an", "is", "que", "bri", "mon", "tal"]


def zipf_vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    """(words, weights for `rng.choices`)."""
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    return words, [1 / (i + 1) for i in range(len(words))]
