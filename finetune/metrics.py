"""Metric builders for evaluation: plain functions over predictions and references.

The math comes from scikit-learn and sacrebleu, so no metric needs the network; `evaluate`
(which fetches metric scripts from the Hub, and ignores HF_HUB_OFFLINE) is only used for the
extra metrics a recipe names, and only when it can load them.
"""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --- classification metrics (accuracy, F1, per-class report) ---


# --- generation metrics (BLEU, chrF) ---


# --- extra `evaluate` metrics named by a recipe ---
